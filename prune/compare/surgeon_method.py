"""Method ``surgeon`` of the comparison: the LLM Surgeon at the depth methods' decoder-linear size.

A depth method that removes n of L equal blocks keeps (L - n) / L of the decoder-linear weights. The
surgeon command (``flexigpt.prune.surgeon.run``) prunes rows and columns of every decoder linear of
the same source to ``target_size = (L - n) / L`` on the comparison's calibration text, keeping all L
layers, in ``output_dir/surgeon-run/`` (a rerun resumes after its last finished shot). Its shrunk
compact model becomes ``output_dir/surgeon/initial/``, which the comparison recovers (every
parameter) and judges like the plain baselines; ``method.json`` is written last.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flexigpt.prune.compare.recipe import CompareRecipe
from flexigpt.prune.depth.build import PruneError
from flexigpt.shared.files import atomic_dir, write_text_atomic

NAME = "surgeon"


def run_dir(recipe: CompareRecipe) -> Path:
    """The surgeon command's run directory inside the comparison."""
    return Path(recipe.output_dir) / "surgeon-run"


def target_size(layers: int, n: int) -> float:
    """The decoder-linear fraction a depth method keeps when it removes `n` of `layers` equal blocks."""
    return (layers - n) / layers


def surgeon_recipe(recipe: CompareRecipe, n: int, layers: int) -> Any:
    """The surgeon recipe of the comparison: its model, data, text rule, calibration and first text.

    Raises:
        PruneError: the comparison's values do not make a valid surgeon recipe (the message names the key).
    """
    from flexigpt.prune.surgeon.recipe import SurgeonRecipe

    c, o = recipe.compare, recipe.compare.surgeon
    raw = recipe.model_dump(mode="json")
    for key in ("compare", "train"):  # the surgeon trains nothing; the recovery is the comparison's
        raw.pop(key)
    first = next(iter(c.perplexity.values()), None)
    cal = c.calibration
    raw.update(kind="surgeon", output_dir=str(run_dir(recipe)))
    raw["surgeon"] = {
        "methods": ["surgeon"],
        "structures": "rows_columns",
        "target_size": target_size(layers, n),
        "shots": o.shots,
        "damp_g": o.damp_g,
        "damp_a": o.damp_a,
        "fisher": o.fisher,
        "blocks_per_pass": o.blocks_per_pass,
        "factors": o.factors,
        "lora": {"enabled": o.lora, "samples": min(3, cal.num_samples)},
        "calibration": {
            "stream": cal.stream.model_dump(mode="json") if cal.stream else None,
            "num_samples": cal.num_samples,
            "seq_len": cal.seq_len,
            "pack": cal.pack,
        },
        "perplexity": first.model_dump(mode="json") if first else None,
        "save_plain": False,
        "device": c.device,
    }
    try:
        return SurgeonRecipe.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise PruneError(
            f"[{NAME}] the surgeon command refuses this comparison's values: {where + ': ' if where else ''}"
            f"{err['msg']}"
        ) from None


def build(recipe: CompareRecipe, n: int, config: Any, log: Callable) -> None:
    """Run the surgeon to the depth methods' decoder-linear size and leave ``<output_dir>/surgeon/``.

    Raises:
        PruneError: the surgeon refused the run (bad value, other settings in surgeon-run/, no calibration).
    """
    from flexigpt.prune.surgeon.recipe import SurgeonError
    from flexigpt.prune.surgeon.run import run as surgeon_run

    layers = config.num_hidden_layers
    sr = surgeon_recipe(recipe, n, layers)
    size = sr.surgeon.target_size
    log(
        f"[{NAME}] LLM Surgeon, rows and columns to {size:.4g} of the decoder-linear weights (as {n} of "
        f"{layers} blocks removed), {sr.surgeon.shots} shots -> {run_dir(recipe)}"
    )
    t0 = time.perf_counter()
    try:
        summary = surgeon_run(sr, log=log)
    except SurgeonError as e:
        raise PruneError(f"[{NAME}] {e}") from e
    variant = next(v for v in summary["variants"].values() if v["method"] == NAME)
    ppl = variant["perplexity"]["ppl"]
    if not math.isfinite(ppl):
        raise PruneError(
            f"[{NAME}] the pruned model's perplexity is {ppl} ({run_dir(recipe) / variant['name']}); try more "
            "compare.surgeon.shots or a larger damping (compare.surgeon.damp_g, damp_a)"
        )
    vdir = Path(recipe.output_dir) / NAME
    with atomic_dir(vdir / "initial") as tmp:
        for f in (run_dir(recipe) / variant["name"] / "model").iterdir():
            if f.is_file():
                _link_or_copy(f, tmp / f.name)
    info = {
        "removed": [],
        "layers": list(range(layers)),
        "train": {},
        "notes": {
            "structures": "rows_columns",
            "target_size": size,
            "as_blocks_removed": n,
            "shots": sr.surgeon.shots,
            "lora_correction": sr.surgeon.lora.enabled,
            "decoder_linear_zero_fraction": variant["decoder_linear_zero_fraction"],
            "stored_params": variant["stored_params"],
            "dense_params": variant["dense_params"],
            "narrowed_blocks": variant["narrowed_blocks"],
            "surgeon_perplexity": variant["perplexity"]["ppl"],
            "dense_perplexity": summary["dense"]["perplexity"]["ppl"],
            "run": str(run_dir(recipe) / variant["name"]),
        },
        "seconds": time.perf_counter() - t0,
    }
    write_text_atomic(vdir / "method.json", json.dumps(info, indent=1) + "\n")
    log(f"[{NAME}] {variant['stored_params']:,} stored parameters, {layers} layers -> {vdir / 'initial'}")


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows one (the surgeon's run keeps its copy), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def header_lines(recipe: CompareRecipe) -> list[str]:
    """What the table's header says of the method: what its size matches (it removes no layer)."""
    done = Path(recipe.output_dir) / NAME / "method.json"
    if not done.is_file():
        return []
    info = json.loads(done.read_text())
    notes = info["notes"]
    return [
        f"- surgeon: prunes rows and columns of every decoder linear to target_size {notes['target_size']:.4g} "
        f"(non-zero decoder-linear weights: as many as removing {notes['as_blocks_removed']} of "
        f"{len(info['layers'])} blocks keeps) in {notes['shots']} shots; it removes no layer, and zeros inside "
        "live units stay stored (the dec-linear column)"
    ]
