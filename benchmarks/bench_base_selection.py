"""Base selection speed: the 2r x 2r QR shortcut against one full SVD per pair (FlexiGPT eq. 2).

Matrices have LLaMA-2-7B shapes (q: 4096 x 4096, down: 4096 x 11008) and decaying spectra with a
depth structure: W_b = A + D_b, where A is common to all blocks and D_b drifts with depth
(D_b = rho * D_{b-1} + E_b), so nearby blocks are similar, as in trained models. Each spectrum
decays like a power law (sigma_k ~ k^-alpha), the shape seen in trained LLM weights.

Both paths start from the same rank-r factors of every matrix (computed once, not timed in the
ratio): ``fast`` is two thin QRs of the stacked factors and an SVD of a 2r x 2r matrix;
``exact`` rebuilds W^_i - W^_j (m x n) and takes all its singular values (``svdvals``, fp32).
Timing is interleaved per pair and matrix (fast, exact, fast, exact, ...) after a warm-up of each,
with the same thread count. An exact SVD of a 4096 x 11008 matrix takes about a minute on two
cores, so the default run uses few pairs (3 candidates for one removed block).

Run: ``python benchmarks/bench_base_selection.py`` (add ``--quick`` for 1024-wide matrices).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from tqdm.auto import tqdm

from flexigpt.prune.depth.selection import (
    Factors,
    low_rank_factors,
    residual_distance_exact,
    residual_distance_fast,
)

SHAPES_7B = {"q": (4096, 4096), "down": (4096, 11008)}
SHAPES_QUICK = {"q": (1024, 1024), "down": (1024, 2752)}


def spectral_matrix(m: int, n: int, alpha: float, scale: float, g: torch.Generator) -> torch.Tensor:
    """A random m x n matrix whose singular values decay like k^-alpha (random, nearly orthogonal bases)."""
    k = min(m, n)
    s = scale * torch.arange(1, k + 1, dtype=torch.float32).pow(-alpha)
    # Gaussian columns of this height are orthogonal to within ~1/sqrt(m): no QR of 4096-wide bases needed.
    left = torch.randn(m, k, generator=g) / m**0.5
    right = torch.randn(k, n, generator=g) / n**0.5
    return (left * s) @ right


def make_blocks(
    shapes: dict[str, tuple[int, int]], num_blocks: int, rho: float, seed: int
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    blocks: list[dict[str, torch.Tensor]] = [{} for _ in range(num_blocks)]
    for t, (m, n) in shapes.items():
        common = spectral_matrix(m, n, 0.6, 40.0, g)
        drift = torch.zeros(m, n)
        for b in tqdm(range(num_blocks), desc=f"weights {t} {m}x{n}", unit="block"):
            drift = rho * drift + spectral_matrix(m, n, 0.5, 20.0, g)
            blocks[b][t] = common + drift
    return blocks


def timed(fn, *args) -> tuple[float, float]:  # noqa: ANN001, ANN002
    # the distance functions return Python floats, so the device has finished when they return
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=4, help="blocks generated")
    ap.add_argument(
        "--removed", type=int, default=2, help="the removed block; every other block is a candidate"
    )
    ap.add_argument("--rank", type=int, default=256, help="r of the metric")
    ap.add_argument(
        "--factors",
        choices=["randomized", "exact"],
        default="randomized",
        help="how the (untimed) rank-r factors are computed",
    )
    ap.add_argument("--rho", type=float, default=0.8, help="depth correlation of the drift")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where factors and distances are computed (cpu, cuda)")
    ap.add_argument("--quick", action="store_true", help="1024-wide matrices instead of LLaMA-2-7B shapes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES_QUICK if args.quick else SHAPES_7B

    blocks = make_blocks(shapes, args.blocks, args.rho, args.seed)
    torch.manual_seed(args.seed)  # svd_lowrank draws its test matrices from the global generator
    t0 = time.perf_counter()
    factors: list[dict[str, Factors]] = [
        {
            t: low_rank_factors(w.to(args.device), args.rank, svd=args.factors, oversample=10, niter=2)
            for t, w in b.items()
        }
        for b in tqdm(blocks, desc=f"rank-{args.rank} factors ({args.factors})", unit="block")
    ]
    factor_s = time.perf_counter() - t0
    del blocks

    i = args.removed
    cands = [j for j in range(args.blocks) if j != i]
    # warm-up of both paths on the smaller shape (LAPACK workspaces, thread pool)
    residual_distance_fast(factors[i]["q"], factors[cands[0]]["q"])
    residual_distance_exact(factors[i]["q"], factors[cands[0]]["q"])

    times: dict[str, dict[str, list[float]]] = {t: {"fast": [], "exact": []} for t in shapes}
    dist: dict[str, dict[int, float]] = {"fast": {}, "exact": {}}
    rel_err = 0.0
    for j in tqdm(cands, desc="pairs (fast, exact interleaved)", unit="pair"):
        d_fast = d_exact = 0.0
        for t in shapes:
            tf, df = timed(residual_distance_fast, factors[i][t], factors[j][t])
            te, de = timed(residual_distance_exact, factors[i][t], factors[j][t])
            times[t]["fast"].append(tf)
            times[t]["exact"].append(te)
            rel_err = max(rel_err, abs(df - de) / max(de, 1e-12))
            d_fast += df
            d_exact += de
        dist["fast"][j], dist["exact"][j] = d_fast, d_exact

    pick_fast = min(cands, key=lambda j: (dist["fast"][j], j))
    pick_exact = min(cands, key=lambda j: (dist["exact"][j], j))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"blocks={args.blocks}, removed block {i}, candidates {cands}, r={args.rank}, device={args.device}, "
        f"threads={args.threads}, fp32, factors={args.factors} ({factor_s:.1f} s for all, untimed below)"
    )
    for j in cands:
        print(f"  d({i},{j}): fast {dist['fast'][j]:.6g}  exact {dist['exact'][j]:.6g}")
    print(
        f"max relative difference fast vs exact: {rel_err:.2e}; pick fast={pick_fast} exact={pick_exact} "
        f"-> {'agree' if pick_fast == pick_exact else 'DISAGREE'}"
    )
    print(f"peak resident memory of the process (ru_maxrss): {peak_gib:.2f} GiB")
    per_pair = []
    for k in range(len(cands)):
        per_pair.append(sum(times[t]["exact"][k] for t in shapes) / sum(times[t]["fast"][k] for t in shapes))
    for t, (m, n) in shapes.items():
        r = [e / f for e, f in zip(times[t]["exact"], times[t]["fast"], strict=True)]
        print(
            f"  {t} {m}x{n}: exact {statistics.median(times[t]['exact']):.3f} s, "
            f"fast {statistics.median(times[t]['fast']):.4f} s per pair; ratio median {statistics.median(r):.1f} "
            f"(range {min(r):.1f}-{max(r):.1f})"
        )
    print(
        f"exact/fast time per pair (speed-up of the QR path): median {statistics.median(per_pair):.1f}x "
        f"(range {min(per_pair):.1f}-{max(per_pair):.1f}, {len(per_pair)} pairs, "
        f"{'x'.join(map(str, shapes['q']))} + {'x'.join(map(str, shapes['down']))} per pair, r={args.rank}); "
        f"picks {'agree' if pick_fast == pick_exact else 'DISAGREE'}"
    )


if __name__ == "__main__":
    main()
