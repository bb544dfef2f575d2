"""The ``tailor`` recipe (kind ``tailor``): GPTailor's search over cut-and-stitched models.

``model.source`` is the base model; ``tailor.variants`` are its fine-tuned variants. The search
removes ``tailor.ratio`` of the base layers and, for each kept position, takes the base layer, one
variant's layer or a merge of several variants' layers; the objective is one minus accuracy on
lm-eval tasks. Importing this module loads no torch: a bad recipe is answered at once.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from flexigpt.prune.depth.recipe import ReplaceSection, SelectionSection
from flexigpt.shared.command import CommandRecipe
from flexigpt.shared.recipe import Section, TrainSection, register_recipe_kind

MERGE_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "linear")
HEURISTICS: tuple[str, ...] = ("top", "middle", "alternating", "block_influence")
RESERVED_SOURCES: tuple[str, ...] = ("base", "merge")


class ObjectiveSection(Section):
    """What a candidate is scored on: 1 - accuracy on each lm-eval task."""

    tasks: list[str] = Field(
        ...,
        min_length=1,
        description="lm-eval task names, each `task` (metric acc) or `task:metric`; local task YAMLs need "
        "include_path. GPTailor: MMLU (validation split) and WSC.",
    )
    include_path: list[str] = Field(
        default_factory=list, description="Directories of local lm-eval task YAMLs (offline tasks)."
    )
    include_defaults: bool = Field(
        True, description="Also index lm-eval's built-in tasks (seconds; false for local tasks only)."
    )
    combine: Literal["mean", "parego", "pareto"] = Field(
        "mean",
        description="mean: minimise the mean of the tasks' 1 - accuracy; parego: minimise a ParEGO "
        "scalarisation with random task weights drawn per trial (seeded); pareto: one objective per task "
        "and a Pareto front (no multi-fidelity pruning: every trial runs at budgets.max).",
    )
    batch_size: int = Field(16, ge=1, description="lm-eval requests per forward pass.")
    final_limit: int | None = Field(
        None, ge=1, description="Documents per task of the final scores; null: the whole task."
    )


class BudgetSection(Section):
    """Multi-fidelity: a trial is scored on the first `min` documents per task, then on eta times more."""

    min: int = Field(100, ge=1, description="Smallest budget (lm-eval `limit`). GPTailor: 100.")
    max: int = Field(1000, ge=1, description="Largest budget (lm-eval `limit`). GPTailor: 1000.")
    eta: int = Field(3, ge=2, description="Budget ratio between rungs and the halving rate. GPTailor: 3.")
    pruner: Literal["hyperband", "successive_halving", "none"] = Field(
        "hyperband",
        description="Optuna pruner over the rungs: hyperband (GPTailor's scheme), successive_halving, or none "
        "(every trial runs every rung).",
    )

    @model_validator(mode="after")
    def _check(self) -> BudgetSection:
        if self.min > self.max:
            raise ValueError(
                f"min={self.min} > max={self.max}: the smallest budget must not exceed the largest"
            )
        return self

    def rungs(self) -> list[int]:
        """The budgets a trial climbs: min, min x eta, ... and max last."""
        out = [self.min]
        while out[-1] * self.eta < self.max:
            out.append(out[-1] * self.eta)
        if out[-1] != self.max:
            out.append(self.max)
        return out


class WarmStartSection(Section):
    """Configurations enqueued before the sampler takes over (GPTailor's heuristic warm start)."""

    heuristics: list[Literal["top", "middle", "alternating", "block_influence"]] = Field(
        default_factory=lambda: ["top", "middle", "alternating", "block_influence"],
        description="Removal orders: top (highest layers first, the last layer kept), middle (from the middle "
        "outward), alternating (high and low in turn, first and last kept), block_influence (lowest Block "
        "Influence on the calibration text first, ShortGPT's choice). []: no warm start.",
    )
    merge_scales: list[float] = Field(
        default_factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0],
        description="Each removal order is also enqueued with every single variant everywhere and with every "
        "multi-variant pattern merged everywhere at each of these scales.",
    )
    calibration_files: list[str] = Field(
        default_factory=list,
        description="Text files (.txt: one document per line; .jsonl: the `text` field) for Block Influence; "
        "needed by the block_influence heuristic.",
    )
    calibration_samples: int = Field(64, ge=1, description="Calibration documents for Block Influence.")
    calibration_seq_len: int = Field(512, ge=2, description="Tokens per calibration document at most.")

    @model_validator(mode="after")
    def _check(self) -> WarmStartSection:
        for s in self.merge_scales:
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"merge_scales: {s} is outside [0, 1]")
        if "block_influence" in self.heuristics and not self.calibration_files:
            raise ValueError(
                "calibration_files: the block_influence heuristic needs calibration text; give files or drop "
                "it from heuristics"
            )
        return self


