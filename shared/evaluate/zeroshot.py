"""Zero-shot multiple-choice tasks through lm-evaluation-harness, scored as the paper scores them.

The paper reports ARC-e, ARC-c, PIQA, WinoGrande and HellaSwag plus their mean. It does not say
which lm-eval metric each column is; the reading in docs/method.md (section 6, ambiguity 14), which
matches its unpruned LLaMA numbers, is ``acc_norm`` (length-normalised log-likelihood) for ARC-e,
ARC-c, PIQA and HellaSwag, and ``acc`` for WinoGrande (whose choices are whole sentences of equal
length, so lm-eval reports only ``acc``). ``PAPER_TASKS`` holds that reading; any other task and
metric can be asked for by name (``task:metric``).

The model is evaluated in memory: ``HFLM(pretrained=model, tokenizer=tok)`` accepts shared models
(a subclass of the source CausalLM), materialised and plain ones. The built-in tasks download
their datasets from the Hugging Face hub on first use (cached afterwards). Offline, the paper's
five tasks read local copies of their datasets through ``local_data`` (``localdata.py``: lm-eval's
own task definitions with only the dataset replaced; while every task asked for is local, the hub
and ``datasets`` are kept offline); any other task can be a local task YAML in ``include_path``
(``dataset_path: json`` with ``dataset_kwargs.data_files``; ``write_choice_task`` writes one),
with ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` set before anything imports ``datasets``.

Indexing lm-eval's built-in task registry takes seconds, so task managers are built once per
(include_path, include_defaults) and reused.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# task -> metric, as the paper's tables read (docs/method.md, section 6, ambiguity 14).
PAPER_TASKS: dict[str, str] = {
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "piqa": "acc_norm",
    "winogrande": "acc",
    "hellaswag": "acc_norm",
}

# Column headings of the paper's tables.
TASK_LABELS: dict[str, str] = {
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "piqa": "PIQA",
    "winogrande": "WinoG.",
    "hellaswag": "HellaS.",
}

_TASK_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}


class ZeroShotError(ValueError):
    """An unknown task or metric; the message names it and what is allowed."""


@dataclass(frozen=True)
class TaskScore:
    """The paper's metric of one task."""

    task: str
    metric: str
    """lm-eval metric name (acc, acc_norm, ...)."""
    value: float
    """Score in [0, 1]."""
    stderr: float | None
    """Standard error lm-eval reports for it (None where it reports none)."""
    samples: int
    """Documents evaluated (after `limit`)."""


@dataclass(frozen=True)
class ZeroShotResult:
    """Scores of one model on several zero-shot tasks, and their unweighted mean."""

    scores: dict[str, TaskScore]
    """task -> score, in the order asked."""
    mean: float
    """Mean of the task scores (the paper's "Average" column)."""
    limit: int | float | None = None
    """Documents per task lm-eval was limited to (None: all)."""
    batch_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    """Every metric lm-eval reported per task (for reference)."""

    def summary(self) -> str:
        """One line: each task's score as a percentage, and the mean."""
        parts = [f"{TASK_LABELS.get(t, t)} {100 * s.value:.2f}" for t, s in self.scores.items()]
        limit = f" (limit {self.limit})" if self.limit is not None else ""
        return f"zero-shot: {', '.join(parts)}; mean {100 * self.mean:.2f}{limit}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZeroShotResult:
        d = dict(d)
        d["scores"] = {k: TaskScore(**v) for k, v in d["scores"].items()}
        return cls(**d)


