"""The paper's five zero-shot tasks over local copies of their datasets (no Hugging Face hub).

lm-eval's built-in ``arc_easy``, ``arc_challenge``, ``piqa``, ``winogrande`` and ``hellaswag``
load their datasets from the hub. Where the hub cannot be reached, ``local_data: {task: path}``
points a task at a local file (``.jsonl``, ``.json``, ``.parquet`` or ``.csv``) or a directory of
such files holding the split lm-eval evaluates (``LOCAL_SPLITS``: ARC test, the others
validation), in the hub dataset's own schema (``LOCAL_FIELDS``).

For each such task a small YAML is written that ``include:``s lm-eval's own YAML of the task by
absolute path and overrides only the dataset (``dataset_path`` json / parquet / csv,
``dataset_name: null``, ``dataset_kwargs.data_files`` mapping the evaluated split to the files,
the other splits null) under the task's own name. The prompt templates, the ``!function``
preprocessing (HellaSwag's ``process_docs``, WinoGrande's partial evaluation) and the metrics are
lm-eval's own; results come back under the built-in name, so report columns, ``PAPER_TASKS`` and
the paper average are unchanged. lm-eval loads a task from a YAML path given in the task list
(``TaskManager.load``: a name that is not registered is tried as a file), so the built-in index
is neither rebuilt nor shadowed.

``check_local_data`` validates a mapping before any model is loaded: known task, existing file
or directory, supported suffix, and the fields of the first record.

Importing this module loads neither torch nor lm-eval.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from flexigpt.shared.files import write_text_atomic

# task -> its YAML under lm_eval/tasks/ and the split lm-eval evaluates (test where the YAML
# names a test split, else validation; tests check both against the installed lm-eval).
LOCAL_YAMLS: dict[str, str] = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}
LOCAL_SPLITS: dict[str, str] = {
    "arc_easy": "test",
    "arc_challenge": "test",
    "piqa": "validation",
    "winogrande": "validation",
    "hellaswag": "validation",
}
# The fields lm-eval's templates and preprocessing read from each record (other fields are ignored).
LOCAL_FIELDS: dict[str, tuple[str, ...]] = {
    "arc_easy": ("question", "choices.text", "choices.label", "answerKey"),
    "arc_challenge": ("question", "choices.text", "choices.label", "answerKey"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
}
SUFFIXES: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# CSV holds flat text columns only: ARC's choices and HellaSwag's endings are nested, and
# WinoGrande's answer ("1" / "2") would be read back as a number, which lm-eval's mapping rejects.
CSV_TASKS = ("piqa",)


class LocalDataError(ValueError):
    """A ``local_data`` entry lm-eval could not evaluate; the message names the task and the rule."""


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, str) for x in v)


def _check_arc(r: Mapping[str, Any]) -> str | None:
    ch = r.get("choices")
    if not isinstance(ch, Mapping) or not _str_list(ch.get("text")) or not _str_list(ch.get("label")):
        return "choices must be {text: [str, ...], label: [str, ...]}"
    if len(ch["text"]) != len(ch["label"]):
        return f"choices.text has {len(ch['text'])} entries but choices.label {len(ch['label'])}"
    if r.get("answerKey") not in ch["label"]:
        return f"answerKey {r.get('answerKey')!r} is not one of choices.label {list(ch['label'])}"
    return None if _is_str(r.get("question")) else "question must be text"


def _label(v: Any, n: int, text_ok: bool = False) -> bool:
    if text_ok and isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n


def _check_piqa(r: Mapping[str, Any]) -> str | None:
    if not all(_is_str(r.get(k)) for k in ("goal", "sol1", "sol2")):
        return "goal, sol1 and sol2 must be text"
    return None if _label(r.get("label"), 2) else f"label must be the number 0 or 1 (got {r.get('label')!r})"


def _check_winogrande(r: Mapping[str, Any]) -> str | None:
    if not all(_is_str(r.get(k)) for k in ("sentence", "option1", "option2")):
        return "sentence, option1 and option2 must be text"
    if "_" not in r["sentence"]:
        return "sentence must hold the blank '_' the options fill"
    if r.get("answer") not in ("1", "2"):
        return f'answer must be the text "1" or "2" (got {r.get("answer")!r})'
    return None


def _check_hellaswag(r: Mapping[str, Any]) -> str | None:
    if not all(_is_str(r.get(k)) for k in ("activity_label", "ctx_a", "ctx_b")):
        return "activity_label, ctx_a and ctx_b must be text"
    if not _str_list(r.get("endings")):
        return "endings must be a list of text"
    n = len(r["endings"])
    # lm-eval's process_docs takes int(label): the hub's text "0".."3" or a number
    if _label(r.get("label"), n, text_ok=True):
        return None
    return f"label must be 0..{n - 1}, as text or a number (got {r.get('label')!r})"


CHECKS: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    "arc_easy": _check_arc,
    "arc_challenge": _check_arc,
    "piqa": _check_piqa,
    "winogrande": _check_winogrande,
    "hellaswag": _check_hellaswag,
}


def builtin_yaml(task: str) -> Path:
    """lm-eval's own YAML of one of the five tasks (in the installed lm-eval)."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval.tasks")
    if spec is None or not spec.submodule_search_locations:
        raise LocalDataError("local_data: lm-eval is not installed (pip install lm-eval)")
    path = Path(next(iter(spec.submodule_search_locations))) / LOCAL_YAMLS[task]
    if not path.is_file():
        raise LocalDataError(f"local_data.{task}: the installed lm-eval has no {LOCAL_YAMLS[task]}")
    return path


