"""A compact checkpoint explains itself: the README.md model card and config.json's load hint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import flexigpt.shared  # noqa: F401  (registers the format with the Auto classes)
from flexigpt.shared.engine.apply import apply_plan, materialize, stored_param_count
from flexigpt.shared.engine.autoclass import LOAD_HINT
from flexigpt.shared.engine.card import dense_param_count
from flexigpt.shared.engine.checkpoint import load_compact, save_compact
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model

TOKENS = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))


def _grown() -> torch.nn.Module:
    """5 slots over 4 blocks: block 1 runs twice, the copy with adapters (k at rank 2) and own norms."""
    ad = AdapterSpec(4, ("q", "k", "down"), init="lora", rank_pattern={"k": 2})
    plan = Plan(
        "llama",
        4,
        (SlotSpec(0), SlotSpec(1), SlotSpec(1, adapter=ad, own_norms=True), SlotSpec(2), SlotSpec(3)),
    )
    model = apply_plan(tiny_model("llama3"), plan)
    with torch.no_grad():  # a trained-looking adapter, so that merging it changes the weights
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_card_names_the_counts_the_slot_map_and_its_lines_load_the_model(tmp_path: Path) -> None:
    model = _grown()
    save_compact(model, tmp_path / "grown")
    card = (tmp_path / "grown" / "README.md").read_text()
    stored, dense = stored_param_count(model), dense_param_count(model)
    assert dense == sum(p.numel() for p in materialize(model).parameters())
    assert f"| stored here (each block once) | {stored:,} |" in card
    assert f"| dense (materialised: one private block per slot, adapters merged) | {dense:,} |" in card
    assert "flexigpt compact shared-block model" in card and "`LlamaForCausalLM`" in card
    assert "5 slots over 4 physical blocks of a 4-block source (removed blocks: none)" in card
    assert "| 1 | 1 | stores it | - | - | - |" in card
    assert (
        "| 2 | 1 | reuses it (stored with slot 1) | rank 4 on q, k, down, k: rank 2 (init lora) | - | yes |"
        in card
    )
    assert "pip install flexigpt" in card
    # The card's own lines, run as they stand beside the directory: load, then the plain export.
    load, export = _python_blocks(card)
    assert "import flexigpt.shared" in load
    probe = "\nprint(type(model).__name__, sum(p.numel() for p in model.parameters()))\n"
    done = _run(load + probe + export, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [type(model).__name__, str(stored)]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "grown-plain", attn_implementation="eager")
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in plain.parameters()) == dense
    with torch.no_grad():
        torch.testing.assert_close(plain(TOKENS).logits, model(TOKENS).logits, atol=1e-5, rtol=1e-4)


def test_output_norms_have_no_plain_export_and_a_loaded_model_writes_the_same_card(tmp_path: Path) -> None:
    plan = Plan(
        "qwen2",
        4,
        (
            SlotSpec(0),
            SlotSpec(0, adapter=AdapterSpec(4, init="svd", svd_from=1), out_norm=OutNormSpec(0.01)),
            SlotSpec(2),
            SlotSpec(3),
        ),
    )
    model = apply_plan(tiny_model("qwen2"), plan)
    save_compact(model, tmp_path / "pruned")
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "(removed blocks: 1)" in card
    assert (
        "| 1 | 0 | reuses it (stored with slot 0) | rank 4 on q, k, v, o, gate, up, down (init svd from block 1)"
        in card
    )
    assert "yes (gamma 0.01 at the start)" in card
    assert "Slot 1 has output feature norms" in card and "keep_output_norm=True" in card
    assert len(_python_blocks(card)) == 1, "no plain-export lines for a model that has no plain export"
    assert f"{stored_param_count(model):,}" in card
    save_compact(load_compact(tmp_path / "pruned"), tmp_path / "again" / "pruned")
    assert (tmp_path / "again" / "pruned" / "README.md").read_text() == card


def test_config_tells_a_reader_what_to_install(tmp_path: Path) -> None:
    save_compact(_grown(), tmp_path / "ckpt")
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert raw["how_to_load"] == LOAD_HINT
    assert "pip install flexigpt" in LOAD_HINT and "import flexigpt.shared" in LOAD_HINT
    # transformers without the import does not know the format; with it, the field round-trips.
    bare = _run("from transformers import AutoConfig\nAutoConfig.from_pretrained('ckpt')", tmp_path)
    assert bare.returncode != 0 and "does not recognize this architecture" in bare.stderr
    assert AutoConfig.from_pretrained(tmp_path / "ckpt").how_to_load == LOAD_HINT
