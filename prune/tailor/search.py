"""The resumable Optuna study: seeded TPE (or random) over the search space, warm-started with the
heuristic configurations, multi-fidelity by a Hyperband or successive-halving pruner over budgets.

Every trial is written to a journal file in the run directory as it finishes (its parameters, its
stitch plan, its scores at every budget it reached, its time). A rerun opens the same study and
runs only the trials still missing; a trial cut off by a kill is marked failed and its
configuration enqueued again. The search-relevant part of the recipe is stored with the study, and
a rerun whose recipe differs there is refused (``trials`` may grow).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flexigpt.prune.tailor.objective import losses, parego_weights, scalarise
from flexigpt.prune.tailor.space import SearchSpace
from flexigpt.prune.tailor.stitch import StitchError, StitchPlan

STUDY = "tailor"
# Search keys added after studies were first journaled, with the value those studies ran with: an
# older study continues when the recipe sets them so.
EARLIER_DEFAULTS: dict[str, Any] = {"tailor.encoding": "flags", "tailor.prior_weight": 1.0}


class SearchError(StitchError):
    """A study that cannot be continued (a changed recipe); the message names what changed."""


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # prior_weight is deprecated since Optuna 4.9 (removal planned for 6.0); the pinned 5.0 has it, and
    # docs/tailor.md says so, so the warning is not repeated on every run
    warnings.filterwarnings("ignore", message=".*`prior_weight`.*", category=FutureWarning)
    return optuna


def open_study(
    path: Path,
    fingerprint: Mapping[str, Any],
    *,
    sampler: str,
    seed: int,
    startup_trials: int = 10,
    prior_weight: float = 1.0,
    pruner: str,
    budgets: Sequence[int],
    eta: int,
    n_objectives: int,
) -> Any:
    """Create or reopen the study journaled at `path`.

    Raises:
        SearchError: the stored fingerprint differs from `fingerprint` (the keys that changed are named).
    """
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(path)))
    if sampler == "random":
        smp = optuna.samplers.RandomSampler(seed=seed)
    else:
        smp = optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            group=True,
            n_startup_trials=startup_trials,
            **({} if prior_weight == 1.0 else {"prior_weight": prior_weight}),
        )
    if pruner == "hyperband" and len(budgets) > 1:
        prn = optuna.pruners.HyperbandPruner(
            min_resource=budgets[0], max_resource=budgets[-1], reduction_factor=eta
        )
    elif pruner == "successive_halving" and len(budgets) > 1:
        prn = optuna.pruners.SuccessiveHalvingPruner(min_resource=budgets[0], reduction_factor=eta)
    else:
        prn = optuna.pruners.NopPruner()
    study = optuna.create_study(
        study_name=STUDY,
        storage=storage,
        sampler=smp,
        pruner=prn,
        directions=["minimize"] * n_objectives,
        load_if_exists=True,
    )
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", dict(fingerprint))
        return study
    stored = {**EARLIER_DEFAULTS, **stored}
    if stored != json.loads(json.dumps(dict(fingerprint))):
        changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        raise SearchError(
            f"{path}: the study was made with a different recipe ({', '.join(changed)} changed); use a new "
            "output_dir, or restore those keys (a search continues with more tailor.trials, or another export, device, "
            "block cache or recovery: keys that do not decide the trials' scores)"
        )
    return study


def recover(study: Any) -> int:
    """Mark trials a kill left running as failed and enqueue their configurations again.

    Returns:
        How many were recovered.
    """
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Optuna fails stale trials only through heartbeats, which journal files do not keep; its
        # storage API is the one way to close a trial that no process runs any more
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"label": t.user_attrs.get("label", "sampler")})
        n += 1
    return n


def finished(study: Any) -> list[Any]:
    """Trials that ran to the end or were pruned (the ones a rerun must not repeat)."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def make_objective(
    space: SearchSpace,
    build: Callable[[StitchPlan], Any],
    score: Callable[[int | None], dict[str, float]],
    *,
    budgets: Sequence[int],
    combine: str,
    n_tasks: int,
    prune: bool,
    seed: int,
    log: Callable[..., None],
) -> Callable[[Any], Any]:
    """The Optuna objective: build the trial's plan, score it at each budget, report, maybe stop early."""
    optuna = _optuna()

    def objective(trial: Any) -> Any:
        t0 = time.perf_counter()
        plan = space.suggest(trial)
        build(plan)
        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr("label", trial.user_attrs.get("label", "sampler"))
        weights = parego_weights(n_tasks, seed, trial.number) if combine == "parego" else None
        if weights is not None:
            trial.set_user_attr("weights", weights)
        by_budget: dict[str, dict[str, float]] = {}
        value: Any = None
        for b in budgets:
            scores = score(b)
            by_budget[str(b)] = scores
            trial.set_user_attr("scores", by_budget)
            vals = losses(scores)
            value = vals if combine == "pareto" else scalarise(vals, combine, weights)
            if prune and b != budgets[-1]:
                trial.report(value, b)
                if trial.should_prune():
                    trial.set_user_attr("seconds", time.perf_counter() - t0)
                    log(f"  trial {trial.number}: pruned at budget {b} ({_fmt(scores)})", flush=True)
                    raise optuna.TrialPruned()
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        log(f"  trial {trial.number}: budget {budgets[-1]} ({_fmt(scores)})", flush=True)
        return value

    return objective


def _fmt(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{t} {100 * v:.1f}" for t, v in scores.items())


def run_trials(study: Any, objective: Callable[[Any], Any], trials: int) -> int:
    """Run the trials still missing (of `trials` in all). Returns how many ran now."""
    todo = max(0, trials - len(finished(study)))
    if todo:
        study.optimize(objective, n_trials=todo, catch=(), gc_after_trial=False)
    return todo


def mean_at(trial: Any, budget: int) -> float | None:
    """Mean accuracy of a trial at `budget`, or None when it did not reach it."""
    scores = trial.user_attrs.get("scores", {}).get(str(budget))
    return None if scores is None else sum(scores.values()) / len(scores)


def best_trials(study: Any, budget: int, combine: str) -> list[Any]:
    """The chosen trial first: the highest mean accuracy at the top budget (for ``pareto`` among the
    Pareto set, which follows it)."""
    from optuna.trial import TrialState

    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if mean_at(t, budget) is not None
    ]
    if not done:
        raise SearchError("no trial reached the top budget; raise tailor.trials or lower tailor.budgets.max")
    pool = study.best_trials if combine == "pareto" else done
    return sorted(pool, key=lambda t: (-(mean_at(t, budget) or 0.0), t.number))
