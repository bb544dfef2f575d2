"""Every GPU speed and memory figure of the project in one run, written to one JSON file.

Parts (each time-boxed; what a part could not fit in its box is recorded under ``skipped``):

- ``train``: tokens/s and MFU of the real trainer (``flexigpt.shared.train``, DeepSpeed ZeRO-2 as
  in the recipe) on the TinyLlama 22 -> 36 growth of ``recipes/grow/tinyllama-22to36-block.yaml``
  (its plan, adapters, norms, trainable set, micro batch and sequence length), against the same
  trainer on a dense 36-layer model and on the 22-layer base (every parameter trainable). Weights
  are random, with TinyLlama's config built locally. MFU is the trainer's: tokens/s x the FLOPs
  per token of ``flop_count`` (the work done under the run's trainable set) / the device's peak.
  Tokens/s is the trainer's last logging window (the first window, with warm-up, is left out),
  data pipeline included. AdamW is the trainer's ``optimizer_impl: auto`` (fused on a GPU).
  ``--compile`` adds a fourth run, the grown model with ``train.compile: true``, where it fits the
  part's time box (its estimate includes compilation).
- ``engine``: ``bench_engine.engine_figures`` at hidden 4096 (1 x 2048 tokens) and 2048
  (4 x 1024 tokens): shared over dense training step (``all`` and ``adapters+norms``), in-GEMM
  over autograd gradient summation, and inference over the materialised copy.
- ``speculative``: ``bench_speculative.measure`` (self-speculative decoding over ``generate``,
  identical greedy tokens asserted) at the grown TinyLlama shape and at a LLaMA-2-7B-shaped model
  with 10 of 32 blocks replaced by their neighbours (31 % pruned), batch 1, then batch 4 where the
  time box still holds 1.5 times what batch 1 took.
- ``memory``: the largest micro batch of the grown TinyLlama that trains (two steps of the real
  trainer) under ZeRO-2 and under ZeRO-3, doubling until out of memory or out of time.

Every run records ``torch.cuda.max_memory_allocated`` as its peak. ``--tiny`` runs the same code
with tiny shapes and a few steps on the CPU (a check of the script, not a figure).

    python benchmarks/gpu_bench.py --out gpu_bench.json            # one H100 / H200, budget 540 s
    python benchmarks/gpu_bench.py --tiny --out /tmp/tiny.json     # CPU: about 40 s of CPU time
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # the workspace builders live with the tests, the other benchmarks here
sys.path.append(str(REPO / "benchmarks"))

import bench_speculative as spec  # noqa: E402
from bench_engine import engine_figures  # noqa: E402

from flexigpt.shared.engine.apply import apply_plan  # noqa: E402
from flexigpt.shared.engine.plan import Plan  # noqa: E402
from flexigpt.shared.recipe import load_recipe, recipe_from_dict  # noqa: E402
from tests.shared.train.trainkit import recipe_dict, workspace  # noqa: E402

GROW_RECIPE = REPO / "recipes/grow/tinyllama-22to36-block.yaml"
PARTS = ("train", "engine", "speculative", "memory")
# TinyLlama 1.1B (22 layers) and LLaMA-2-7B, as their config.json files give them
TINYLLAMA = dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, positions=2048)
LLAMA2_7B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000, positions=4096)
TINY = dict(hidden=64, intermediate=176, heads=4, kv_heads=2, vocab=128, positions=256)


class Report:
    """Figures and skips, printed as they come and written to one JSON file at the end."""

    def __init__(self, setting: dict[str, Any]) -> None:
        self.data: dict[str, Any] = {"setting": setting, "figures": [], "skipped": []}

    def figure(self, part: str, name: str, value: Any, unit: str, setting: dict[str, Any]) -> None:
        self.data["figures"].append(
            {"part": part, "name": name, "value": value, "unit": unit, "setting": setting}
        )
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"[{part}] {name}: {shown} {unit} ({json.dumps(setting, default=str)})", flush=True)

    def skip(self, part: str, what: str, why: str) -> None:
        self.data["skipped"].append({"part": part, "what": what, "why": why})
        print(f"[{part}] skipped {what}: {why}", flush=True)

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(path)


class Box:
    """A part's time box: ``fits(s)`` says whether `s` more seconds fit before its deadline."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


