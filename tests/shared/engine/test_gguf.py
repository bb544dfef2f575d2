"""GGUF: llama.cpp's converter turns a materialised export into a GGUF that transformers loads back.

Opt-in: llama.cpp's ``convert_hf_to_gguf.py`` is not a pip package. Point ``LLAMA_CPP_DIR`` at a
llama.cpp checkout (or ``LLAMA_CPP_CONVERT`` at the script) and install its ``gguf`` package
(``pip install gguf``, or ``pip install -e $LLAMA_CPP_DIR/gguf-py``); the test skips, saying
which is missing, otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexigpt.shared.engine.apply import apply_plan
from flexigpt.shared.engine.checkpoint import export_materialized
from flexigpt.shared.engine.plan import AdapterSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model

TEXT = "The cat sat on the mat. Then it ran away."


def _converter() -> Path:
    """The converter script, or skip with the reason."""
    explicit = os.environ.get("LLAMA_CPP_CONVERT")
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get("LLAMA_CPP_DIR"):
        candidates.append(Path(os.environ["LLAMA_CPP_DIR"]) / "convert_hf_to_gguf.py")
    on_path = shutil.which("convert_hf_to_gguf.py")
    if on_path:
        candidates.append(Path(on_path))
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        pytest.skip(
            "llama.cpp's convert_hf_to_gguf.py not found: set LLAMA_CPP_DIR to a llama.cpp checkout "
            "(or LLAMA_CPP_CONVERT to the script) to run the GGUF check"
        )
    if importlib.util.find_spec("gguf") is None:
        pytest.skip(
            "the gguf package is not installed (pip install gguf): transformers needs it to read GGUF"
        )
    return found


def test_a_materialised_export_converts_to_gguf_and_loads_back(shared_data, tmp_path):
    converter = _converter()
    src = tmp_path / "tok"
    src.mkdir()
    shutil.copy(shared_data / "tokenizers" / "llama2-32k.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = AutoTokenizer.from_pretrained(src)
    # a pruned-and-adapted model over the tokenizer's 32k vocabulary: block 1 removed, LoRA merged
    source = tiny_model("llama2", vocab=32000, max_positions=128)
    plan = Plan("llama", 4, (SlotSpec(0, adapter=AdapterSpec(4)), SlotSpec(2), SlotSpec(3)))
    model = apply_plan(source, plan)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    export_materialized(model, tmp_path / "plain", tokenizer=tok)
    gguf = tmp_path / "plain" / "model-f32.gguf"
    proc = subprocess.run(
        [sys.executable, str(converter), str(tmp_path / "plain"), "--outtype", "f32", "--outfile", str(gguf)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    back = AutoModelForCausalLM.from_pretrained(
        tmp_path / "plain", gguf_file=gguf.name, attn_implementation="eager"
    )
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    gguf_tok = AutoTokenizer.from_pretrained(tmp_path / "plain", gguf_file=gguf.name)
    assert gguf_tok(TEXT).input_ids == tok(TEXT).input_ids
