"""The LLM Surgeon's second-order algebra for one linear layer under a Kronecker-factored Fisher.

The loss change of a weight change ΔW (out x in) under F ≈ G ⊗ A is the quadratic
``½·tr(G ΔW A ΔWᵀ)``. Removing a set of rows (output units), columns (input features) or single
weights means forcing them to zero; the costs below are the smallest loss change that achieves
it, with (OBS: "surgeon") or without (OBD: the other weights stay) compensation by the rest of
the layer:

- row r:     ½·w_r A w_rᵀ / [G⁻¹]_rr          (OBD: ½·w_r A w_rᵀ · G_rr)
- column c:  ½·w_cᵀ G w_c / [A⁻¹]_cc          (OBD: ½·w_cᵀ G w_c · A_cc)
- element:   ½·W_ij² / ([G⁻¹]_ii [A⁻¹]_jj)    (OBD: ½·W_ij² · G_ii A_jj)

and the compensating update for a removed row set R is ``ΔW = −G⁻¹ E_Rᵀ ([G⁻¹]_RR)⁻¹ W_R`` (the
rows of R end exactly at zero); columns mirror it with A. A set Q of single weights is the same
constrained problem with ``[F⁻¹]_QQ = [G⁻¹]_{ii'}·[A⁻¹]_{jj'}`` in place of ``[G⁻¹]_RR``. Magnitude pruning is OBD with identity
factors, L-OBD is OBD with A only (G = I).

A layer with a bias is handled as ``[W | b]`` against an input with a constant-1 feature appended
(A gets that row and column): the bias moves with its row and is free to compensate a removed
column, but is itself never a column candidate.

Factors are damped relative to their scale, ``M + λ·mean(diag M)·I``, and inverted in float64.
Structures that are already dead (an all-zero row or column, or a zero factor diagonal: an input
that is always zero, an output whose gradient is always zero) are left out of the factors before
inverting; removing them changes nothing, so they cost 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def damped(m: torch.Tensor, lam: float) -> torch.Tensor:
    """``M + λ·mean(diag M)·I`` in float64 (λ relative to the factor's own scale)."""
    m = m.to(torch.float64, copy=True)
    m.diagonal().add_(lam * m.diagonal().mean())  # in place: no n x n identity for an 11008-wide factor
    return m


def spd_inverse(m: torch.Tensor) -> torch.Tensor:
    """Inverse of a symmetric positive definite float64 matrix by Cholesky."""
    return torch.cholesky_inverse(torch.linalg.cholesky(m))


@dataclass
class LayerCurvature:
    """A layer's weights and damped factors restricted to its live rows and columns.

    ``w`` is the float64 ``[W | b]`` (out x (in + has_bias)); ``rows`` / ``cols`` index the live
    structures of it (the bias column is always live when present). ``g`` / ``a`` are the damped
    factors on those (None: identity), ``g_inv`` / ``a_inv`` their inverses (only when ``obs``).
    """

    w: torch.Tensor
    n_in: int
    rows: torch.Tensor
    cols: torch.Tensor
    g: torch.Tensor | None
    a: torch.Tensor | None
    g_inv: torch.Tensor | None
    a_inv: torch.Tensor | None

    @property
    def sub(self) -> torch.Tensor:
        """The live block of ``w``."""
        return self.w[self.rows][:, self.cols]


def prepare(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    g: torch.Tensor | None,
    a: torch.Tensor | None,
    *,
    damp_g: float = 0.01,
    damp_a: float = 0.01,
    obs: bool = True,
) -> LayerCurvature:
    """Restrict a layer and its factors to the live structures, damp, and invert when `obs`.

    Args:
        weight: (out, in) weight.
        bias: (out,) bias or None.
        g: (out, out) output-gradient factor, or None for identity.
        a: (in, in) input factor ((in+1, in+1) with the constant-1 feature last when `bias` is
            given), or None for identity.
        damp_g: λ of G.
        damp_a: λ of A.
        obs: also compute the inverses (costs with compensation, updates).

    Returns:
        The layer's curvature on its live rows and columns.
    """
    w = weight.detach().to(torch.float64, copy=True)
    if bias is not None:
        w = torch.cat([w, bias.detach().double()[:, None]], dim=1)
    n_in = weight.shape[1]
    live_rows = w.ne(0).any(dim=1)
    live_cols = w[:, :n_in].ne(0).any(dim=0)
    if g is not None:
        live_rows &= g.diagonal().to(w.device) > 0
    if a is not None:
        live_cols &= a.diagonal()[:n_in].to(w.device) > 0
    if bias is not None:
        live_cols = torch.cat([live_cols, torch.ones(1, dtype=torch.bool, device=w.device)])
    rows, cols = live_rows.nonzero().flatten(), live_cols.nonzero().flatten()
    gs = damped(_live(g.to(w.device), rows), damp_g) if g is not None and len(rows) else None
    as_ = damped(_live(a.to(w.device), cols), damp_a) if a is not None and len(cols) else None
    g_inv = a_inv = None
    if obs:
        g_inv = spd_inverse(gs) if gs is not None else None
        a_inv = spd_inverse(as_) if as_ is not None else None
    return LayerCurvature(w, n_in, rows, cols, gs, as_, g_inv, a_inv)


def _live(m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The rows and columns `idx` of a factor (the factor itself when all are live: no copy)."""
    return m if len(idx) == m.shape[0] else m[idx][:, idx]


def _diag(m: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    return m.diagonal() if m is not None else torch.ones(n, dtype=like.dtype, device=like.device)


def _mat(m: torch.Tensor | None, x: torch.Tensor, *, left: bool) -> torch.Tensor:
    """m @ x (left) or x @ m; identity when m is None."""
    if m is None:
        return x
    return m @ x if left else x @ m


def structure_costs(c: LayerCurvature, *, obs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row costs (out,) and column costs (in,) of a layer; dead structures cost 0.

    Args:
        c: the layer's curvature from ``prepare``.
        obs: True for the Surgeon's costs (compensated, inverse diagonals); False for OBD.
    """
    out_n = c.w.shape[0]
    row_cost = torch.zeros(out_n, dtype=torch.float64, device=c.w.device)
    col_cost = torch.zeros(c.w.shape[1], dtype=torch.float64, device=c.w.device)
    if len(c.rows) and len(c.cols):
        w = c.sub
        # ½·w_r A w_rᵀ for every row, ½·w_cᵀ G w_c for every column
        row_q = 0.5 * (_mat(c.a, w, left=False) * w).sum(dim=1)
        col_q = 0.5 * (_mat(c.g, w, left=True) * w).sum(dim=0)
        if obs:
            row_cost[c.rows] = row_q / _diag(c.g_inv, len(c.rows), w)
            col_cost[c.cols] = col_q / _diag(c.a_inv, len(c.cols), w)
        else:
            row_cost[c.rows] = row_q * _diag(c.g, len(c.rows), w)
            col_cost[c.cols] = col_q * _diag(c.a, len(c.cols), w)
    return row_cost, col_cost[: c.n_in]


def element_costs(c: LayerCurvature, *, obs: bool) -> torch.Tensor:
    """Per-weight costs (out, in) of a layer (bias excluded); weights in dead structures cost 0."""
    cost = torch.zeros_like(c.w)
    if len(c.rows) and len(c.cols):
        w = c.sub
        if obs:
            d = _diag(c.g_inv, len(c.rows), w)[:, None] * _diag(c.a_inv, len(c.cols), w)[None, :]
            val = 0.5 * w.square() / d
        else:
            val = 0.5 * w.square() * _diag(c.g, len(c.rows), w)[:, None] * _diag(c.a, len(c.cols), w)[None, :]
        cost[c.rows[:, None], c.cols[None, :]] = val
    return cost[:, : c.n_in]


def _positions(live: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Positions inside the live index list `live` of the full indices `chosen` that are live."""
    lookup = torch.full((int(live.max()) + 1 if len(live) else 0,), -1, dtype=torch.long, device=live.device)
    lookup[live] = torch.arange(len(live), device=live.device)
    chosen = chosen[chosen < len(lookup)]
    pos = lookup[chosen]
    return pos[pos >= 0]


def remove_rows(c: LayerCurvature, rows: torch.Tensor, *, update: str) -> None:
    """Zero the rows `rows` of ``c.w`` in place, compensating the other rows as `update` says.

    Args:
        c: the layer's curvature (``prepare(obs=True)`` for an update).
        rows: full row indices to remove.
        update: ``correlated`` (one joint solve over all removed rows), ``independent`` (each
            row's own update, summed) or ``none``.
    """
    if update != "none" and len(rows) and len(c.rows) and len(c.cols):
        pos = _positions(c.rows, rows)
        if len(pos):
            g_inv = (
                c.g_inv if c.g_inv is not None else torch.eye(len(c.rows), dtype=c.w.dtype, device=c.w.device)
            )
            w_r = c.sub[pos]  # |R| x live cols
            block = g_inv[pos][:, pos]
            if update == "correlated":
                coef = torch.linalg.solve(block, w_r)
            else:
                coef = w_r / block.diagonal()[:, None]
            delta = -g_inv[:, pos] @ coef  # ΔW = −G⁻¹ E_Rᵀ ([G⁻¹]_RR)⁻¹ W_R on the live block
            c.w[c.rows[:, None], c.cols[None, :]] += delta
    c.w[rows] = 0.0


def remove_cols(c: LayerCurvature, cols: torch.Tensor, *, update: str) -> None:
    """Zero the input columns `cols` of ``c.w`` in place (the mirror of ``remove_rows`` with A)."""
    if update != "none" and len(cols) and len(c.rows) and len(c.cols):
        pos = _positions(c.cols, cols)
        if len(pos):
            a_inv = (
                c.a_inv if c.a_inv is not None else torch.eye(len(c.cols), dtype=c.w.dtype, device=c.w.device)
            )
            w_c = c.sub[:, pos]  # live rows x |C|
            block = a_inv[pos][:, pos]
            if update == "correlated":
                coef = torch.linalg.solve(block, w_c.T).T
            else:
                coef = w_c / block.diagonal()[None, :]
            delta = -coef @ a_inv[pos]  # ΔW = −W_C ([A⁻¹]_CC)⁻¹ E_C A⁻¹ on the live block
            c.w[c.rows[:, None], c.cols[None, :]] += delta
    c.w[:, cols] = 0.0


def element_groups(rows: torch.Tensor, bound: int) -> list[torch.Tensor]:
    """Split removed weights (their row indices, sorted) into groups of at most `bound` weights.

    Whole rows go together while they fit; a row with more than `bound` removed weights is split
    into chunks of `bound`. Returns index tensors into `rows`.
    """
    _, counts = torch.unique_consecutive(rows, return_counts=True)
    groups, start, size = [], 0, 0
    for n in counts.tolist():
        if size and size + n > bound:
            groups.append(torch.arange(start, start + size, device=rows.device))
            start, size = start + size, 0
        while n > bound:
            groups.append(torch.arange(start, start + bound, device=rows.device))
            start, n = start + bound, n - bound
        size += n
    if size:
        groups.append(torch.arange(start, start + size, device=rows.device))
    return groups


def _joint_elements(w: torch.Tensor, gi: torch.Tensor, ai: torch.Tensor, m: torch.Tensor, bound: int) -> None:
    """The OBS update of removed weights solved jointly, group by group, on the live block `w` in place.

    For a group Q of weights (i_k, j_k): ``[F⁻¹]_QQ = [G⁻¹]_{i i'} · [A⁻¹]_{j j'}`` (elementwise),
    ``coef = ([F⁻¹]_QQ)⁻¹ w_Q`` and ``ΔW = −G⁻¹ M A⁻¹`` with M holding `coef` at Q. Each group is
    solved on the weights as the earlier groups left them.
    """
    pos = m.nonzero()  # row-major: sorted by row
    for idx in element_groups(pos[:, 0], bound):
        r, col = pos[idx, 0], pos[idx, 1]
        coef = torch.linalg.solve(gi[r][:, r] * ai[col][:, col], w[r, col])
        urows, inv = torch.unique_consecutive(r, return_inverse=True)
        rows_m = torch.zeros(len(urows), w.shape[1], dtype=w.dtype, device=w.device)
        rows_m.index_add_(0, inv, coef[:, None] * ai[col])  # the rows `urows` of M A⁻¹
        w -= gi[:, urows] @ rows_m


def remove_elements(c: LayerCurvature, mask: torch.Tensor, *, update: str, max_correlate: int = 2000) -> None:
    """Zero the weights where `mask` (out, in) is True, in place.

    ``update='correlated'`` solves the removed weights jointly (the multi-weight OBS update under
    K-FAC) in groups of at most `max_correlate` weights: whole rows together while they fit, a row
    with more removed weights split into chunks. Within a group every removed weight ends at zero
    and the rest of the layer compensates. ``max_correlate=1`` solves each weight on its own, in
    sequence. ``update='independent'`` adds ``ΔW = −G⁻¹ S A⁻¹`` with ``S_ij = W_ij / ([G⁻¹]_ii
    [A⁻¹]_jj)`` on the removed weights: each removed weight's own optimal update, summed, all
    computed on the weights before the shot (the ablation).
    """
    if update != "none" and mask.any() and len(c.rows) and len(c.cols):
        full = torch.zeros_like(c.w, dtype=torch.bool)
        full[:, : c.n_in] = mask
        m = full[c.rows][:, c.cols]
        w = c.sub
        gi = c.g_inv if c.g_inv is not None else torch.eye(len(c.rows), dtype=w.dtype, device=w.device)
        ai = c.a_inv if c.a_inv is not None else torch.eye(len(c.cols), dtype=w.dtype, device=w.device)
        if update == "correlated":
            _joint_elements(w, gi, ai, m, max_correlate)
            c.w[c.rows[:, None], c.cols[None, :]] = w
        else:
            s = torch.where(m, w / (gi.diagonal()[:, None] * ai.diagonal()[None, :]), torch.zeros_like(w))
            c.w[c.rows[:, None], c.cols[None, :]] -= gi @ s @ ai
    c.w[:, : c.n_in][mask] = 0.0  # later groups move earlier groups' weights a little: exact zeros


def write_back(c: LayerCurvature, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy ``c.w`` back into the layer's weight (and bias), in their own dtype."""
    with torch.no_grad():
        weight.copy_(c.w[:, : c.n_in].to(weight.dtype))
        if bias is not None:
            bias.copy_(c.w[:, c.n_in].to(bias.dtype))
