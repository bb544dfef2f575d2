"""Base selection (FlexiGPT eq. 2-5): which kept block each removed block should reuse.

For every linear weight W of a block, the metric compares rank-r reconstructions
``Ŵ_b = (U Σ)[:, :r] V[:, :r]^T``. The distance between blocks i and j on one matrix is what a
rank-r adapter cannot close between the two cleaned weights::

    d(W_i, W_j) = || Ŵ_i - (Ŵ_j + rank_r(Ŵ_i - Ŵ_j)) ||_F = sqrt(sum_{k=r+1}^{2r} σ_k(Ŵ_i - Ŵ_j)^2)

The block distance combines the per-matrix distances (``sum`` by default, or ``sum_sq``), and
each removed block picks the kept block at the smallest distance (eq. 5; a kept block may serve
several removed ones, so every pick is independent).

Speed: ``Ŵ_i - Ŵ_j = P Q^T`` with ``P = [U_i Σ_i, -U_j Σ_j]`` (m x 2r) and ``Q = [V_i, V_j]``
(n x 2r), so with ``P = Q_p R_p`` and ``Q = Q_q R_q`` its singular values are those of the
2r x 2r matrix ``R_p R_q^T``: two thin QRs and a small SVD per pair instead of an SVD of the
m x n difference (method ``fast``; ``exact`` does the full SVD and exists to check it).
The rank-r factors of every matrix are computed once per block (exact truncated SVD, or
``torch.svd_lowrank`` with oversampling). All SVDs run in fp32.

Memory: weights come from a ``BlockSource`` that yields one block's matrices at a time (from a
model, a state dict, or a safetensors checkpoint read tensor by tensor), so only the factors of
all blocks (2 r (m + n) floats per matrix) are held, never the whole model twice.

Ablation (Table 4, "high-rank prune"): metric ``frobenius`` is the plain ||W_i - W_j||_F on the
full weights, the naive metric that makes every removed block pick block 0 in the paper.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.files import tensor_files, write_text_atomic

METRICS: dict[str, str] = {
    "low_rank": "eq. 2: residual of the rank-r adapter between rank-r reconstructions (default)",
    "frobenius": "plain ||W_i - W_j||_F on the full weights (the paper's ablation; picks block 0)",
}
COMBINES: dict[str, str] = {
    "sum": "block distance = sum of the per-matrix distances (default)",
    "sum_sq": "block distance = sum of the squared per-matrix distances",
}
METHODS: dict[str, str] = {
    "fast": "2r x 2r QR trick per pair (default)",
    "exact": "full SVD of the reconstructed difference per pair (reference)",
}
SVDS: dict[str, str] = {
    "exact": "truncated torch.linalg.svd of every matrix (default)",
    "randomized": "torch.svd_lowrank with oversampling and power iterations",
}

Factors = tuple[torch.Tensor, torch.Tensor]  # (U_r Σ_r  m x r, V_r  n x r), fp32


@dataclass
class BlockSource:
    """Yields one block's linear weights at a time, so a large model need not be held twice."""

    num_layers: int
    """Number of source blocks."""
    targets: tuple[str, ...]
    """Short names of the linears compared (q, k, v, o, gate, up, down; OPT has no gate)."""
    load: Callable[[int], dict[str, torch.Tensor]]
    """block index -> {target: weight (out x in)}; any dtype, converted to fp32 when used."""

    def __call__(self, block: int) -> dict[str, torch.Tensor]:
        if not 0 <= block < self.num_layers:
            raise ValueError(f"block={block} is out of range: allowed 0..{self.num_layers - 1}")
        weights = self.load(block)
        missing = [t for t in self.targets if t not in weights]
        if missing:
            raise ValueError(f"block {block}: weights for targets {missing} are missing")
        return {t: weights[t] for t in self.targets}


def source_from_model(model: nn.Module, targets: Sequence[str] | None = None) -> BlockSource:
    """A BlockSource over the decoder layers of an in-memory transformers model (`targets`: every
    linear of the architecture when None)."""
    layout = get_layout(model.config)
    layers = model.get_submodule(layout.layers_path)
    targets = layout.targets if targets is None else tuple(targets)
    paths = {t: layout.linear_path(t) for t in targets}

    def load(i: int) -> dict[str, torch.Tensor]:
        return {t: layers[i].get_submodule(p).weight.detach() for t, p in paths.items()}

    return BlockSource(len(layers), tuple(targets), load)


def source_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    model_type: str,
    num_layers: int,
    targets: Sequence[str] | None = None,
) -> BlockSource:
    """A BlockSource over a state dict with the source model's tensor names."""
    targets = get_layout(model_type).targets if targets is None else tuple(targets)
    names = _tensor_names(model_type, targets, state_dict.keys())
    return BlockSource(
        num_layers, tuple(targets), lambda i: {t: state_dict[n.format(i=i)] for t, n in names.items()}
    )