@contextlib.contextmanager
def peak_memory(device: str, into: dict[str, Any]) -> Iterator[None]:
    """Inside: one run; afterwards ``into['peak_gpu_memory_gib']`` (None on the CPU) and freed caches."""
    if _cuda(device):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        into["peak_gpu_memory_gib"] = (
            torch.cuda.max_memory_allocated(device) / 2**30 if _cuda(device) else None
        )
        gc.collect()
        if _cuda(device):
            torch.cuda.empty_cache()


def llama_source(shape: dict[str, int], layers: int, device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """A random LLaMA of `shape` built on `device` (nothing is downloaded)."""
    from flexigpt.shared.engine.tiny import tiny_model

    with torch.device(device):
        model = tiny_model(
            "llama3",
            num_layers=layers,
            hidden=shape["hidden"],
            heads=shape["heads"],
            intermediate=shape["intermediate"],
            vocab=shape["vocab"],
            max_positions=shape["positions"],
            num_key_value_heads=shape["kv_heads"],
            tie_word_embeddings=False,
            seed=seed,
        )
    model.config._attn_implementation = "sdpa"
    return model.to(dtype)


def grown_plan(tiny: bool) -> tuple[Plan, Any]:
    """The plan of the shipped TinyLlama 22 -> 36 growth recipe, and the recipe (rank 4 when tiny)."""
    from flexigpt.grow.strategies import build_plan

    recipe = load_recipe(GROW_RECIPE, ["grow.adapter.rank=4"] if tiny else [])
    return build_plan(recipe.grow.strategy, "llama", 22, recipe.grow.options()), recipe


# --------------------------------------------------------------------------------------- trainer
def _last_scalar(tb: Path, tag: str) -> float | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    return acc.Scalars(tag)[-1].value if tag in acc.Tags()["scalars"] else None


def train_once(
    ws: dict[str, Path],
    model: Any,
    trainable: str,
    stage: int,
    micro: int,
    steps: int,
    a: argparse.Namespace,
    **train_kw: Any,
) -> dict[str, Any]:
    """Train `model` `steps` steps with the real trainer; tokens/s and MFU of its last logging window.

    `train_kw` are further ``train`` keys of the recipe (``compile``).
    """
    from flexigpt.shared.train.components import flop_count
    from flexigpt.shared.train.trainer import train

    out = Path(tempfile.mkdtemp(prefix="gpu-bench-run-", dir=a.work))
    d = recipe_dict(
        ws,
        out / "run",
        trainable=trainable,
        ds_config=f"ds_configs/zero{stage}.json",
        micro_batch=micro,
        grad_accum=1,
        max_steps=steps,
        log_every=max(1, steps // 2),
        checkpoint_every=steps,
        warmup_steps=1,
        precision="bf16" if _cuda(a.device) else "fp32",
        peak_tflops=a.peak_tflops,
        **train_kw,
    )
    d["model"]["attn_implementation"] = "sdpa"
    d["data"]["seq_len"] = a.seq
    res: dict[str, Any] = {}
    try:
        with peak_memory(a.device, res):
            result = train(recipe_from_dict(d), model=model)
            res["flops_per_token"] = flop_count(model, a.seq).total
        tb = out / "run" / "tb"
        res.update(
            tokens_per_s=_last_scalar(tb, "perf/tokens_per_s"),
            mfu=_last_scalar(tb, "perf/mfu"),
            last_loss=result.last_loss,
            steps=result.step,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)  # checkpoints of a benchmark are not kept
    if not res["tokens_per_s"] or res["steps"] != steps:  # a figure is measured, or the part fails
        raise RuntimeError(
            f"the trainer ran {res['steps']} of {steps} steps and logged {res['tokens_per_s']} tokens/s"
        )
    return res


def part_train(report: Report, ws: dict[str, Path], box: Box, a: argparse.Namespace) -> None:
    dtype = torch.bfloat16 if _cuda(a.device) else torch.float32
    plan, grow = grown_plan(a.tiny)
    micro = a.micro or grow.train.micro_batch
    grown = lambda: apply_plan(llama_source(a.shape, 22, a.device, dtype), plan)  # noqa: E731
    runs: list[tuple[str, Callable[[], Any], str, bool]] = [
        ("grown 22->36 (shared blocks)", grown, grow.train.trainable, False),
        ("dense 36 layers", lambda: llama_source(a.shape, 36, a.device, dtype), "all", False),
        ("base 22 layers", lambda: llama_source(a.shape, 22, a.device, dtype), "all", False),
    ]  # fmt: skip
    if a.compile:
        runs.append(("grown 22->36 (shared blocks), compiled", grown, grow.train.trainable, True))
    for name, build, trainable, compiled in runs:
        need = a.est_train_s + (a.est_compile_s if compiled else 0)
        if not box.fits(need):
            report.skip("train", name, f"time box: {box.left():.0f} s left, a run needs about {need:.0f} s")
            continue
        model = build()
        if getattr(model, "plan", None) is None:  # a plain model trains under the identity plan
            model = apply_plan(model, Plan.identity("llama", model.config.num_hidden_layers))
        r = train_once(ws, model, trainable, 2, micro, a.train_steps, a, compile=compiled)
        del model
        setting = {
            "compile": compiled,
            "model": name,
            "layers": 36 if "22->36" in name or "36" in name else 22,
            "trainable": trainable,
            "zero_stage": 2,
            "micro_batch": micro,
            "seq_len": a.seq,
            "dtype": str(dtype).removeprefix("torch."),
            "steps": r["steps"],
            "flops_per_token": r["flops_per_token"],
            "peak_tflops": a.peak_tflops or "trainer's table for the GPU",
            **a.where,
        }
        report.figure("train", f"{name} tokens/s", r["tokens_per_s"], "tokens/s", setting)
        if r["mfu"] is None:
            report.skip("train", f"{name} MFU", "no peak FLOP/s for this device (pass --peak-tflops)")
        else:
            report.figure("train", f"{name} MFU", r["mfu"], "fraction of peak", setting)
        report.figure("train", f"{name} peak memory", r["peak_gpu_memory_gib"], "GiB", setting)


# ---------------------------------------------------------------------------------------- engine
def part_engine(report: Report, box: Box, a: argparse.Namespace) -> None:
    shapes = [dict(hidden=64, heads=4, seq=32, batch=2)] if a.tiny else [
        dict(hidden=4096, heads=32, seq=2048, batch=1),
        dict(hidden=2048, heads=16, seq=1024, batch=4),
    ]  # fmt: skip
    names = {
        "train_all": ("shared/dense step time, all trainable", 1.05),
        "train_adapters+norms": ("shared/dense step time, adapters+norms trainable", 1.03),
        "grad_sum_in_gemm_over_autograd": ("in-GEMM/autograd gradient sum step time", None),
        "inference": ("shared/export inference time", 1.02),
    }
    for shape in shapes:
        what = f"hidden {shape['hidden']}"
        if not box.fits(a.est_engine_s):
            report.skip("engine", what, f"time box: {box.left():.0f} s left")
            continue
        mem: dict[str, Any] = {}
        with peak_memory(a.device, mem):
            res = engine_figures(
                **shape,
                blocks=8,
                slots=12,
                rank=16,
                pairs=a.pairs,
                warmup=2,
                device=a.device,
                dtype=a.dtype,
            )
        setting = {**res["setting"], "max_abs_logit_diff": res["max_abs_logit_diff"], **a.where}
        peak_setting = {**setting, "peak_covers": "the shared, dense and materialised models together"}
        for key, (name, target) in names.items():
            r = res[key]
            report.figure(
                "engine", f"{name} ({what})", r["median"], "ratio (median of interleaved pairs)",
                {**setting, "range": [r["min"], r["max"]], "pairs": r["pairs"], "target": target},
            )  # fmt: skip
        report.figure("engine", f"peak memory ({what})", mem["peak_gpu_memory_gib"], "GiB", peak_setting)


# ----------------------------------------------------------------------------------- speculative
def part_speculative(report: Report, box: Box, a: argparse.Namespace) -> None:
    grow_plan, _ = grown_plan(a.tiny)
    big = TINY if a.tiny else LLAMA2_7B
    settings = [
        ("TinyLlama 22->36 grown", a.shape, 22, grow_plan, "recipe's adapters and output norms"),
        ("LLaMA-2-7B shape, 10 of 32 blocks pruned", big, 32, None, "rank 16, lora init, gamma 1e-3"),
    ]
    differ = []
    for name, shape, blocks, plan, adapters in settings:
        if not box.fits(a.est_spec_s):
            report.skip("speculative", name, f"time box: {box.left():.0f} s left")
            continue
        args = spec.Args(shape["hidden"], shape["vocab"], 32, a.new_tokens, a.spec_pairs, 16, 1e-3)
        args.heads, args.kv_heads, args.device, args.dtype = (
            shape["heads"],
            shape["kv_heads"],
            a.device,
            a.dtype,
        )
        args.intermediate, args.max_positions = shape["intermediate"], shape["positions"]
        if plan is None:
            plan = spec.pruned_plan(blocks, range(20, 30), args, init="lora")  # SVD inits of 7B take minutes
        mem: dict[str, Any] = {}
        results, batch4_skip = {}, None
        with peak_memory(a.device, mem):
            with torch.device(a.device):  # built where it runs (a 7B fp32 init on the CPU takes minutes)
                model = spec.build(blocks, plan, args)
            t0 = time.monotonic()
            # seeded CPU generators: no device context
            results[1] = spec.measure(model, name, a.draft_lens, args)
            took = time.monotonic() - t0
            if box.fits(1.5 * took):  # a batch of 4 decodes in about the time of one on a GPU
                results[4] = spec.measure(model, name, a.draft_lens, args, batch=4)
            else:
                batch4_skip = f"time box: {box.left():.0f} s left, batch 1 took {took:.0f} s"
        del model
        for batch, res in results.items():
            k, r = max(res.items(), key=lambda kr: kr[1]["median"])
            st = r["stats"]
            setting = {
                "slots": plan.num_slots, "blocks": len(plan.physical_blocks), "hidden": shape["hidden"],
                "adapters": adapters, "batch": batch, "prompt": 32, "new_tokens": a.new_tokens, "dtype": a.dtype,
                "draft_len": k, "draft_lens_tried": a.draft_lens, "range": [r["min"], r["max"]], "pairs": a.spec_pairs,
                "acceptance": st.acceptance_rate, "mean_row_prefix": st.mean_row_prefix,
                "mean_accepted_prefix": st.mean_accepted_prefix, "tokens_identical_to_generate": r["identical"],
                **a.where,
            }  # fmt: skip
            suffix = "" if batch == 1 else f", batch {batch}"
            differ += [] if r["identical"] else [f"{name}{suffix}"]
            report.figure(
                "speculative", f"{name} speed-up over generate{suffix}", r["median"], "x (median)", setting
            )
        peak_setting = {**setting, "batch": sorted(results), "peak_covers": "the batch sizes measured"}
        report.figure("speculative", f"{name} peak memory", mem["peak_gpu_memory_gib"], "GiB", peak_setting)
        if batch4_skip:
            report.skip("speculative", f"{name} batch 4", batch4_skip)
    if differ:  # recorded above with tokens_identical_to_generate false; the run must not pass
        raise RuntimeError(f"speculative tokens differ from generate's: {', '.join(differ)}")


# ---------------------------------------------------------------------------------------- memory
def part_memory(report: Report, ws: dict[str, Path], box: Box, a: argparse.Namespace) -> None:
    plan, grow = grown_plan(a.tiny)
    dtype = torch.bfloat16 if _cuda(a.device) else torch.float32
    for stage in (2, 3):
        stage_box = Box(min(box.left() / (4 - stage), box.left()))
        fits, stop = None, "ladder done"
        for micro in a.probe_batches:
            if not stage_box.fits(a.est_probe_s):
                stop = f"time box reached before micro batch {micro}"
                break
            try:
                model = apply_plan(llama_source(a.shape, 22, a.device, dtype), plan)
                r = train_once(ws, model, grow.train.trainable, stage, micro, 2, a)
                fits = (micro, r["peak_gpu_memory_gib"])
            except Exception as e:  # noqa: BLE001 - an out-of-memory error ends the ladder
                if "out of memory" not in str(e).lower():
                    raise
                stop = f"out of memory at micro batch {micro}"
                break
            finally:
                model = None
                gc.collect()
                if _cuda(a.device):
                    torch.cuda.empty_cache()
        setting = {
            "model": "grown 22->36 (shared blocks)", "trainable": grow.train.trainable, "zero_stage": stage,
            "seq_len": a.seq, "dtype": str(dtype).removeprefix("torch."), "batches_tried": a.probe_batches,
            "stopped": stop, "peak_gpu_memory_gib": fits[1] if fits else None, **a.where,
        }  # fmt: skip
        if fits is None:
            report.skip("memory", f"ZeRO-{stage} largest micro batch", stop)
        else:
            report.figure(
                "memory", f"ZeRO-{stage} largest micro batch that trains", fits[0], "sequences", setting
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, a few steps, CPU: checks the script")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {list(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=None, help="whole run (default 540; --tiny 120)")
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="peak for MFU (default: the trainer's table)"
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="train part: also train the grown model with train.compile=true, if it fits the time box",
    )
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    bad = [p for p in parts if p not in PARTS]
    if bad:
        print(f"--parts: unknown {bad}; allowed: {list(PARTS)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print(
            "no CUDA device: gpu_bench.py measures a GPU (use --tiny to check the script on a CPU)",
            file=sys.stderr,
        )
        return 2
    tiny = args.tiny
    a = argparse.Namespace(
        tiny=tiny, device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32",
        shape=TINY if tiny else TINYLLAMA, seq=32 if tiny else 2048, micro=None,
        train_steps=2 if tiny else 30, pairs=2 if tiny else 5, spec_pairs=2 if tiny else 3,
        new_tokens=8 if tiny else 64,
        draft_lens=[2] if tiny else [2, 4], probe_batches=[1, 2] if tiny else [8, 16, 32, 64, 128],
        peak_tflops=args.peak_tflops, work=None, compile=args.compile,
        est_train_s=1 if tiny else 60, est_engine_s=1 if tiny else 90, est_spec_s=1 if tiny else 60,
        est_probe_s=1 if tiny else 40, est_compile_s=40 if tiny else 90,
    )  # fmt: skip
    if not cuda:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    a.where = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "attention": "sdpa",
        # the trainer's optimizer_impl: auto (fused on CUDA, PyTorch's default on the CPU)
        "optimizer": "torch.optim.AdamW (fused)" if cuda else "torch.optim.AdamW (PyTorch's CPU default)",
    }
    budget = args.budget_s or (120.0 if tiny else 540.0)
    share = {"train": 0.3, "engine": 0.2, "speculative": 0.2, "memory": 0.3}
    total = sum(share[p] for p in parts)
    report = Report({"tiny": tiny, "budget_s": budget, "parts": parts, **a.where})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as work:
        a.work = work
        ws = workspace(Path(work) / "ws") if {"train", "memory"} & set(parts) else {}
        failed = []
        for part in parts:
            box = Box(budget * share[part] / total)
            try:
                if part == "train":
                    part_train(report, ws, box, a)
                elif part == "engine":
                    part_engine(report, box, a)
                elif part == "speculative":
                    part_speculative(report, box, a)
                else:
                    part_memory(report, ws, box, a)
            except Exception as e:  # noqa: BLE001 - the other parts still run; the exit status says it
                traceback.print_exc()
                report.skip(part, "the rest of the part", f"error: {type(e).__name__}: {e}")
                failed.append(part)
            report.data["setting"]["wall_s"] = time.monotonic() - t0
            report.write(args.out)  # after every part: a run stopped later keeps what it measured
    print(f"wrote {args.out} ({len(report.data['figures'])} figures, {len(report.data['skipped'])} skipped)")
    if failed:
        print(f"parts that failed: {failed} (see 'skipped' in {args.out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
