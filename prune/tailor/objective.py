"""The objective of a candidate: 1 - accuracy on lm-eval tasks, at a budget (lm-eval's ``limit``).

lm-eval's tasks (datasets, prompts) are loaded once and its model wrapper is built once around the
stitcher's skeleton; each candidate overwrites the skeleton's tensors in place, so scoring a trial
costs only the forward passes. ``limit`` takes the first documents of each task, so a budget is a
fixed subset and a larger budget contains the smaller ones.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flexigpt.shared.evaluate.zeroshot import check_tasks, collect_scores, get_task_manager, parse_tasks


class TaskObjective:
    """Scores the model it was built around on fixed lm-eval tasks; call it after each rebuild."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        tasks: Sequence[str],
        *,
        include_path: Sequence[str | Path] = (),
        include_defaults: bool = True,
        batch_size: int = 16,
    ) -> None:
        """Load the tasks and wrap `model`.

        Raises:
            ZeroShotError: an unknown task or metric.
        """
        from lm_eval.models.huggingface import HFLM

        self.tasks = parse_tasks(list(tasks))
        self.tm = get_task_manager(list(include_path) or None, include_defaults)
        check_tasks(self.tm, self.tasks)
        self.loaded = self.tm.load(list(self.tasks))
        for task in self.loaded["tasks"].values():
            task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.batch_size = batch_size
        self.evaluations = 0

    def sizes(self) -> dict[str, int]:
        """Documents per task (the largest meaningful budget)."""
        return {name: len(task.eval_docs) for name, task in self.loaded["tasks"].items()}

    def __call__(self, limit: int | None) -> dict[str, float]:
        """Accuracy (the task's metric) per task on the first `limit` documents (None: all)."""
        from lm_eval.evaluator import evaluate

        out = evaluate(
            lm=self.lm,
            task_dict=self.loaded,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            verbosity="ERROR",
        )
        self.evaluations += 1
        res = collect_scores(out, self.tasks, limit=limit, batch_size=self.batch_size)
        return {t: s.value for t, s in res.scores.items()}


def losses(scores: Mapping[str, float]) -> list[float]:
    """1 - accuracy per task, in the tasks' order."""
    return [1.0 - v for v in scores.values()]


def parego_weights(n: int, seed: int, trial: int) -> list[float]:
    """Random weights on the simplex for ParEGO, a function of (seed, trial number) only."""
    rng = random.Random(f"{seed}:{trial}")
    x = [-math.log(1.0 - rng.random()) for _ in range(n)]  # exponential draws -> uniform on the simplex
    s = sum(x)
    return [v / s for v in x]


def scalarise(values: Sequence[float], combine: str, weights: Sequence[float] | None = None) -> float:
    """One number to minimise: the mean, or ParEGO's ``max_i w_i f_i + 0.05 sum_i w_i f_i``."""
    if combine == "mean":
        return sum(values) / len(values)
    if combine == "parego":
        assert weights is not None
        terms = [w * v for w, v in zip(weights, values, strict=True)]
        return max(terms) + 0.05 * sum(terms)
    raise ValueError(f"combine={combine!r}: scalarise takes mean or parego")
