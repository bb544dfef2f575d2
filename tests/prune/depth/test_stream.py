"""prune.memory: per_block gives what the whole-model path gives, with one block in memory at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from flexigpt.prune.cli import main
from flexigpt.prune.depth.importance import compute_importance
from flexigpt.shared.engine.apply import SOURCE_CLASSES
from flexigpt.shared.engine.checkpoint import load_compact
from flexigpt.shared.engine.stream import StreamedSource, is_placeholder
from flexigpt.shared.engine.tiny import tiny_model

from ..conftest import prune_overrides

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(REPO_ROOT / "recipes" / "prune" / "local-tiny.yaml")
VARIANTS = ("flexigpt", "shortgpt", "shortgpt_lora")


def _prune(ws: dict[str, Path], out: Path, *extra: str) -> int:
    return main([RECIPE, *prune_overrides(ws, out, "--prune-only", *extra)])


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def both_runs(prune_workspace, tmp_path_factory) -> tuple[Path, Path]:
    """The same recipe (three variants, gamma calibrated) run whole and per block."""
    root = tmp_path_factory.mktemp("stream")
    extra = ("prune.replace.gamma=calibrate",)
    assert _prune(prune_workspace, root / "whole", *extra) == 0
    assert _prune(prune_workspace, root / "per_block", "prune.memory=per_block", *extra) == 0
    return root / "whole", root / "per_block"


def test_per_block_run_gives_the_whole_runs_scores_picks_and_perplexities(both_runs):
    whole, streamed = both_runs
    a, b = (json.loads((d / "importance.json").read_text()) for d in both_runs)
    assert a["num_samples"] == b["num_samples"] and a["num_tokens"] == b["num_tokens"]
    assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
    assert (
        json.loads((whole / "selection.json").read_text())["picks"]
        == (json.loads((streamed / "selection.json").read_text())["picks"])
    )
    for rel in ["source_ppl.json", *(f"{v}/start_ppl.json" for v in VARIANTS), "flexigpt/gamma.json"]:
        x, y = (json.loads((d / rel).read_text()) for d in both_runs)
        if rel.endswith("gamma.json"):
            assert x["gamma"] == y["gamma"]
            assert [p for _, p in x["table"]] == pytest.approx([p for _, p in y["table"]], rel=1e-5)
        else:
            assert x["result"]["ppl"] == pytest.approx(y["result"]["ppl"], rel=1e-5), rel


def test_per_block_checkpoints_hold_the_whole_runs_tensors_bit_for_bit(both_runs):
    whole, streamed = both_runs
    for v in VARIANTS:
        assert (whole / v / "plan.json").read_text() == (streamed / v / "plan.json").read_text()
        x, y = _tensors(whole / v / "initial"), _tensors(streamed / v / "initial")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), v
        m = load_compact(streamed / v / "initial")  # the per-block files load as a compact model
        assert m.plan.to_dict() == load_compact(whole / v / "initial").plan.to_dict()
    plain = [AutoModelForCausalLM.from_pretrained(d / "shortgpt" / "initial_plain") for d in both_runs]
    sa, sb = (p.state_dict() for p in plain)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ca, cb = ({k: v for k, v in p.config.to_dict().items() if k != "_name_or_path"} for p in plain)
    assert ca == cb


def test_streamed_forward_holds_one_block_and_scores_as_the_whole_model(tmp_path):
    model = tiny_model("llama3", num_layers=4)  # GQA, tied embeddings
    model.save_pretrained(tmp_path / "src")
    samples = [torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    src = StreamedSource(tmp_path / "src", model.config, SOURCE_CLASSES["llama"], torch.float32)
    blocks = src.model.model.layers
    assert all(is_placeholder(p) for layer in blocks for p in layer.parameters() if p.dim() == 2)
    seen: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda *_: seen.append(len(src.materialized_blocks))) for layer in blocks
    ]
    for metric in ("block_influence", "angular_distance", "ppl_drop"):
        want = compute_importance(model, samples, metric, progress=False)
        with src.forward(src.model):
            got = compute_importance(src.model, samples, metric, progress=False)
        assert got.scores == pytest.approx(want.scores, abs=1e-6), metric
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {1} and src.max_materialized == 1
    assert not src.materialized_blocks  # every block given back
    ids = samples[0]
    with src.forward(src.model):
        assert torch.allclose(src.model(ids).logits, model(ids).logits, atol=1e-5)


def test_per_block_refuses_what_would_load_the_whole_model(prune_workspace, tmp_path, capsys):
    assert (
        _prune(prune_workspace, tmp_path / "a", "prune.memory=per_block", "prune.selection.read_from=model")
        == 2
    )
    err = capsys.readouterr().err
    assert "prune.selection.read_from" in err and "per_block" in err and "Traceback" not in err
    assert _prune(prune_workspace, tmp_path / "b", "prune.memory=blockwise") == 2
    err = capsys.readouterr().err
    assert "prune.memory" in err and "per_block" in err and "whole" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_per_block_refuses_a_source_without_safetensors(prune_workspace, tmp_path, capsys):
    src = tmp_path / "bin-model"
    model = tiny_model("llama2", num_layers=3, hidden=32, heads=2, vocab=512)
    model.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")  # the older weights format only
    (src / "model.safetensors").unlink()
    assert not list(src.glob("*.safetensors"))
    out = tmp_path / "out"
    code = _prune(
        prune_workspace,
        out,
        "prune.memory=per_block",
        f"model.source={src}",
        "model.allow_pickle_weights=true",
    )
    err = capsys.readouterr().err
    assert code == 2 and "prune.memory='per_block'" in err and "safetensors" in err and "Traceback" not in err
    assert not out.exists()


def test_randomized_svd_init_reproduces_a_low_rank_difference():
    from flexigpt.shared.engine.adapters import init_lora, make_lora

    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(48, 40, bias=False)
    target = base.weight.detach() + torch.randn(40, 4, generator=g) @ torch.randn(4, 48, generator=g)
    deltas = {}
    for mode in ("svd", "svd_randomized"):
        lora = make_lora(base, 8, None)
        init_lora(lora, mode, target)
        deltas[mode] = lora.delta_weight()
    want = target - base.weight.detach()
    assert torch.allclose(deltas["svd"], want, atol=1e-5)
    assert torch.allclose(deltas["svd_randomized"], want, atol=1e-4)


def test_per_block_rerun_measures_a_saved_variant_without_loading_it_whole(
    both_runs, prune_workspace, tmp_path, capsys
):
    _, streamed = both_runs
    out = tmp_path / "again"
    shutil.copytree(streamed, out)
    want = json.loads((out / "flexigpt" / "start_ppl.json").read_text())["result"]["ppl"]
    (out / "flexigpt" / "start_ppl.json").unlink()
    capsys.readouterr()
    assert _prune(prune_workspace, out, "prune.memory=per_block", "prune.replace.gamma=calibrate") == 0
    assert "[flexigpt] " in (text := capsys.readouterr().out) and "not saved again" in text
    got = json.loads((out / "flexigpt" / "start_ppl.json").read_text())["result"]["ppl"]
    assert got == pytest.approx(want, rel=1e-6)