def data_files(task: str, path: str | Path) -> tuple[str, list[Path]]:
    """The builder (json / parquet / csv) and the files of one ``local_data`` entry.

    A file is used as it is; a directory contributes its files named ``<split>*`` with one
    supported suffix (e.g. ``test-00000-of-00001.parquet`` or ``validation.jsonl``).

    Raises:
        LocalDataError: unknown task, missing path, unsupported suffix, or no file of the split.
    """
    key = f"local_data.{task}"
    if task not in LOCAL_YAMLS:
        raise LocalDataError(f"local_data: unknown task {task!r}; allowed: {list(LOCAL_YAMLS)}")
    p, split = Path(path), LOCAL_SPLITS[task]
    allowed = [s for s, b in SUFFIXES.items() if b != "csv" or task in CSV_TASKS]
    if p.is_dir():
        files = sorted(
            f for f in p.iterdir() if f.is_file() and f.name.startswith(split) and f.suffix in SUFFIXES
        )
        if not files:
            raise LocalDataError(
                f"{key}: directory {p} has no file of the {split} split (named {split}*{{{','.join(allowed)}}})"
            )
        kinds = {f.suffix for f in files}
        if len(kinds) > 1:
            raise LocalDataError(
                f"{key}: directory {p} mixes {sorted(kinds)} files of the {split} split; keep one kind"
            )
    elif p.is_file():
        files = [p]
    else:
        raise LocalDataError(f"{key}: {p} does not exist (a file or directory of the {split} split)")
    suffix = files[0].suffix
    if suffix not in allowed:
        why = " (csv holds flat text columns only)" if suffix == ".csv" else ""
        raise LocalDataError(f"{key}: {files[0]} has suffix {suffix!r}; allowed: {allowed}{why}")
    return SUFFIXES[suffix], files


