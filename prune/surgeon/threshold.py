"""One global threshold over the pooled costs of every layer.

Structured: each layer's row and column costs are pooled with every other layer's; a structure is
removed when its cost is at most the threshold, and the threshold is the largest one whose zeroed
weights stay within the target. A layer with r rows and c columns removed has
``r·n_cols + c·n_rows − r·c`` zeroed weights (a weight in a removed row and a removed column is
counted once), so the per-layer sparsity is whatever the costs say. Unstructured and 2:4 pool the
weights' own costs the same way (2:4: only the two cheapest weights of each group of four are
candidates, so no group loses more than two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StructuredChoice:
    """Rows and columns to remove in each layer (full indices), and the weights they zero."""

    rows: dict[str, torch.Tensor]
    cols: dict[str, torch.Tensor]
    zeroed: int
    total: int


def structured_threshold(
    costs: dict[str, tuple[torch.Tensor, torch.Tensor]], target: float
) -> StructuredChoice:
    """Choose rows and columns of all layers so that at most ``target`` of their weights are zero.

    Args:
        costs: layer name -> (row costs (n_rows,), column costs (n_cols,)).
        target: fraction of all the layers' weights to zero, in [0, 1).

    Returns:
        The choice: the cheapest structures (pooled over layers) whose zeroed count, overlaps
        counted once, is the largest not above ``target × total``. One more structure would
        exceed it.
    """
    names = list(costs)
    total = sum(r.numel() * c.numel() for r, c in costs.values())
    budget = int(target * total)
    all_cost, all_delta, all_layer, all_is_row, all_idx = [], [], [], [], []
    for li, name in enumerate(names):
        rc, cc = (x.double().cpu() for x in costs[name])
        n_rows, n_cols = rc.numel(), cc.numel()
        cost = torch.cat([rc, cc])
        is_row = torch.cat([torch.ones(n_rows, dtype=torch.bool), torch.zeros(n_cols, dtype=torch.bool)])
        idx = torch.cat([torch.arange(n_rows), torch.arange(n_cols)])
        # within a layer, structures go in cost order: rows removed so far x columns removed so far
        order = torch.argsort(cost, stable=True)
        cost, is_row, idx = cost[order], is_row[order], idx[order]
        r_cum = torch.cumsum(is_row.long(), 0)
        c_cum = torch.cumsum((~is_row).long(), 0)
        zeroed = r_cum * n_cols + c_cum * n_rows - r_cum * c_cum
        delta = torch.diff(zeroed, prepend=torch.zeros(1, dtype=torch.long))
        all_cost.append(cost)
        all_delta.append(delta)
        all_layer.append(torch.full_like(idx, li))
        all_is_row.append(is_row)
        all_idx.append(idx)
    cost = torch.cat(all_cost)
    order = torch.argsort(cost, stable=True)  # stable: a layer's own order survives ties
    delta = torch.cat(all_delta)[order]
    running = torch.cumsum(delta, 0)
    n_take = int((running <= budget).sum())  # running is non-decreasing: a prefix fits the budget
    taken = order[:n_take]
    layer, is_row, idx = torch.cat(all_layer)[taken], torch.cat(all_is_row)[taken], torch.cat(all_idx)[taken]
    rows = {n: torch.sort(idx[(layer == li) & is_row]).values for li, n in enumerate(names)}
    cols = {n: torch.sort(idx[(layer == li) & ~is_row]).values for li, n in enumerate(names)}
    zeroed = int(running[n_take - 1]) if n_take else 0
    return StructuredChoice(rows, cols, zeroed, total)


def element_threshold(
    costs: dict[str, torch.Tensor], target: float, *, n_of_m: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Masks (True = remove) of the cheapest weights of all layers, ``target`` of them in all.

    Args:
        costs: layer name -> per-weight costs (n_rows, n_cols).
        target: fraction of all weights to remove.
        n_of_m: (n, m), e.g. (2, 4): only the n cheapest weights of each group of m consecutive
            inputs are candidates (so ``target`` must be at most n/m to be met).
    """
    cands = {}
    for name, c in costs.items():
        c = c.float().cpu()
        if n_of_m is not None:
            n, m = n_of_m
            groups = c.reshape(c.shape[0], -1, m)
            rank = torch.argsort(torch.argsort(groups, dim=-1, stable=True), dim=-1)
            c = torch.where(rank < n, groups, torch.full_like(groups, float("inf"))).reshape(c.shape)
        cands[name] = c
    flat = torch.cat([c.flatten() for c in cands.values()])
    k = int(target * flat.numel())
    if k == 0:
        return {n: torch.zeros_like(c, dtype=torch.bool) for n, c in cands.items()}
    order = torch.argsort(flat, stable=True)[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    chosen &= torch.isfinite(flat)
    out, start = {}, 0
    for name, c in cands.items():
        out[name] = chosen[start : start + c.numel()].view(c.shape)
        start += c.numel()
    return out
