"""Fixtures for the GPTailor tests: the tiny base, its two fine-tuned variants and their tasks, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from .tailorkit import build_setting


@pytest.fixture(scope="session")
def tailor_setting(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of the tiny setting (see tailorkit.build_setting)."""
    return build_setting(tmp_path_factory.mktemp("tailor"))


def tailor_overrides(s: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Overrides that point recipes/prune/tailor-local-tiny.yaml at the setting and an output directory."""
    return [
        f"model.source={s['base']}",
        f"tailor.variants={{colour: {s['colour']}, home: {s['home']}}}",
        f"tailor.objective.include_path=[{s['tasks']}]",
        f"tailor.warm_start.calibration_files=[{s['calib']}]",
        f"output_dir={out}",
        *extra,
    ]
