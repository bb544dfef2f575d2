"""Every DeepSpeed config in ds_configs/ is well formed and fills consistently from a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexigpt.shared.recipe import TrainSection
from flexigpt.shared.train.ds_config import (
    BATCH_KEYS,
    DSConfigError,
    build_ds_config,
    check_ds_config,
    find_ds_config,
    load_ds_config,
    zero_stage,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO_ROOT / "ds_configs").glob("*.json"))


def test_the_four_stages_are_shipped() -> None:
    stages = {p.name: zero_stage(load_ds_config(p)) for p in CONFIGS}
    assert {
        "zero1.json": 1,
        "zero2.json": 2,
        "zero3.json": 3,
        "zero3_offload.json": 3,
    }.items() <= stages.items()
    offload = load_ds_config(REPO_ROOT / "ds_configs" / "zero3_offload.json")["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == "cpu" and offload["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("world", [1, 2, 8])
def test_config_fills_batch_arithmetic(path: Path, world: int) -> None:
    raw = load_ds_config(path)
    train = TrainSection(micro_batch=2, global_batch=16 * world, max_steps=1, grad_clip=0.5)
    cfg = build_ds_config(raw, train, world_size=world, precision="fp32")
    micro, accum, total = (cfg[k] for k in BATCH_KEYS)
    assert micro * accum * world == total == 16 * world
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(cfg)
    bf16 = build_ds_config(raw, train, world_size=world, precision="bf16")
    assert bf16["bf16"]["enabled"] is True and bf16["fp16"]["enabled"] is False


def test_numbers_in_a_config_must_agree_with_the_recipe() -> None:
    raw = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}
    check_ds_config(raw)
    train = TrainSection(micro_batch=2, grad_accum=1, max_steps=1)
    with pytest.raises(
        DSConfigError, match=r"train_micro_batch_size_per_gpu=4 disagrees .*train.micro_batch"
    ):
        build_ds_config(raw, train, world_size=1, precision="fp32")
    ok = TrainSection(micro_batch=4, grad_accum=3, max_steps=1)
    assert build_ds_config(raw, ok, world_size=2, precision="fp32")["train_batch_size"] == 24


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (
            {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}},
            "remove the 'optimizer' section",
        ),
        (
            {"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}},
            "remove the 'scheduler' section",
        ),
        ({"zero_optimization": {"stage": 5}}, "stage must be 1, 2 or 3"),
        (
            {"zero_optimization": {"stage": 1}, "steps_per_print": "auto"},
            "'steps_per_print' may not be 'auto'",
        ),
        ({"zero_optimization": {"stage": 1}, "bf16": {"enabled": "yes"}}, "bf16.enabled='yes'"),
        (
            {
                "zero_optimization": {"stage": 1},
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 3,
                "train_batch_size": 8,
            },
            "train_batch_size=8 is not micro",
        ),
    ],
)
def test_bad_configs_are_refused(raw: dict, needle: str) -> None:
    with pytest.raises(DSConfigError, match=needle):
        check_ds_config(raw)


def test_missing_config_lists_the_shipped_ones() -> None:
    with pytest.raises(DSConfigError, match=r"ds_configs/zero2.json"):
        find_ds_config("ds_configs/zero9.json")
