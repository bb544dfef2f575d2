"""benchmarks/gpu_bench.py: every part runs on the CPU with --tiny and writes each figure with its setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_bench.py"
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(var, None)

TRAINED = ("grown 22->36 (shared blocks)", "dense 36 layers", "base 22 layers")
ENGINE = (
    "shared/dense step time, all trainable",
    "shared/dense step time, adapters+norms trainable",
    "in-GEMM/autograd gradient sum step time",
    "shared/export inference time",
    "peak memory",
)
SPECULATIVE = ("TinyLlama 22->36 grown", "LLaMA-2-7B shape, 10 of 32 blocks pruned")


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_tiny_run_writes_every_figure_with_its_setting(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _run(tmp_path, "--tiny", "--out", str(out), "--peak-tflops", "1", "--budget-s", "1200")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    figures = {f["name"]: f for f in data["figures"]}
    want = [f"{m} {what}" for m in TRAINED for what in ("tokens/s", "MFU", "peak memory")]
    want += [f"{n} (hidden 64)" for n in ENGINE]
    want += [
        f"{s} {what}"
        for s in SPECULATIVE
        for what in ("speed-up over generate", "speed-up over generate, batch 4", "peak memory")
    ]
    want += [f"ZeRO-{s} largest micro batch that trains" for s in (2, 3)]
    assert sorted(want) == sorted(figures), sorted(set(want) ^ set(figures))
    for name, f in figures.items():
        assert f["setting"]["device"] == "cpu", name
        if "peak memory" in name:
            assert f["value"] is None  # no GPU: nothing to read, and nothing made up
        else:
            assert isinstance(f["value"], (int, float)) and f["value"] > 0, (name, f["value"])
        assert f"[{f['part']}] {name}:" in proc.stdout  # one printed line per figure
    for m in TRAINED:
        s = figures[f"{m} tokens/s"]["setting"]
        assert s["seq_len"] == 32 and s["micro_batch"] == 2 and s["flops_per_token"] > 0
    assert figures[f"{TRAINED[0]} tokens/s"]["setting"]["trainable"] == "adapters+norms"
    assert figures["ZeRO-3 largest micro batch that trains"]["setting"]["stopped"] == "ladder done"
    for s in SPECULATIVE:
        for batch, suffix in ((1, ""), (4, ", batch 4")):
            setting = figures[f"{s} speed-up over generate{suffix}"]["setting"]
            assert setting["batch"] == batch and setting["tokens_identical_to_generate"] is True
            assert setting["mean_row_prefix"] >= setting["mean_accepted_prefix"] >= 0
    assert data["skipped"] == []  # the budget fits every part, batch 4 included


def _load_script():  # noqa: ANN202 - the script is no package: load it by its path, in this process
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_part_out_of_time_is_recorded_as_skipped_and_bad_parts_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bench = _load_script()
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--out", str(out), "--parts", "engine", "--budget-s", "0.001"]) == 0
    data = json.loads(out.read_text())
    assert data["figures"] == []
    assert [(s["part"], s["what"]) for s in data["skipped"]] == [("engine", "hidden 64")]
    assert "time box" in data["skipped"][0]["why"]

    capsys.readouterr()
    assert bench.main(["--tiny", "--out", str(tmp_path / "bad.json"), "--parts", "engine,warp"]) == 2
    assert "--parts: unknown ['warp']" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()
