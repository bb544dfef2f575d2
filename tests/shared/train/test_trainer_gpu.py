"""The trainer on a GPU (opt in: ``pytest -m gpu``): NCCL, bf16 picked by precision=auto, MFU
logged, ZeRO-2 and ZeRO-3 train a shared-block model, resume continues, export reads bf16 runs;
AdamW is the fused kernel by default there, and compiled slots train like eager ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flexigpt.shared.recipe import recipe_from_dict
from flexigpt.shared.train.trainer import train

from .trainkit import recipe_dict, workspace

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _scalars(tb: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(tb)).Reload().Scalars(tag)]


@pytest.mark.parametrize("stage", ["2", "3"])
def test_gpu_bf16_training_resume_and_export(stage: str, tmp_path: Path) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    os.environ.pop("DS_ACCELERATOR", None)  # let DeepSpeed pick CUDA
    ws = workspace(tmp_path / "ws")
    kw = {
        "ds_config": f"ds_configs/zero{stage}.json",
        "trainable": "all",
        "lr": 3e-3,
        "log_every": 1,
        "precision": "auto",
    }
    out = tmp_path / "run"
    first = train(recipe_from_dict(recipe_dict(ws, out, max_steps=8, checkpoint_every=4, **kw)))
    assert dist.get_backend() == "nccl" and first.step == 8
    again = train(
        recipe_from_dict(recipe_dict(ws, out, max_steps=16, checkpoint_every=4, export="compact", **kw))
    )
    assert again.step == 16 and again.tokens_seen == 16 * 4 * 32
    loss = _scalars(out / "tb", "train/loss")
    assert len(loss) == 16 and sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.3, loss
    mfu = _scalars(out / "tb", "perf/mfu")
    assert len(mfu) == 16 and all(0 < m < 1 for m in mfu)
    model = AutoModelForCausalLM.from_pretrained(again.exported[0])
    assert model.dtype == torch.bfloat16 and model.plan.num_slots == 6
    x = torch.arange(4, 36).view(1, 32)
    assert torch.isfinite(model(x).logits.float()).all()


def test_gpu_fused_adamw_by_default_and_compiled_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """optimizer_impl: auto runs the fused kernel on CUDA; compiled slots train like eager ones in bf16."""
    os.environ.pop("DS_ACCELERATOR", None)
    calls = []
    kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ws = workspace(tmp_path / "ws")
    kw = {"trainable": "all", "lr": 3e-3, "log_every": 1, "max_steps": 4, "checkpoint_every": 4}
    eager = train(recipe_from_dict(recipe_dict(ws, tmp_path / "eager", **kw)))
    assert eager.step == 4 and len(calls) == 8  # two parameter groups, four steps
    compiled = train(recipe_from_dict(recipe_dict(ws, tmp_path / "compiled", compile=True, **kw)))
    assert compiled.step == 4
    loss_e, loss_c = (
        _scalars(tmp_path / "eager" / "tb", "train/loss"),
        _scalars(tmp_path / "compiled" / "tb", "train/loss"),
    )
    assert loss_c == pytest.approx(loss_e, rel=2e-2), (loss_e, loss_c)  # bf16 kernels differ in rounding
