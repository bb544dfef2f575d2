"""The guided search (TPE with the warm starts, the recipe's defaults) against random search of the
same trial count and budgets on the tiny setting, seeded: two real searches per seed, compared on
the mean accuracy at the top budget of the configuration each chooses. Same seeds, same outcome."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexigpt.prune.cli import main

from .conftest import tailor_overrides

REPO = Path(__file__).resolve().parents[3]
RECIPE = str(REPO / "recipes" / "prune" / "tailor-local-tiny.yaml")
SEEDS = (0, 1, 2, 3)


def _search(setting: dict[str, Path], out: Path, seed: int, *extra: str) -> float:
    args = [RECIPE, *tailor_overrides(setting, out, f"tailor.seed={seed}", "tailor.export=false", *extra)]
    assert main([*args, "--prune-only"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 48  # the recipe's trial count, for both searches
    return summary["chosen_mean_at_top_budget"]


@pytest.mark.slow
def test_the_guided_search_beats_random_search_of_the_same_trial_count(tailor_setting, tmp_path) -> None:
    guided, random = {}, {}
    for seed in SEEDS:
        guided[seed] = _search(tailor_setting, tmp_path / f"tpe{seed}", seed)
        random[seed] = _search(
            tailor_setting,
            tmp_path / f"random{seed}",
            seed,
            "tailor.sampler=random",
            "tailor.warm_start.heuristics=[]",
        )
    won = sum(guided[s] > random[s] for s in SEEDS)
    mean_guided, mean_random = sum(guided.values()) / len(SEEDS), sum(random.values()) / len(SEEDS)
    assert won >= 3 and mean_guided > mean_random + 0.01, (guided, random)