def first_record(path: Path) -> dict[str, Any]:
    """The first record of a jsonl / json / parquet / csv file.

    Raises:
        ValueError: an unreadable or empty file.
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1):
            if batch.num_rows:
                return batch.to_pylist()[0]
        raise ValueError("it holds no records")
    if path.suffix == ".csv":
        import csv

        with open(path, newline="") as f:
            row = next(csv.DictReader(f), None)
        if row is None:
            raise ValueError("it holds no records")
        return row
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        records = json.loads(text)
        if not records:
            raise ValueError("it holds no records")
        return records[0]
    line = next((ln for ln in text.splitlines() if ln.strip()), None)
    if line is None:
        raise ValueError("it holds no records")
    return json.loads(line)


def check_local_data(local_data: Mapping[str, str | Path]) -> None:
    """Refuse entries lm-eval could not evaluate, before any model is loaded.

    Checks the task name, the path, the suffix, and that the first record of the first file has
    the fields the task reads (``LOCAL_FIELDS``) with usable values.

    Raises:
        LocalDataError: naming ``local_data.<task>``, the file and what is allowed.
    """
    for task, path in local_data.items():
        _, files = data_files(task, path)
        key, fields = f"local_data.{task}", ", ".join(LOCAL_FIELDS[task])
        try:
            record = first_record(files[0])
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise LocalDataError(f"{key}: cannot read a record from {files[0]} ({e})") from None
        if not isinstance(record, Mapping):
            raise LocalDataError(f"{key}: the first record of {files[0]} is not an object with {fields}")
        if files[0].suffix == ".csv":  # the csv reader infers integer columns; a line reads as text
            record = {k: int(v) if v.strip().lstrip("-").isdigit() else v for k, v in record.items()}
        missing = [f for f in LOCAL_FIELDS[task] if f.split(".")[0] not in record]
        problem = f"it lacks {missing}" if missing else CHECKS[task](record)
        if problem:
            raise LocalDataError(
                f"{key}: the first record of {files[0]} does not fit {task} ({problem}); each record of the "
                f"{LOCAL_SPLITS[task]} split needs {fields}"
            )


def local_data_stamp(local_data: Mapping[str, str | Path]) -> dict[str, list[list[Any]]]:
    """Task -> [path, size, mtime_ns] of each data file: what a cached score depends on."""
    out = {}
    for task, path in local_data.items():
        _, files = data_files(task, path)
        out[task] = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return out


def task_yaml(task: str, path: str | Path) -> str:
    """The YAML text of one local task: lm-eval's own task with only the dataset replaced."""
    builder, files = data_files(task, path)
    split = LOCAL_SPLITS[task]
    splits = {k: None for k in ("training_split", "validation_split", "test_split")}
    splits["test_split" if split == "test" else "validation_split"] = split
    cfg = {
        "include": str(builtin_yaml(task)),
        "task": task,
        "dataset_path": builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: [str(f.resolve()) for f in files]}},
        **splits,
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def write_local_tasks(local_data: Mapping[str, str | Path], directory: str | Path) -> dict[str, Path]:
    """Write ``<task>.yaml`` for every ``local_data`` entry into `directory` (atomically).

    Returns:
        task -> the YAML path to hand to lm-eval in place of the task's name.
    """
    check_local_data(local_data)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return {
        task: write_text_atomic(d / f"{task}.yaml", task_yaml(task, path))
        for task, path in local_data.items()
    }


class _TaskLoader(yaml.SafeLoader):
    """Reads a task YAML with its ``!function`` references left as text."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def read_task_yaml(path: str | Path) -> dict[str, Any]:
    """A task YAML with its ``include:`` chain merged (the including file's keys win), no function loaded."""
    path = Path(path)
    cfg = yaml.load(path.read_text(), Loader=_TaskLoader)  # a SafeLoader subclass
    includes = cfg.pop("include", None)
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes] if includes else []:
        merged.update(read_task_yaml(path.parent / inc))
    return {**merged, **cfg}


def builtin_metrics(task: str) -> list[str]:
    """Metrics lm-eval's own YAML of `task` declares."""
    cfg = read_task_yaml(builtin_yaml(task))
    return [m["metric"] for m in cfg.get("metric_list") or [] if isinstance(m.get("metric"), str)]
