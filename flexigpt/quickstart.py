"""``python -m flexigpt.quickstart``: the whole job, small, offline, on CPU, resumable.

    python -m flexigpt.quickstart [--out runs/quickstart] [--tiny]
    flexigpt-quickstart [--out DIR] [--tiny]          (``make quickstart`` runs the first form)

Steps (each one is skipped when an earlier run finished it; a killed step continues where it
stopped, because the train / grow / prune commands resume from their checkpoints):

1. corpus: the docstrings and comments of this Python's standard library, as SlimPajama-schema
   jsonl with a held-out split by file (``flexigpt.corpus``);
2. tokenizer: sentencepiece BPE on that corpus, loaded back through transformers and checked;
3. base: a small Llama trained from scratch by the train command (``python -m flexigpt.shared.train``);
4. grow: the grow command (``python -m flexigpt.grow``) repeats some of its blocks as shared slots
   (FlexiGPT Block pattern) and trains the new slots briefly;
5. prune: the prune command (``python -m flexigpt.prune``) removes a third of the base's blocks
   and builds FlexiGPT, ShortGPT and ShortGPT+LoRA variants, with brief recovery training;
6. eval: perplexity on the held-out split and a toy zero-shot task through lm-eval, for every
   variant, then the report (``report.md``, ``report.json``, PNG plots) by ``flexigpt-eval``'s
   ``run_eval``.

Everything lands under ``--out``: ``corpus/``, ``tokenizer/``, ``base/``, ``grow/``, ``prune/``,
``tasks/``, ``report/``, the recipes the commands ran (``recipes/``), their logs (``logs/``) and
one completion record per step (``steps/``). ``--tiny`` runs the same path at a much smaller scale
(about two minutes; the tests use it). The commands run as child processes with
``DS_ACCELERATOR=cpu`` (without a GPU), ``OMP_WAIT_POLICY=PASSIVE`` and the Hugging Face offline
switches set, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .quickstart_steps import SCALES, STEPS, Context, QuickstartError, QuickstartInterrupted

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # spin-waiting OpenMP threads fight over 2 cores when anything else runs (environment notes)
    "OMP_WAIT_POLICY": "PASSIVE",
    "PYTHONUNBUFFERED": "1",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexigpt-quickstart",
        description="Offline CPU quickstart: stdlib corpus -> tokenizer -> small Llama -> grow, prune, train, "
        "evaluate, report. Running it again resumes.",
    )
    p.add_argument("--out", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    p.add_argument(
        "--tiny", action="store_true", help="the same steps at a much smaller scale (about two minutes)"
    )
    return p


def set_environment(probe_device: bool = True) -> None:
    """Offline and CPU settings for this process and its children (before torch / datasets load).

    Args:
        probe_device: import torch to see whether a GPU is there (``DS_ACCELERATOR=cpu`` without
            one); False when no step will run, which then loads no torch at all.
    """
    os.environ.update({k: v for k, v in OFFLINE_ENV.items() if k != "OMP_WAIT_POLICY"})
    os.environ.setdefault("OMP_WAIT_POLICY", OFFLINE_ENV["OMP_WAIT_POLICY"])  # a user's choice stays
    if not probe_device:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def check_settings(ctx: Context) -> None:
    """Refuse a run directory that was started with another scale; record the scale of a new one.

    Raises:
        QuickstartError: ``--out`` holds a run with other settings.
    """
    path = ctx.out / "quickstart.json"
    mine = {"scale": ctx.scale.name, "settings": ctx.scale.as_dict()}
    if path.is_file():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            raise QuickstartError(
                f"--out {ctx.out} holds a quickstart run with other settings (scale {theirs.get('scale')!r}); "
                "use another --out, or delete that directory to start over"
            )
        return
    ctx.out.mkdir(parents=True, exist_ok=True)
    _write_json(path, mine)


def run(
    out: str | Path, tiny: bool = False, *, echo: bool = True, started: float | None = None
) -> dict[str, Any]:
    """Run (or resume) every step of the quickstart.

    Args:
        out: the run directory.
        tiny: use the small scale.
        echo: copy the commands' output to this process's stdout (it always goes to ``logs/``).
        started: ``time.perf_counter()`` when this invocation began (``main`` takes it before
            anything else); None: now.

    Returns:
        The timings record written to ``out/timings.json``: the seconds of every step (as its
        completion record holds them, whichever run finished it), the steps this run ran, and this
        run's wall time (everything it did, the checks of the skipped steps included).

    Raises:
        QuickstartError: a step failed (the message names the step and its log), or
            ``QuickstartInterrupted``: a signal stopped a command after its checkpoint.
    """
    start = time.perf_counter() if started is None else started
    pending = [s for s in STEPS if not (Path(out) / "steps" / f"{s.name}.json").is_file()]
    set_environment(probe_device=bool(pending))
    ctx = Context(Path(out), SCALES["tiny" if tiny else "full"], echo=echo)
    check_settings(ctx)
    timings: dict[str, float] = {}
    ran: list[str] = []
    n = len(STEPS)
    for i, step in enumerate(STEPS, 1):
        marker = ctx.out / "steps" / f"{step.name}.json"
        if marker.is_file():
            earlier = json.loads(marker.read_text())
            print(
                f"[{i}/{n}] {step.title}: done in an earlier run ({earlier['seconds']:.1f} s), skipped",
                flush=True,
            )
            timings[step.name] = earlier["seconds"]
            continue
        print(f"[{i}/{n}] {step.title} ...", flush=True)
        t0 = time.perf_counter()
        info = step.fn(ctx)
        seconds = time.perf_counter() - t0
        _write_json(marker, {"step": step.name, "seconds": round(seconds, 1), **info})
        timings[step.name] = round(seconds, 1)
        ran.append(step.name)
        print(f"[{i}/{n}] {step.title}: done in {seconds:.1f} s", flush=True)
    total = time.perf_counter() - start
    record = {
        "scale": ctx.scale.name,
        "steps": timings,
        "ran_now": ran,
        "seconds_this_run": round(total, 1),
        "seconds_all_steps": round(sum(timings.values()), 1),
    }
    _write_json(ctx.out / "timings.json", record)
    report = ctx.out / "report" / "report.md"
    if echo and report.is_file():
        print("\n" + report.read_text())
    print(finish_line(record, report), flush=True)
    return record


def finish_line(record: dict[str, Any], report: Path) -> str:
    """The last line of a run: what this invocation took, and which steps an earlier run did."""
    timings, ran, total = record["steps"], record["ran_now"], record["seconds_this_run"]
    steps = ", ".join(f"{k} {v:.0f} s" + ("" if k in ran else " (earlier)") for k, v in timings.items())
    skipped = len(timings) - len(ran)
    if not ran:
        what = f"every step was done by an earlier run; this run checked them and skipped all {skipped} in {total:.1f} s"
    elif skipped:
        what = (
            f"this run took {total:.1f} s ({len(ran)} steps run, {skipped} skipped: done by an earlier run)"
        )
    else:
        what = f"this run took {total:.1f} s"
    return f"quickstart finished: {what}; steps: {steps}; report: {report}"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # written beside and renamed: a record is either complete or absent
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports), 0 where unknown."""
    try:
        import psutil  # a dependency of accelerate and DeepSpeed

        return max(0.0, time.time() - psutil.Process().create_time())
    except (ImportError, OSError):
        return 0.0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1: a step failed, reason on stderr; 128 + signal: stopped)."""
    started = time.perf_counter() - _process_age()  # the run's wall time: from interpreter start
    args = _parser().parse_args(argv)
    try:
        run(args.out, args.tiny, started=started)
    except QuickstartInterrupted as e:
        print(f"flexigpt-quickstart: {e}", file=sys.stderr)
        return 128 + e.signum
    except QuickstartError as e:
        print(f"flexigpt-quickstart: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # between commands: every finished step is recorded already
        print("flexigpt-quickstart: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
