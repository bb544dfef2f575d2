"""Base selection: the fast QR path equals the exact SVD, picks follow depth, sources agree."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from flexigpt.prune.depth.importance import ImportanceResult
from flexigpt.prune.depth.plots import plot_distances, plot_importance
from flexigpt.prune.depth.selection import (
    BlockSource,
    SelectionResult,
    low_rank_factors,
    residual_distance_exact,
    residual_distance_fast,
    select_bases,
    source_from_model,
    source_from_safetensors,
    source_from_state_dict,
)
from flexigpt.shared.engine.tiny import tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _close(a: SelectionResult, b: SelectionResult, rtol: float) -> None:
    ta, tb = a.distance_tensor(), b.distance_tensor()
    assert torch.equal(ta.isnan(), tb.isnan())
    ok = ~ta.isnan()
    assert torch.allclose(ta[ok], tb[ok], rtol=rtol, atol=1e-6), (ta - tb).abs().max()


def test_distance_is_the_rank_r_residual_of_the_reconstructions() -> None:
    g = torch.Generator().manual_seed(1)
    wi, wj = torch.randn(48, 80, generator=g), torch.randn(48, 80, generator=g)
    r = 6
    fi, fj = low_rank_factors(wi, r), low_rank_factors(wj, r)
    # Straight from eq. 2: || W^_i - (W^_j + Delta_{i-j}) ||_F with Delta the rank-r SVD of W^_i - W^_j.
    u, s, vh = torch.linalg.svd(wi, full_matrices=False)
    hi = (u[:, :r] * s[:r]) @ vh[:r]
    u, s, vh = torch.linalg.svd(wj, full_matrices=False)
    hj = (u[:, :r] * s[:r]) @ vh[:r]
    u, s, vh = torch.linalg.svd(hi - hj, full_matrices=False)
    delta = (u[:, :r] * s[:r]) @ vh[:r]
    eq2 = float(torch.linalg.matrix_norm(hi - (hj + delta)))
    assert residual_distance_exact(fi, fj) == pytest.approx(eq2, rel=1e-4)
    assert residual_distance_fast(fi, fj) == pytest.approx(eq2, rel=1e-4)
    assert residual_distance_fast(fi, fi) < 1e-4
    assert residual_distance_fast(fi, fj) == pytest.approx(residual_distance_fast(fj, fi), rel=1e-5)


def test_fast_and_exact_agree_on_random_model_weights() -> None:
    src = source_from_model(tiny_model("llama2", num_layers=6))
    fast = select_bases(src, [1, 4], rank=8, progress=False)
    exact = select_bases(src, [1, 4], rank=8, method="exact", progress=False)
    _close(fast, exact, rtol=1e-4)
    assert fast.picks == exact.picks


@pytest.mark.parametrize("combine", ["sum", "sum_sq"])
def test_fast_and_exact_agree_on_structured_weights_and_pick_depth_neighbours(
    drifting: Callable[..., BlockSource], combine: str
) -> None:
    src = drifting()
    removed = [2, 4, 6]
    fast = select_bases(src, removed, rank=16, combine=combine, progress=False)
    exact = select_bases(src, removed, rank=16, combine=combine, method="exact", progress=False)
    _close(fast, exact, rtol=1e-4)
    # The subspaces rotate with depth and noise grows with depth: the nearest kept block below wins.
    assert fast.picks == exact.picks == {2: 1, 4: 3, 6: 5}
    for i in removed:
        for j in range(src.num_layers):
            if fast.distances[i][j] is None:
                continue
            per = [fast.per_matrix[t][i][j] for t in src.targets]
            want = sum(per) if combine == "sum" else sum(d * d for d in per)
            assert fast.distances[i][j] == pytest.approx(want)


def test_randomized_factors_pick_the_same_bases(drifting: Callable[..., BlockSource]) -> None:
    src = drifting()
    exact = select_bases(src, [2, 4, 6], rank=16, progress=False)
    rand = select_bases(src, [2, 4, 6], rank=16, svd="randomized", oversample=8, niter=2, progress=False)
    assert rand.picks == exact.picks
    _close(rand, exact, rtol=2e-2)
    assert rand.extra == {"oversample": 8, "niter": 2}


def test_frobenius_ablation_is_the_plain_norm_and_drifts_to_low_blocks(
    drifting: Callable[..., BlockSource],
) -> None:
    src = drifting()
    frob = select_bases(src, [2, 4, 6], metric="frobenius", progress=False)
    w2, w1 = src(2), src(1)
    assert frob.per_matrix["q"][2][1] == pytest.approx(
        float(torch.linalg.matrix_norm(w2["q"] - w1["q"])), rel=1e-5
    )
    low = select_bases(src, [2, 4, 6], rank=16, progress=False)
    # The paper's Fig. 2c story: the high-rank noise dominates the plain norm, quiet low blocks win.
    assert all(frob.picks[i] <= low.picks[i] for i in low.picks)
    assert frob.picks != low.picks


def test_candidates_are_kept_blocks_and_all_pairs_fills_the_matrix(
    drifting: Callable[..., BlockSource],
) -> None:
    src = drifting(num_blocks=6)
    sel = select_bases(src, [3, 4], rank=16, progress=False)
    assert set(sel.picks.values()) <= {0, 1, 2, 5}
    assert sel.distances[3][4] is None and sel.distances[0][1] is None and sel.distances[3][3] is None
    full = select_bases(src, [3, 4], rank=16, all_pairs=True, progress=False)
    d = full.distance_tensor()
    assert int(d.isnan().sum()) == 6  # only the diagonal
    assert torch.allclose(d.nan_to_num(), d.nan_to_num().T)
    assert full.picks == sel.picks  # block 4 may not pick block 3 even though it is nearer


def test_rank_is_clamped_to_small_matrices() -> None:
    # tiny GQA: k and v are 32 x 64, so r = 256 covers them whole and their distance vanishes.
    src = source_from_model(tiny_model("llama3", num_layers=3))
    sel = select_bases(src, [1], rank=256, progress=False)
    assert sel.per_matrix["k"][1][0] < 1e-3
    assert low_rank_factors(src(0)["k"], 256)[0].shape == (32, 32)


def test_sources_from_model_state_dict_and_safetensors_agree(tmp_path: Path) -> None:
    model = tiny_model("qwen2", num_layers=4)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sources = [
        source_from_model(model),
        source_from_state_dict(model.state_dict(), "qwen2", 4),
        source_from_safetensors(tmp_path / "one"),
        source_from_safetensors(tmp_path / "sharded"),
    ]
    for src in sources[1:]:
        assert src.num_layers == 4 and src.targets == sources[0].targets
        for b in range(4):
            for t, w in src(b).items():
                assert torch.equal(w, sources[0](b)[t])
    picks = [select_bases(s, [2], rank=8, progress=False).picks for s in sources]
    assert all(p == picks[0] for p in picks)


def test_bad_options_are_named(drifting: Callable[..., BlockSource], tmp_path: Path) -> None:
    src = drifting(num_blocks=4)
    for kw, match in [
        ({"metric": "cosine"}, "metric='cosine'"),
        ({"combine": "max"}, "combine='max'"),
        ({"method": "slow"}, "method='slow'"),
        ({"svd": "qr"}, "svd='qr'"),
        ({"rank": 0}, "rank=0"),
    ]:
        with pytest.raises(ValueError, match=match):
            select_bases(src, [1], progress=False, **kw)
    for removed in ([], [0, 1, 2, 3], [7]):
        with pytest.raises(ValueError, match="removed="):
            select_bases(src, removed, progress=False)
    with pytest.raises(ValueError, match="block=9"):
        src(9)
    with pytest.raises(FileNotFoundError, match="config.json"):
        source_from_safetensors(tmp_path)


def test_result_round_trip_and_plots(drifting: Callable[..., BlockSource], tmp_path: Path) -> None:
    sel = select_bases(drifting(num_blocks=5), [1, 3], rank=16, progress=False)
    sel.save(tmp_path / "sel.json")
    back = SelectionResult.load(tmp_path / "sel.json")
    assert back.picks == sel.picks and back.distances == sel.distances and back.per_matrix == sel.per_matrix
    heat = plot_distances(sel, tmp_path / "dist.png")
    scores = ImportanceResult("block_influence", [0.3, 0.1, 0.2, math.pi / 10, 0.5], "llama", 2, 64)
    bars = plot_importance(scores, tmp_path / "bi.png", removed=[1, 3])
    for png in (heat, bars):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_opt_sources_compare_its_six_linears_with_or_without_the_model_prefix(tmp_path: Path) -> None:
    model = tiny_model("opt", num_layers=3)
    model.save_pretrained(tmp_path / "causal")
    # the original OPT files hold the base model's names (decoder.layers.0..., no leading model.)
    model.model.save_pretrained(tmp_path / "base")
    sources = [
        source_from_model(model),
        source_from_safetensors(tmp_path / "causal"),
        source_from_safetensors(tmp_path / "base"),
        source_from_state_dict(model.model.state_dict(), "opt", 3),
    ]
    assert sources[0].targets == ("q", "k", "v", "o", "up", "down")
    for src in sources[1:]:
        assert src.targets == sources[0].targets
        for t, w in src(1).items():
            assert torch.equal(w, sources[0](1)[t])
