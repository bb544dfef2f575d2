"""The output norm added after a first recovery phase (``prune.replace.norm_after``): the phases share
one schedule and one data stream, the norms start at the trained slots' scale, reruns resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexigpt.prune.cli import main
from flexigpt.shared.engine.apply import add_output_norms, apply_plan
from flexigpt.shared.engine.checkpoint import load_compact
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, PlanError, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model

from ..conftest import prune_overrides

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPE = str(REPO_ROOT / "recipes" / "prune" / "local-tiny.yaml")
LATE = ("prune.variants=[flexigpt]", "prune.replace.gamma=measured", "data.trace=true")


def _prune(ws: dict[str, Path], out: Path, *extra: str) -> int:
    return main([RECIPE, *prune_overrides(ws, out, *extra)])


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lrs(run: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return {e.step: e.value for e in EventAccumulator(str(run / "tb")).Reload().Scalars("train/lr")}


def test_added_norms_equal_a_fresh_build_of_the_norm_plan():
    torch.manual_seed(0)
    source = tiny_model("llama2", num_layers=4, hidden=32).eval()
    lora = AdapterSpec(rank=4, targets=("q", "down"), init="lora")
    base = (SlotSpec(block=0), SlotSpec(block=1))
    plain = Plan("llama", 4, (*base, SlotSpec(block=1, adapter=lora), SlotSpec(block=3)))
    norm = OutNormSpec(gamma=0.5, eps=1e-5)
    normed = Plan("llama", 4, (*base, SlotSpec(block=1, adapter=lora, out_norm=norm), SlotSpec(block=3)))
    model = apply_plan(source, plain)
    fresh = apply_plan(source, normed)
    fresh.load_state_dict(model.state_dict(), strict=False)  # the same adapters
    add_output_norms(model, normed)
    assert model.plan.to_dict() == normed.to_dict()
    assert sorted(model.state_dict()) == sorted(fresh.state_dict())
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    other = Plan("llama", 4, (*normed.slots[:3], SlotSpec(block=2)))
    with pytest.raises(PlanError, match=r"slots\[3\]"):
        add_output_norms(apply_plan(source, plain), other)


def test_late_norm_continues_one_schedule_and_one_data_stream(prune_workspace, tmp_path, capsys):
    late, plain = tmp_path / "late", tmp_path / "plain"
    assert _prune(prune_workspace, late, *LATE, "prune.replace.norm_after=2") == 0
    text = capsys.readouterr().out
    v = late / "flexigpt"
    # built and measured without norms; phase 1 stops at step 2 with a checkpoint and no export
    assert all(s.out_norm is None for s in Plan.load(v / "initial" / "plan.json").slots)
    assert (v / "phase1" / "checkpoints" / "step_00000002").is_dir() and not (v / "phase1" / "final").exists()
    assert "stopped at step 2 of 4" in text and "output norms added after step_00000002" in text
    # the norms start at the trained slots' own scale: the gamma-text perplexity barely moves
    record = json.loads((v / "gamma_late.json").read_text())
    before, after = record["gamma_text_ppl"]["without_norms"], record["gamma_text_ppl"]["with_norms"]
    assert record["gamma"] == "measured" and record["measured_mean"] > 0
    assert abs(after - before) / before < 0.1, record
    normed = load_compact(v / "initial_normed")
    removed = [i for i, s in enumerate(normed.plan.slots) if s.adapter is not None]
    assert removed and all(normed.plan.slots[i].out_norm is not None for i in removed)
    # phase 2 resumed at step 2 and ran to the end of the same schedule
    assert "at step 2" in text
    final = load_compact(v / "final")
    assert final.plan.to_dict() == normed.plan.to_dict()
    state = json.loads((v / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4

    # an uninterrupted run from the same start consumes the same batches in the same order
    assert (
        _prune(prune_workspace, plain, *LATE, "prune.replace.out_norm=false", "prune.replace.gamma=0.01") == 0
    )
    capsys.readouterr()
    one = _trace(plain / "flexigpt" / "data_trace.rank0.jsonl")
    two = _trace(v / "phase1" / "data_trace.rank0.jsonl") + _trace(v / "data_trace.rank0.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one] and [r["seqs"] for r in two] == [
        r["seqs"] for r in one
    ]
    assert _lrs(plain / "flexigpt") == {**_lrs(v / "phase1"), **_lrs(v)}  # one schedule: steps 2 and 4
    assert (
        state["tokens_seen"]
        == json.loads(
            (plain / "flexigpt" / "checkpoints" / "step_00000004" / "trainer_state.json").read_text()
        )["tokens_seen"]
    )

    # a rerun trains nothing again; another step is another plan, refused
    stamp = (v / "initial_normed" / "model.safetensors").stat().st_mtime_ns
    assert _prune(prune_workspace, late, *LATE, "prune.replace.norm_after=2") == 0
    assert "recovery phase 1" not in capsys.readouterr().out
    assert (v / "initial_normed" / "model.safetensors").stat().st_mtime_ns == stamp
    assert _prune(prune_workspace, late, *LATE, "prune.replace.norm_after=3") == 2
    assert "was built with another plan" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("prune.replace.norm_after=4",), "must be below train.max_steps=4"),
        (("prune.replace.norm_after=2", "prune.replace.gamma=calibrate"), "gamma a number or 'measured'"),
        (("prune.replace.norm_after=2", "prune.replace.out_norm=false"), "needs out_norm: true"),
        (("prune.replace.norm_after=2", "train.stop_at_step=3"), "train.stop_at_step"),
    ],
)
def test_bad_late_norm_settings_are_refused(prune_workspace, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert _prune(prune_workspace, out, *extra) == 2
    assert message in capsys.readouterr().err and not out.exists()
