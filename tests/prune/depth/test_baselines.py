"""The depth-pruning baselines: ReplaceMe, LLM-Streamline, SLEB, reverse order, on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexigpt.prune.depth.baselines import BaselineError, get_baseline
from flexigpt.prune.depth.baselines.common import decoder_layers, hidden_from_args, keep_blocks
from flexigpt.prune.depth.baselines.replaceme import fold_map, range_activations, replaceme, replaceme_map
from flexigpt.prune.depth.baselines.sleb import reverse, sleb
from flexigpt.prune.depth.baselines.streamline import streamline
from flexigpt.shared.engine.tiny import tiny_model


def _samples(n: int = 6, t: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 120, (1, t), generator=g) for _ in range(n)]


def _with_known_map(model, start: int, n: int, t_true: torch.Tensor) -> list:
    """Hooks that make the range start..start+n-1 compute exactly Y - M + M T_true."""
    stack = decoder_layers(model)
    seen: dict[str, torch.Tensor] = {}
    h1 = stack[start - 1].mlp.down_proj.register_forward_hook(lambda _m, _a, o: seen.__setitem__("m", o))
    h2 = stack[start].register_forward_pre_hook(
        lambda _m, a, k: seen.__setitem__("y", hidden_from_args(a, k)), with_kwargs=True
    )
    h3 = stack[start + n - 1].register_forward_hook(
        lambda _m, _a, _k, _o: seen["y"] - seen["m"] + seen["m"] @ t_true, with_kwargs=True
    )
    return [h1, h2, h3]


def test_replaceme_least_squares_recovers_a_known_map() -> None:
    model = tiny_model("llama2", num_layers=6, hidden=32, heads=4)
    g = torch.Generator().manual_seed(1)
    t_true = torch.eye(32) + 0.3 * torch.randn(32, 32, generator=g)
    handles = _with_known_map(model, 2, 2, t_true)
    try:
        t = replaceme_map(model, _samples(8), 2, 2)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(t, t_true, atol=1e-3), (t - t_true).abs().max()
    # the map is not the identity the plain removal would use
    assert (t_true - torch.eye(32)).abs().max() > 0.1


def test_replaceme_folded_model_is_plain_and_equals_the_unfolded_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model("llama3", num_layers=6, hidden=32, heads=4)
    samples = _samples(6)
    res = replaceme(model, samples, 2, objective="lstsq")
    start = res.notes["start"]
    assert res.removed == [start, start + 1] and start >= 1
    assert res.model.config.num_hidden_layers == 4
    acts = range_activations(model, samples, start, 2)
    assert res.notes["cosine_loss_folded"] < res.notes["cosine_loss_dropped"]
    # unfolded: the blocks dropped, the map applied by a hook on the MLP output of the block before
    from flexigpt.prune.depth.baselines.replaceme import lstsq_map

    t = lstsq_map(acts)
    unfolded = keep_blocks(model, res.removed)
    hook = decoder_layers(unfolded)[start - 1].mlp.down_proj.register_forward_hook(lambda _m, _a, o: o @ t)
    ids = samples[0]
    with torch.no_grad():
        want = unfolded(input_ids=ids).logits
    hook.remove()
    res.model.save_pretrained(tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager").eval()
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.num_hidden_layers == 4
    with torch.no_grad():
        got = plain(input_ids=ids).logits
        again = res.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, want, atol=1e-4, rtol=1e-4)
    # a KV-cache generation runs on the shorter stack
    out = plain.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
    assert out.shape[1] == ids.shape[1] + 3


def test_replaceme_cosine_does_not_raise_the_cosine_loss() -> None:
    model = tiny_model("llama2", num_layers=5, hidden=32, heads=4)
    res = replaceme(model, _samples(4), 1, objective="cosine", steps=30, lr=1e-3)
    first, last = res.notes["cosine_loss"]
    assert last <= first + 1e-6


def test_fold_map_with_identity_changes_nothing() -> None:
    model = tiny_model("qwen2", num_layers=3, hidden=32, heads=4)
    ids = _samples(1)[0]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fold_map(model, 1, torch.eye(32))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(before, after)


def test_streamline_training_lowers_the_hidden_state_mse_and_saves(tmp_path: Path) -> None:
    model = tiny_model("llama2", num_layers=6, hidden=32, heads=4)
    res = streamline(model, _samples(6), 2, steps=40, lr=1e-3)
    before, after = res.notes["mse"]
    assert after < before
    assert res.model.config.num_hidden_layers == 4
    lo, hi = res.notes["range"]
    assert hi - lo == 2 and None in res.layers
    ids = _samples(1, seed=5)[0]
    res.model.save_pretrained(tmp_path / "s")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "s", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, res.model(input_ids=ids).logits)
    # the source is untouched
    assert len(decoder_layers(model)) == 6


def test_sleb_removes_the_blocks_that_cost_least_perplexity() -> None:
    from flexigpt.shared.evaluate.perplexity import sample_perplexity

    model = tiny_model("llama2", num_layers=5, hidden=32, heads=4)
    samples = _samples(3)
    res = sleb(model, samples, 2)
    # each step's pick is the removal with the lowest perplexity of the model as it then is
    first = {b: sample_perplexity(keep_blocks(model, [b]), samples).ppl for b in range(5)}
    assert res.notes["order"][0] == min(first, key=first.get)
    p0 = res.notes["order"][0]
    second = {b: sample_perplexity(keep_blocks(model, [p0, b]), samples).ppl for b in range(5) if b != p0}
    assert res.notes["order"][1] == min(second, key=second.get)
    assert res.notes["steps"][1]["ppl"] == pytest.approx(second[res.notes["order"][1]], rel=1e-4)
    assert len(res.notes["steps"][1]["candidates"]) == 4  # re-scored without the first pick
    assert res.model.config.num_hidden_layers == 3
    assert res.removed == sorted(res.notes["order"])


def test_reverse_removes_below_the_last_and_names_the_tuned_layers() -> None:
    model = tiny_model("llama2", num_layers=6, hidden=32, heads=4)
    res = reverse(model, 2, tune_layers=3)
    assert res.removed == [3, 4] and res.layers == [0, 1, 2, 5]
    assert res.train == {"trainable": "all", "trainable_layers": [1, 2, 3], "trainable_head": True}
    with pytest.raises(BaselineError, match="tune_layers"):
        reverse(model, 2, tune_layers=5)


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(BaselineError, match="replaceme"):
        get_baseline("nope")


@pytest.mark.parametrize("arch", ["llama2", "llama3", "mistral", "qwen2", "opt"])
def test_keep_blocks_equals_skipping_them_and_round_trips(arch: str, tmp_path: Path) -> None:
    from flexigpt.prune.depth.baselines.sleb import _skip

    model = tiny_model(arch, num_layers=5, hidden=32, heads=4)
    ids = _samples(1, t=20)[0]
    handles = [decoder_layers(model)[b].register_forward_hook(_skip, with_kwargs=True) for b in (1, 3)]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    short = keep_blocks(model, [1, 3])
    assert [layer.self_attn.layer_idx for layer in decoder_layers(short)] == [0, 1, 2]
    if getattr(model.config, "layer_types", None):
        assert short.config.layer_types == [model.config.layer_types[b] for b in (0, 2, 4)]
    with torch.no_grad():
        torch.testing.assert_close(short(input_ids=ids).logits, want)
    short.save_pretrained(tmp_path / arch)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / arch, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want)
    cached = back.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    plain = back.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    assert len(decoder_layers(model)) == 5  # the source keeps its blocks