def source_from_safetensors(path: str | Path, targets: Sequence[str] | None = None) -> BlockSource:
    """A BlockSource reading a local HF checkpoint directory one tensor at a time.

    Only the requested block's tensors are read from disk (``safe_open`` maps the file and copies
    one tensor per ``get_tensor``), so a 7B checkpoint is never fully in memory.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``.
        targets: linears to load (every linear of the architecture when None).

    Raises:
        FileNotFoundError: the directory lacks config.json or safetensors weights.
    """
    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{root}: no config.json (a local HF checkpoint directory is required)")
    cfg = json.loads(cfg_path.read_text())
    targets = get_layout(cfg.get("model_type")).targets if targets is None else tuple(targets)
    files = tensor_files(root)
    if files is None:
        raise FileNotFoundError(f"{root}: no model.safetensors or model.safetensors.index.json")
    names = _tensor_names(cfg.get("model_type"), targets, files)

    def load(i: int) -> dict[str, torch.Tensor]:
        out = {}
        for t, pattern in names.items():
            name = pattern.format(i=i)
            with safe_open(str(files[name]), framework="pt") as f:
                out[t] = f.get_tensor(name)
        return out

    return BlockSource(int(cfg["num_hidden_layers"]), tuple(targets), load)


def _tensor_names(model_type: str | None, targets: Sequence[str], stored: Any = None) -> dict[str, str]:
    """Name pattern (``{i}``: the block) of each target's weight in a checkpoint.

    Checkpoints saved from the base model rather than the CausalLM (the original OPT files:
    ``decoder.layers.0...``) lack the leading ``model.``; `stored`, the names present, says which.
    """
    layout = get_layout(model_type)
    prefix = layout.layers_path
    head, _, rest = prefix.partition(".")
    probe = f".0.{layout.linear_path(targets[0])}.weight"
    if stored is not None and head == "model" and prefix + probe not in stored and rest + probe in stored:
        prefix = rest
    return {t: f"{prefix}.{{i}}.{layout.linear_path(t)}.weight" for t in targets}


# ---------------------------------------------------------------------------------------- math


def low_rank_factors(
    weight: torch.Tensor, rank: int, *, svd: str = "exact", oversample: int = 10, niter: int = 2
) -> Factors:
    """Rank-r factors of a weight: ``(U_r Σ_r, V_r)`` so that ``Ŵ = (U_r Σ_r) V_r^T`` (eq. 3).

    The rank is clamped to min(m, n): small GQA k/v matrices have fewer singular values than r,
    and for them Ŵ is the whole matrix.

    Args:
        weight: (m, n) matrix, any float dtype; the SVD runs in fp32.
        rank: r.
        svd: ``exact`` (truncated full SVD) or ``randomized`` (torch.svd_lowrank).
        oversample: extra columns of the randomized range finder (q = r + oversample).
        niter: power iterations of the randomized SVD.

    Returns:
        (m x r', n x r') fp32 factors, r' = min(r, m, n).
    """
    w = weight.detach().float()
    r = min(rank, *w.shape)
    if svd == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r] * s[:r], vh[:r].T.contiguous()
    if svd == "randomized":
        q = min(r + oversample, *w.shape)
        u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
        return u[:, :r] * s[:r], v[:, :r].contiguous()
    raise ValueError(f"svd={svd!r} is unknown; allowed: {SVDS}")


def residual_distance_fast(fi: Factors, fj: Factors) -> float:
    """sqrt(sum_{k>r} σ_k(Ŵ_i - Ŵ_j)^2) from the factors, via two thin QRs (no m x n matrix)."""
    (ai, vi), (aj, vj) = fi, fj
    r = ai.shape[1]
    rp = torch.linalg.qr(torch.cat([ai, -aj], dim=1), mode="r").R
    rq = torch.linalg.qr(torch.cat([vi, vj], dim=1), mode="r").R
    s = torch.linalg.svdvals(rp @ rq.T)
    return float(s[r:].double().square().sum().sqrt())


def residual_distance_exact(fi: Factors, fj: Factors) -> float:
    """The same distance by a full SVD of the m x n difference Ŵ_i - Ŵ_j (the reference)."""
    (ai, vi), (aj, vj) = fi, fj
    r = ai.shape[1]
    s = torch.linalg.svdvals(ai @ vi.T - aj @ vj.T)
    return float(s[r:].double().square().sum().sqrt())


# ---------------------------------------------------------------------------------------- selection


