"""The shipped DeepSpeed configs leave to the recipe what the recipe says (docs/deployment.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexigpt.shared.train.ds_config import BATCH_KEYS, load_ds_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_batch_clipping_and_precision_are_auto(path: Path) -> None:
    raw = load_ds_config(path)
    assert {k: raw[k] for k in (*BATCH_KEYS, "gradient_clipping")} == dict.fromkeys(
        (*BATCH_KEYS, "gradient_clipping"), "auto"
    )
    assert raw["bf16"]["enabled"] == "auto" and raw["fp16"]["enabled"] == "auto"