def parse_tasks(tasks: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """Normalise a task list to ``{task: metric}``.

    Args:
        tasks: None (the paper's five), a mapping task -> metric, or names, each ``task`` (the
            paper's metric for the paper's tasks, else ``acc``) or ``task:metric``.

    Returns:
        An ordered task -> metric dict.

    Raises:
        ZeroShotError: an empty list or a malformed entry.
    """
    if tasks is None:
        return dict(PAPER_TASKS)
    if isinstance(tasks, Mapping):
        out = dict(tasks)
    else:
        out = {}
        for entry in tasks:
            name, _, metric = str(entry).partition(":")
            if not name:
                raise ZeroShotError(f"tasks: entry {entry!r} has no task name (form: task or task:metric)")
            out[name] = metric or PAPER_TASKS.get(name, "acc")
    if not out:
        raise ZeroShotError("tasks: the list is empty; give at least one task (e.g. the paper's five)")
    return out


def get_task_manager(
    include_path: str | Path | Sequence[str | Path] | None = None, include_defaults: bool = True
):
    """The lm-eval ``TaskManager`` for these task directories, built once per process.

    Args:
        include_path: directories (or one) of extra task YAMLs.
        include_defaults: index lm-eval's built-in tasks too (takes seconds).

    Returns:
        A shared ``lm_eval.tasks.TaskManager``.
    """
    from lm_eval.tasks import TaskManager

    if include_path is None:
        paths: tuple[str, ...] = ()
    elif isinstance(include_path, (str, Path)):
        paths = (str(Path(include_path).resolve()),)
    else:
        paths = tuple(str(Path(p).resolve()) for p in include_path)
    key = (paths, include_defaults)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


def task_metrics(task_manager: Any, task: str) -> list[str]:
    """Metrics a task's YAML declares (read from the index, without loading its dataset)."""
    entry = task_manager.task_index.get(task)
    cfg = getattr(entry, "cfg", None) or {}
    metrics = [m["metric"] for m in cfg.get("metric_list") or [] if isinstance(m.get("metric"), str)]
    if not metrics and cfg.get("output_type") == "multiple_choice":
        metrics = ["acc", "acc_norm"]  # lm-eval's defaults for multiple_choice
    return metrics


def check_tasks(task_manager: Any, tasks: Mapping[str, str], local: Sequence[str] = ()) -> None:
    """Refuse unknown tasks and metrics a task does not report, naming the allowed ones.

    Args:
        task_manager: the index the task names are looked up in.
        tasks: task -> metric.
        local: tasks read from ``local_data`` (their metrics are those of lm-eval's own YAML).

    Raises:
        ZeroShotError: on the first unknown task or metric.
    """
    from flexigpt.shared.evaluate.localdata import builtin_metrics

    known = task_manager.all_subtasks
    for task, metric in tasks.items():
        if task in local:
            metrics = builtin_metrics(task)
            if metric not in metrics:
                raise ZeroShotError(
                    f"tasks: task {task!r} does not report metric {metric!r}; allowed: {metrics}"
                )
            continue
        if task not in task_manager.task_index:
            near = difflib.get_close_matches(task, known, n=3)
            hint = f" (did you mean {near}?)" if near else ""
            raise ZeroShotError(
                f"tasks: unknown lm-eval task {task!r}{hint}; the paper's tasks are {list(PAPER_TASKS)}; "
                "local tasks need include_path"
            )
        metrics = task_metrics(task_manager, task)
        if metrics and metric not in metrics:
            raise ZeroShotError(f"tasks: task {task!r} does not report metric {metric!r}; allowed: {metrics}")


def evaluate_zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: Mapping[str, str] | Sequence[str] | None = None,
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    max_length: int | None = None,
    local_data: Mapping[str, str | Path] | None = None,
) -> ZeroShotResult:
    """Run lm-eval zero-shot on an in-memory model and keep the paper's metric of each task.

    Args:
        model: a transformers causal LM (plain, shared or materialised), on its device.
        tokenizer: its tokenizer (lm-eval sets a pad token if it has none).
        tasks: see ``parse_tasks``; None: the paper's five tasks.
        batch_size: requests per forward pass.
        limit: documents per task (an int, or a fraction < 1); None: all. For smoke runs only.
        include_path: directories of local task YAMLs.
        include_defaults: also index lm-eval's built-in tasks (needed for the paper's tasks).
        max_length: context limit lm-eval truncates to; None: from the model config.
        local_data: task -> local file or directory of its evaluated split, for any of the paper's
            five tasks (see ``localdata.py``); each must be among `tasks`.

    Returns:
        The paper's metric per task and their mean.

    Raises:
        ZeroShotError: unknown task or metric, a ``local_data`` task not asked for, or lm-eval
            returned no score for one.
        LocalDataError: a ``local_data`` entry lm-eval could not evaluate.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from flexigpt.shared.evaluate.localdata import write_local_tasks

    wanted = parse_tasks(tasks)
    local = dict(local_data or {})
    stray = [t for t in local if t not in wanted]
    if stray:
        raise ZeroShotError(f"local_data: {stray} are not among the tasks {list(wanted)}")
    every_local = all(t in local for t in wanted)
    # tasks read from local_data are loaded from their YAML paths: the built-in index (seconds) is
    # only needed for the others
    tm = get_task_manager(include_path, include_defaults and not every_local)
    check_tasks(tm, wanted, local=list(local))
    with tempfile.TemporaryDirectory(prefix="flexigpt-tasks-") as tmp:
        yamls = write_local_tasks(local, tmp)
        # lm-eval loads a task from a YAML path in the task list; its results keep the task's name
        specs = [str(yamls[t]) if t in yamls else t for t in wanted]
        with _without_object_model_warning():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        was_training = model.training
        model.eval()
        try:
            with _offline(every_local):
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=specs, num_fewshot=0, limit=limit, task_manager=tm, log_samples=False
                )
        finally:
            model.train(was_training)
    if out is None:  # only non-zero ranks of a distributed run get None
        raise ZeroShotError("lm-eval returned no results on this rank")
    return collect_scores(out, wanted, limit=limit, batch_size=batch_size)


@contextlib.contextmanager
def _offline(on: bool) -> Iterator[None]:
    """Keep the hub and ``datasets`` offline while `on` (every task reads local files).

    ``datasets`` reads ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` once, when it is imported, so
    its ``config.HF_HUB_OFFLINE`` is set as well as the variables; all are restored afterwards.
    """
    if not on:
        yield
        return
    import datasets.config

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env, saved_cfg = {k: os.environ.get(k) for k in names}, datasets.config.HF_HUB_OFFLINE
    os.environ.update(dict.fromkeys(names, "1"))
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved_cfg
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _DropObjectModelWarning(logging.Filter):
    """Drops lm-eval's "`pretrained` model kwarg is not of type `str`" record (see below)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("`pretrained` model kwarg is not of type `str`")


@contextlib.contextmanager
def _without_object_model_warning() -> Iterator[None]:
    """Silence one lm-eval warning while HFLM is built from a model object.

    lm-eval warns on every model object that "many other model arguments may be ignored": those are
    the loading arguments (revision, dtype, parallelize...), which a loaded model has no use for.
    The arguments passed here (tokenizer, batch_size, max_length) are all honoured, and the model
    must be passed as an object: a shared model is evaluated as it is in memory. Every other
    record of that logger still shows.
    """
    logger = logging.getLogger("lm_eval.models.huggingface")
    drop = _DropObjectModelWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def collect_scores(
    out: Mapping[str, Any],
    wanted: Mapping[str, str],
    *,
    limit: int | float | None = None,
    batch_size: int = 1,
) -> ZeroShotResult:
    """Pick each task's metric from lm-eval's ``simple_evaluate`` output.

    Raises:
        ZeroShotError: a task or its metric is missing from the output.
    """
    results, counts = out["results"], out.get("n-samples", {})
    scores, extra = {}, {}
    for task, metric in wanted.items():
        if task not in results:
            raise ZeroShotError(f"lm-eval returned no results for task {task!r} (got {sorted(results)})")
        row = results[task]
        key = f"{metric},none"
        if key not in row:
            have = sorted(k.split(",")[0] for k in row if "," in k and "_stderr" not in k)
            raise ZeroShotError(f"task {task!r} has no metric {metric!r} in lm-eval's results; it has {have}")
        stderr = row.get(f"{metric}_stderr,none")
        stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
        n = counts.get(task, {}).get("effective", 0)
        scores[task] = TaskScore(task, metric, float(row[key]), stderr, int(n))
        extra[task] = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    mean = sum(s.value for s in scores.values()) / len(scores)
    return ZeroShotResult(scores, mean, limit, batch_size, {"metrics": extra})


def write_choice_task(
    directory: str | Path,
    name: str,
    docs: Sequence[Mapping[str, Any]],
    *,
    metrics: Sequence[str] = ("acc", "acc_norm"),
) -> Path:
    """Write a local multiple-choice lm-eval task: ``<name>.yaml`` and ``<name>.jsonl``.

    Each document is ``{"query": str, "choices": [str, ...], "label": int}``; the model scores
    ``" " + choice`` after ``query``, as lm-eval does for every multiple-choice task.

    Args:
        directory: where to write (use it as ``include_path``).
        name: the task name.
        docs: the documents.
        metrics: lm-eval metrics to report.

    Returns:
        The YAML path.

    Raises:
        ValueError: a document without query, choices or a valid label.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        missing = {"query", "choices", "label"} - set(doc)
        if missing:
            raise ValueError(f"docs[{i}] lacks {sorted(missing)}; each needs query, choices, label")
        if not 0 <= int(doc["label"]) < len(doc["choices"]):
            raise ValueError(f"docs[{i}].label={doc['label']}: allowed 0..{len(doc['choices']) - 1}")
    data = d / f"{name}.jsonl"
    data.write_text("".join(json.dumps(dict(doc)) + "\n" for doc in docs))
    metric_list = "".join(
        f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics
    )
    yaml_path = d / f"{name}.yaml"
    yaml_path.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data.resolve()))}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{query}}"\n'
        "doc_to_target: label\n"
        "doc_to_choice: choices\n"
        f"metric_list:\n{metric_list}"
        "metadata:\n  version: 1.0\n"
    )
    return yaml_path
