"""Exports carry the sentencepiece tokenizer.model when the source tokenizer had one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoTokenizer

from flexigpt.shared.engine.apply import apply_plan
from flexigpt.shared.engine.checkpoint import export_materialized, save_compact
from flexigpt.shared.engine.peft_export import export_peft
from flexigpt.shared.engine.plan import AdapterSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model
from flexigpt.shared.engine.tokenizer_files import save_tokenizer

from ...kit import write_tokenizer

TEXT = "The cat sat on the mat.\nThen it ran  away, 42 times."


def _sp_tokenizer(shared_data: Path, d: Path):
    """The LLaMA-2 sentencepiece tokenizer, loaded as transformers loads a hub LLaMA directory."""
    d.mkdir()
    shutil.copy(shared_data / "tokenizers" / "llama2-32k.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return AutoTokenizer.from_pretrained(d)


def test_every_export_keeps_the_sentencepiece_model(shared_data, tmp_path):
    tok = _sp_tokenizer(shared_data, tmp_path / "src")
    sp_bytes = (tmp_path / "src" / "tokenizer.model").read_bytes()
    plan = Plan("llama", 4, (SlotSpec(0, adapter=AdapterSpec(4)), SlotSpec(2), SlotSpec(3)))
    model = apply_plan(tiny_model("llama2"), plan)
    # compact, then a tokenizer loaded back from the compact directory, then the plain export
    save_compact(model, tmp_path / "compact", tokenizer=tok)
    again = AutoTokenizer.from_pretrained(tmp_path / "compact")
    export_materialized(model, tmp_path / "plain", tokenizer=again)
    base, _ = export_peft(model, tmp_path / "peft", tokenizer=again)
    for d in (tmp_path / "compact", tmp_path / "plain", base):
        assert (d / "tokenizer.model").read_bytes() == sp_bytes, d
        assert (d / "tokenizer.json").is_file()
        # the exported tokenizer encodes as the source does
        assert AutoTokenizer.from_pretrained(d)(TEXT).input_ids == tok(TEXT).input_ids


def test_a_tokenizer_without_sentencepiece_model_gets_none(tmp_path):
    tok = AutoTokenizer.from_pretrained(write_tokenizer(tmp_path / "word"))
    written = save_tokenizer(tok, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json") in written
    assert not (tmp_path / "out" / "tokenizer.model").exists()
