"""Block importance: the hooks read the right tensors, identity blocks rank lowest, ratio rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexigpt.prune.depth.importance import (
    IMPORTANCE_METRICS,
    ImportanceResult,
    calibration_samples,
    compute_importance,
    n_blocks_to_remove,
    register_importance,
)
from flexigpt.prune.depth.replace import shortgpt_plan
from flexigpt.shared.engine.apply import apply_plan
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.tiny import TINY_ARCHS, tiny_model
from flexigpt.shared.evaluate.perplexity import sample_perplexity


def perplexity(model: torch.nn.Module, samples: list[torch.Tensor]) -> float:
    """The package's one perplexity, on calibration samples (what ppl_drop measures with)."""
    return sample_perplexity(model, samples).ppl


def _samples(n: int = 3, length: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (2, length), generator=g) for _ in range(n)]


def _make_identity(model: torch.nn.Module, block: int) -> None:
    """Zero the attention and MLP output projections (and their biases, as OPT's): the block then
    returns its input exactly."""
    layout = get_layout(model.config)
    layer = model.get_submodule(layout.layers_path)[block]
    with torch.no_grad():
        for path in (layout.attn_out, layout.mlp_out):
            out = layer.get_submodule(path)
            out.weight.zero_()
            if out.bias is not None:
                out.bias.zero_()


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
@pytest.mark.parametrize("block", [1, 3])
def test_identity_block_ranks_lowest(arch: str, block: int) -> None:
    # block 3 is the last one: its output is only seen through the hooks (HF's last hidden state is
    # taken after the final norm), so this also checks the last block is scored on the right tensor.
    model = tiny_model(arch, num_layers=4)
    _make_identity(model, block)
    for metric in ("block_influence", "angular_distance"):
        res = compute_importance(model, _samples(), metric, progress=False)
        assert res.ranking()[0] == block, (metric, res.scores)
        assert abs(res.scores[block]) < 1e-3
        assert min(s for i, s in enumerate(res.scores) if i != block) > 0.01


def test_block_influence_matches_hidden_states_and_not_the_final_norm() -> None:
    model = tiny_model("llama2", num_layers=4)
    samples = _samples()
    res = compute_importance(model, samples, "block_influence", progress=False)
    sums, count = torch.zeros(4, dtype=torch.float64), 0
    with torch.no_grad():
        for ids in samples:
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            for i in range(4):
                cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)
                sums[i] += (1 - cos).double().sum()
            count += ids.numel()
    from_hidden = sums / count
    # Blocks 0..2: hooks and hidden_states see the same tensors.
    assert torch.allclose(torch.tensor(res.scores[:3], dtype=torch.float64), from_hidden[:3], atol=1e-6)
    # Last block: hidden_states[-1] is after the final RMSNorm, so that reading differs.
    assert abs(res.scores[3] - float(from_hidden[3])) > 1e-3


def test_ppl_drop_identity_block_costs_nothing() -> None:
    model = tiny_model("llama3", num_layers=4)
    _make_identity(model, 2)
    samples = _samples()
    res = compute_importance(model, samples, "ppl_drop", progress=False)
    assert res.extra["ppl_full"] == pytest.approx(perplexity(model, samples), rel=1e-6)
    assert abs(res.scores[2]) < 1e-3 * res.extra["ppl_full"]
    assert len(res.extra["ppl_without_block"]) == 4
    assert any(abs(s) > 1e-2 for i, s in enumerate(res.scores) if i != 2)


def test_ppl_drop_equals_the_model_without_the_block() -> None:
    # Skipping a block through a hook is the ShortGPT model that removed it, scored the same way.
    samples = _samples(2, length=20, seed=3)
    res = compute_importance(tiny_model("qwen2", num_layers=4), samples, "ppl_drop", progress=False)
    for block in range(4):
        removed = apply_plan(tiny_model("qwen2", num_layers=4), shortgpt_plan("qwen2", 4, [block]))
        assert res.extra["ppl_without_block"][block] == pytest.approx(perplexity(removed, samples), rel=1e-5)
        assert res.scores[block] == pytest.approx(
            res.extra["ppl_without_block"][block] - res.extra["ppl_full"], rel=1e-9, abs=1e-12
        )
    with pytest.raises(ValueError, match="ppl_drop needs sequences of at least 2 tokens"):
        compute_importance(tiny_model(num_layers=2), [torch.tensor([[5]])], "ppl_drop", progress=False)