class TailorSection(Section):
    """The GPTailor search: sources, search space, objective, budgets, optimiser."""

    variants: dict[str, str] = Field(
        ...,
        description="Fine-tuned variants of model.source: name -> hub id or local directory (same architecture "
        "and shapes). Only their decoder layers are used; a variant whose tokenizer numbers the base's tokens "
        "differently is refused, tokens it adds are ignored. {}: no variants, the search only chooses which "
        "base layers to cut (every kept layer is the base's).",
    )
    ratio: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="Fraction of the base layers removed (rounded; GPTailor: 10 of 40, 9 of 32).",
    )
    merge_methods: list[Literal["task_arithmetic", "ties", "linear"]] = Field(
        default_factory=lambda: ["task_arithmetic"],
        description="How a position that selects several variants merges them (mergekit's tensor functions): "
        "task_arithmetic (base + scale x sum of task vectors, GPTailor's), ties (TIES: trimmed, sign-elected "
        "task vectors, density ties_density), linear ((1 - scale) x base + scale x mean of the variants).",
    )
    ties_density: float = Field(0.5, gt=0, le=1, description="Fraction of each task vector TIES keeps.")
    scale_range: tuple[float, float] = Field((0.0, 1.0), description="Range of the merge scale searched.")
    output_scale: bool = Field(
        False,
        description="Also search a per-position output scale in [0, 2] (the block's residual update is "
        "multiplied by it). GPTailor's released space lists it but its prune strategy never applies it; "
        "off by default.",
    )
    objective: ObjectiveSection = Field(..., description="Tasks and how they combine.")
    budgets: BudgetSection = Field(default_factory=BudgetSection, description="Multi-fidelity budgets.")
    warm_start: WarmStartSection = Field(
        default_factory=WarmStartSection, description="Heuristic warm start."
    )
    trials: int = Field(
        500, ge=1, description="Trials in all (warm starts included); raise it on a rerun to search further."
    )
    sampler: Literal["tpe", "random"] = Field(
        "tpe", description="tpe: Optuna's multivariate TPE (Bayesian optimisation); random: the baseline."
    )
    conditional_space: bool = Field(
        False,
        description="true: GPTailor's conditional space (candidates only for kept layers, a merge scale only "
        "where several variants are chosen), made for SMAC; false: every parameter in every trial, ignored "
        "where it does not apply, which TPE models jointly (same configurations).",
    )
    encoding: Literal["source", "flags"] = Field(
        "source",
        description="How a kept position's source is searched. source: one categorical per position over base, "
        "each variant and each merged set of variants, which TPE models as one distribution; flags: GPTailor's "
        "{0, 1} flag per variant and position (none: base, one: that variant, several: merged). Same "
        "configurations.",
    )
    prior_weight: float = Field(
        3.0,
        gt=0,
        description="Weight of TPE's prior (a flat distribution over each parameter's range) against the "
        "observed trials; above 1 it keeps drawing values that the few good trials did not use. Optuna's "
        "default is 1.0. Optuna deprecated this argument in 4.9 (removal planned for 6.0); the pinned 5.0 has it.",
    )
    startup_trials: int = Field(
        10,
        ge=1,
        description="Finished trials (warm starts count) before TPE models the results; until then it samples "
        "at random.",
    )
    seed: int = Field(0, description="Seed of the sampler and of the ParEGO weights.")
    cache_blocks: int = Field(
        64, ge=1, description="Decoder blocks (read or merged) kept in memory, least recently used dropped."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")
    export: bool = Field(True, description="Write the chosen model to output_dir/model as a plain model.")
    recovery: Literal["none", "plain", "flexigpt"] = Field(
        "plain",
        description="Recovery training of the chosen model when the recipe has a train: section. plain: the "
        "exported plain model, in output_dir/recovery (train.trainable: all); flexigpt: every removed position "
        "filled by a replacement slot that reuses a kept block with SVD-initialised adapters and an output "
        "norm (replace:, selection:), in output_dir/flexigpt; none: no training.",
    )
    replace: ReplaceSection = Field(
        default_factory=ReplaceSection,
        description="Replacement slots of recovery: flexigpt (the prune command's prune.replace keys; gamma "
        "is 'measured', on warm_start.calibration_files, or a number; norm_after stays null).",
    )
    selection: SelectionSection = Field(
        default_factory=SelectionSection,
        description="Base selection of recovery: flexigpt (the prune command's prune.selection keys; the "
        "blocks are read from the stitched model, so read_from must be auto or model).",
    )

    @model_validator(mode="after")
    def _check(self) -> TailorSection:
        if self.replace.norm_after is not None:
            raise ValueError(
                "replace.norm_after is not offered by the tailor command (its recovery has the output norm from "
                "the start); leave it null"
            )
        if self.replace.gamma == "calibrate":
            raise ValueError(
                "replace.gamma='calibrate' is not offered by the tailor command; give 'measured' or a number "
                "(e.g. 0.01)"
            )
        if (
            self.recovery == "flexigpt"
            and self.replace.out_norm
            and self.replace.gamma == "measured"
            and not self.warm_start.calibration_files
        ):
            raise ValueError(
                "replace.gamma='measured' measures the output norms on warm_start.calibration_files, which is "
                "empty; give calibration files or a number for replace.gamma (e.g. 0.01)"
            )
        if self.selection.read_from == "safetensors":
            raise ValueError(
                "selection.read_from='safetensors': the stitched model has no files of its own; use auto or model"
            )
        for name in self.variants:
            if name in RESERVED_SOURCES or not name or "/" in name:
                raise ValueError(
                    f"variants: name {name!r} is not allowed (reserved: {list(RESERVED_SOURCES)})"
                )
        lo, hi = self.scale_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"scale_range={self.scale_range}: need 0 <= low <= high <= 1")
        if not self.merge_methods:
            raise ValueError(f"merge_methods: give at least one of {list(MERGE_METHODS)}")
        return self