@dataclass
class SelectionResult:
    """Block distances and the base picked for every removed block."""

    picks: dict[int, int]
    """removed block -> kept block whose weights it reuses."""
    distances: list[list[float | None]]
    """L x L block distances; None where a pair was not computed."""
    per_matrix: dict[str, list[list[float | None]]]
    """The per-target distance matrices that were combined."""
    removed: list[int]
    """Blocks being replaced."""
    rank: int
    """r of the metric (clamped per matrix to its size)."""
    metric: str
    combine: str
    method: str
    svd: str
    extra: dict[str, Any] = field(default_factory=dict)

    def distance_tensor(self) -> torch.Tensor:
        """The distance matrix as a float tensor with NaN where not computed."""
        return torch.tensor([[math.nan if d is None else d for d in row] for row in self.distances])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["picks"] = {str(k): v for k, v in self.picks.items()}  # JSON keys are strings
        return {"format": "flexigpt-selection/1", **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        """Write the result as JSON to `path`."""
        write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SelectionResult:
        """Read a result written by `save`."""
        d = json.loads(Path(path).read_text())
        d.pop("format", None)
        d["picks"] = {int(k): v for k, v in d["picks"].items()}
        return cls(**d)


def select_bases(
    source: BlockSource,
    removed: Sequence[int],
    *,
    rank: int = 256,
    metric: str = "low_rank",
    combine: str = "sum",
    method: str = "fast",
    svd: str = "exact",
    oversample: int = 10,
    niter: int = 2,
    all_pairs: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SelectionResult:
    """Pick a kept base block for every removed block (eq. 5, candidates = kept blocks).

    Args:
        source: the blocks' weights, read one block at a time.
        removed: blocks to replace (e.g. the lowest Block Influence).
        rank: r of the low-rank metric (paper: 256).
        metric: ``low_rank`` (eq. 2) or ``frobenius`` (ablation).
        combine: ``sum`` or ``sum_sq`` over the block's matrices.
        method: ``fast`` (QR trick) or ``exact`` (full SVD per pair); low_rank only.
        svd: ``exact`` or ``randomized`` factors; low_rank only.
        oversample: randomized SVD oversampling.
        niter: randomized SVD power iterations.
        all_pairs: also compute kept-kept and removed-removed pairs (for a full heatmap, Fig. 4).
        device: where the linear algebra runs (factors are kept there too).
        progress: tqdm bars.

    Returns:
        The picks and the distance matrices.

    Raises:
        ValueError: a bad option (the message names it and lists the allowed values) or bad blocks.
    """
    for name, value, allowed in (
        ("metric", metric, METRICS),
        ("combine", combine, COMBINES),
        ("method", method, METHODS),
        ("svd", svd, SVDS),
    ):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is unknown; allowed: {allowed}")
    if rank < 1:
        raise ValueError(f"rank={rank}: must be >= 1")
    n = source.num_layers
    removed = sorted(set(removed))
    if not removed or any(not 0 <= b < n for b in removed) or len(removed) >= n:
        raise ValueError(f"removed={removed}: need 1..{n - 1} distinct blocks in 0..{n - 1}")
    kept = [b for b in range(n) if b not in removed]
    pairs = _pairs(n, removed, kept, all_pairs)
    per_matrix = (_low_rank_distances if metric == "low_rank" else _frobenius_distances)(
        source, pairs, removed, rank, method, svd, oversample, niter, torch.device(device), progress
    )
    dist: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i, j in pairs:
        ds = [per_matrix[t][i][j] for t in source.targets]
        dist[i][j] = dist[j][i] = sum(ds) if combine == "sum" else sum(d * d for d in ds)
    picks = {i: min(kept, key=lambda j, i=i: (dist[i][j], j)) for i in removed}
    return SelectionResult(
        picks,
        dist,
        per_matrix,
        removed,
        rank,
        metric,
        combine,
        method,
        svd,
        {"oversample": oversample, "niter": niter} if svd == "randomized" else {},
    )


def _pairs(n: int, removed: list[int], kept: list[int], all_pairs: bool) -> list[tuple[int, int]]:
    if all_pairs:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    return [(i, j) for i in removed for j in kept]


def _empty(n: int) -> list[list[float | None]]:
    return [[None] * n for _ in range(n)]


def _low_rank_distances(source, pairs, removed, rank, method, svd, oversample, niter, device, progress):
    blocks = sorted({b for p in pairs for b in p})
    # One pass over the weights: every block is read once, factored, then dropped.
    factors: dict[int, dict[str, Factors]] = {}
    for b in tqdm(blocks, desc=f"rank-{rank} factors", unit="block", disable=not progress):
        factors[b] = {
            t: low_rank_factors(w.to(device), rank, svd=svd, oversample=oversample, niter=niter)
            for t, w in source(b).items()
        }
    fn = residual_distance_fast if method == "fast" else residual_distance_exact
    out = {t: _empty(source.num_layers) for t in source.targets}
    for i, j in tqdm(pairs, desc=f"distances ({method})", unit="pair", disable=not progress):
        for t in source.targets:
            out[t][i][j] = out[t][j][i] = fn(factors[i][t], factors[j][t])
    return out


def _frobenius_distances(source, pairs, removed, rank, method, svd, oversample, niter, device, progress):
    # Full weights are needed here. Keep the removed blocks (a minority) and stream every other
    # block past them once; with all_pairs the held set is every block on one side of a pair.
    held_ids = sorted({i for i, _ in pairs})
    held = {b: {t: w.to(device) for t, w in source(b).items()} for b in held_ids}
    out = {t: _empty(source.num_layers) for t in source.targets}
    others = sorted({j for _, j in pairs})
    for j in tqdm(others, desc="frobenius distances", unit="block", disable=not progress):
        wj = held[j] if j in held else {t: w.to(device) for t, w in source(j).items()}
        for i, jj in pairs:
            if jj != j:
                continue
            for t in source.targets:
                d = float(torch.linalg.matrix_norm(held[i][t].float() - wj[t].float()))
                out[t][i][j] = out[t][j][i] = d
    return out