def test_result_round_trip_and_least_important(tmp_path: Path) -> None:
    res = compute_importance(tiny_model("mistral", num_layers=4), _samples(1), progress=False)
    assert res.num_samples == 1 and res.num_tokens == 48 and res.model_type == "mistral"
    res.save(tmp_path / "bi.json")
    back = ImportanceResult.load(tmp_path / "bi.json")
    assert back == res
    two = res.least_important(2)
    assert two == sorted(res.ranking()[:2])
    with pytest.raises(ValueError, match="allowed 0..4"):
        res.least_important(5)


def test_registry_errors_name_the_valid_metrics() -> None:
    with pytest.raises(ValueError, match="block_influence"):
        compute_importance(tiny_model(num_layers=2), _samples(1), "bogus", progress=False)
    with pytest.raises(ValueError, match="already registered"):
        register_importance("ppl_drop", "x")(IMPORTANCE_METRICS["ppl_drop"].fn)
    with pytest.raises(ValueError, match="must take"):
        register_importance("new_metric", "x")(lambda model, samples: ([], {}))
    assert "new_metric" not in IMPORTANCE_METRICS


def test_bad_calibration_input_is_named() -> None:
    model = tiny_model(num_layers=2)
    with pytest.raises(ValueError, match=r"samples\[1\]"):
        compute_importance(model, [torch.randint(0, 128, (8,)), torch.randn(8)], progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        compute_importance(model, [], progress=False)


@pytest.mark.parametrize(
    ("ratio", "layers", "rule", "n"),
    [
        (0.3, 32, "round", 10),
        (0.4, 32, "round", 13),
        (0.3, 32, "paper_params", 9),
        (0.4, 32, "paper_params", 12),
        (0.3, 22, "round", 7),
        (0.25, 4, "round", 1),
        (0.29, 100, "paper_params", 29),  # 0.29 * 100 = 28.999999999999996 in floating point
        (0.5, 3, "round", 2),  # halves round up, not to even
    ],
)
def test_ratio_rules(ratio: float, layers: int, rule: str, n: int) -> None:
    assert n_blocks_to_remove(ratio, layers, rule) == n


def test_ratio_rule_errors() -> None:
    with pytest.raises(ValueError, match="rule='bogus'"):
        n_blocks_to_remove(0.3, 32, "bogus")
    with pytest.raises(ValueError, match="ratio=1.2"):
        n_blocks_to_remove(1.2, 32)
    with pytest.raises(ValueError, match="removes 0 of 4"):
        n_blocks_to_remove(0.1, 4)


def test_calibration_samples_pack_and_truncate() -> None:
    texts = ["abcdef", "", "  ", "ghij", "klmnopqrstu"]
    encode = lambda t: [ord(c) - 90 for c in t]  # noqa: E731
    packed = list(calibration_samples(texts, encode, num_samples=10, seq_len=5, bos_id=1))
    assert [p.shape for p in packed] == [(1, 5)] * 5  # 21 chars -> five windows of 4 + BOS
    assert packed[0].tolist() == [[1, *encode("abcd")]]
    assert packed[1].tolist() == [[1, *encode("efgh")]]
    docs = list(calibration_samples(texts, encode, num_samples=2, seq_len=5, pack=False))
    assert [d.tolist() for d in docs] == [[encode("abcde")], [encode("ghij")]]
    with pytest.raises(ValueError, match="seq_len=1"):
        list(calibration_samples(texts, encode, num_samples=1, seq_len=1))


def test_block_influence_on_wikitext_with_the_llama2_tokenizer(shared_data: Path) -> None:
    sentencepiece = pytest.importorskip("sentencepiece")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(shared_data / "tokenizers" / "llama2-32k.model"))
    lines = (shared_data / "wikitext-2" / "valid.txt").read_text().splitlines()
    samples = list(calibration_samples(lines, sp.encode, num_samples=4, seq_len=64, bos_id=sp.bos_id()))
    assert len(samples) == 4 and all(s.shape == (1, 64) for s in samples)
    assert sp.decode(samples[0][0, 1:].tolist()).strip()[:10] in " ".join(lines)
    model = tiny_model("llama2", num_layers=3, hidden=32, vocab=sp.get_piece_size())
    res = compute_importance(model, samples, progress=False)
    assert res.num_tokens == 256
    assert all(0.0 < s < 2.0 for s in res.scores)