class TailorRecipe(CommandRecipe):
    """GPTailor: find, by a multi-fidelity search, which layers to cut and which variant layers to stitch in."""

    command_section: ClassVar[str] = "tailor"
    plan_made: ClassVar[str] = "its stitch plan"

    kind: Literal["tailor"] = Field("tailor", description="Recipe kind.")
    train: TrainSection | None = Field(
        None,
        description="null: search only (GPTailor trains nothing). Set: after the search, recovery training of "
        "the chosen model on `data` by the same trainer, as tailor.recovery says (plain: use "
        "train.trainable: all, a plain model has no adapters).",
    )
    tailor: TailorSection = Field(..., description="The search.")

    @model_validator(mode="after")
    def _check_cross(self) -> TailorRecipe:
        if self.train is not None and self.tailor.recovery == "plain" and not self.tailor.export:
            raise ValueError(
                "train: plain recovery training starts from the exported model; set tailor.export=true"
            )
        if self.tailor.objective.combine == "pareto" and self.tailor.budgets.pruner != "none":
            raise ValueError(
                "tailor.budgets.pruner: combine=pareto keeps one objective per task, which Optuna's pruners do "
                "not support; set tailor.budgets.pruner=none"
            )
        if self.tailor.recovery == "flexigpt" and self.train is None:
            raise ValueError(
                "tailor.recovery=flexigpt trains the replacement slots; give a train: section (and data:), or set "
                "tailor.recovery=none"
            )
        return self


register_recipe_kind("tailor", TailorRecipe)
