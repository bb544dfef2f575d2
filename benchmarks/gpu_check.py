"""GPU checks that the CPU test suite cannot make: NCCL, bf16, ZeRO-3 with shared parameters.

Trains the same tiny shared-block model (4 blocks, 6 slots: blocks 1 and 2 run twice) with the
real ``flexigpt.shared.train`` command under several DeepSpeed configs, every parameter trainable,
so the shared blocks get gradients from two slots each. Then compares the exported weights:
ZeRO-3 partitions parameters, and a shared Parameter that got the gradient of only one of its
slots would end up different from the ZeRO-2 run. Prints one line per run and the comparison.

    python benchmarks/gpu_check.py                  # on a GPU machine (falls back to CPU/gloo)
    python benchmarks/gpu_check.py --steps 20 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # the tiny workspace builders live with the tests

from flexigpt.shared.engine.checkpoint import load_compact  # noqa: E402
from tests.shared.train.trainkit import recipe_dict, workspace, write_recipe  # noqa: E402


def run(
    root: Path, ws: dict, name: str, ds_config: str, precision: str, steps: int
) -> tuple[Path, list[float]]:
    out = root / name
    r = recipe_dict(
        ws,
        out,
        trainable="all",
        ds_config=f"ds_configs/{ds_config}.json",
        precision=precision,
        max_steps=steps,
        checkpoint_every=steps,
        log_every=1,
        export="compact",
        lr=3e-3,
    )
    path = write_recipe(root / f"{name}.yaml", r)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "flexigpt.shared.train", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"{name}: train exited {proc.returncode}")
    losses = _losses(out)
    return out, losses


def _losses(out: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for logdir in sorted(out.rglob("events.out.tfevents*")):
        acc = EventAccumulator(str(logdir.parent))
        acc.Reload()
        tags = [t for t in acc.Tags()["scalars"] if t.endswith("loss") and "eval" not in t]
        if tags:
            return [e.value for e in acc.Scalars(tags[0])]
    return []


def _final_model(out: Path) -> Path:
    candidates = [p.parent for p in out.rglob("plan.json") if (p.parent / "model.safetensors").is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--precision", default="bf16", help="precision of the extra ZeRO-3 run (bf16 | fp16)")
    args = ap.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (gloo)"
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ws = workspace(root / "ws")
    results = {}
    runs = [("zero2_fp32", "zero2", "fp32"), ("zero3_fp32", "zero3", "fp32")]
    if torch.cuda.is_available():
        runs.append((f"zero3_{args.precision}", "zero3", args.precision))
    for name, cfg, prec in runs:
        out, losses = run(root, ws, name, cfg, prec, args.steps)
        results[name] = (out, losses)
        print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} logged steps ({device})")
    a = load_compact(_final_model(results["zero2_fp32"][0]))
    b = load_compact(_final_model(results["zero3_fp32"][0]))
    worst = {}
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        worst[n] = (p.float() - q.float()).abs().max().item()
    shared_name = "model.layers.1.mlp.up_proj.weight"
    summary = {
        "device": device,
        "max_abs_diff_zero2_vs_zero3_fp32": max(worst.values()),
        "shared_block_param_diff": worst.get(shared_name),
        "losses": {k: v[1] for k, v in results.items()},
    }
    print(json.dumps(summary, indent=1))
    ok = summary["max_abs_diff_zero2_vs_zero3_fp32"] < 1e-4 and all(
        v[1][-1] < v[1][0] for v in results.values()
    )
    print(f"ZeRO-3 with shared parameters {'matches' if ok else 'DOES NOT match'} ZeRO-2 ({device})")


if __name__ == "__main__":
    main()
