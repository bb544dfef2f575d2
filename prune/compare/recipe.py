"""The ``compare`` recipe: one source model, one ratio, one calibration text, one recovery budget, many methods.

The FlexiGPT family (flexigpt, shortgpt, shortgpt_lora) is built by the prune command itself
(``output_dir/prune/``, the ``selection:`` and ``replace:`` options below are its own), and so is
each FlexiGPT output-norm option of ``NORM_METHODS`` (its own run directory); every other method is
a registered baseline (``flexigpt.prune.depth.baselines``) in ``output_dir/<method>/``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from flexigpt.prune.depth.recipe import VARIANTS, CalibrationSection, ReplaceSection, SelectionSection
from flexigpt.prune.surgeon.recipe import SurgeonSection
from flexigpt.prune.tailor.recipe import (
    MERGE_METHODS,
    BudgetSection,
    ObjectiveSection,
    TailorSection,
    WarmStartSection,
)
from flexigpt.shared.command import CommandRecipe
from flexigpt.shared.evaluate.cli import PerplexitySection, ZeroShotSection
from flexigpt.shared.recipe import Section, register_recipe_kind

# The registered baselines (flexigpt.prune.depth.baselines.BASELINES, a test keeps the two equal),
# named here so that reading a recipe imports no torch.
BASELINE_METHODS: tuple[str, ...] = ("replaceme", "replaceme_cosine", "streamline", "sleb", "reverse")
# FlexiGPT with other output-norm options than compare.replace's, each built by a prune run of its own
# in output_dir/<dir>: name -> (dir, the replace: values it sets). flexigpt_calibrated adds 'measured'
# and 'none' to compare.replace.gamma_candidates.
# flexigpt_late_norm adds its norm after compare.norm_after recovery steps (LATE stands for that step).
NO_NORM, LATE = "flexigpt_no_norm", "compare.norm_after"
NORM_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    NO_NORM: ("prune-no-norm", {"out_norm": False, "gamma": 0.0}),
    "flexigpt_gamma_paper": ("prune-gamma-paper", {"out_norm": True, "gamma": 0.01}),
    "flexigpt_measured": ("prune-measured", {"out_norm": True, "gamma": "measured"}),
    "flexigpt_calibrated": ("prune-calibrated", {"out_norm": True, "gamma": "calibrate"}),
    "flexigpt_late_norm": ("prune-late-norm", {"out_norm": True, "gamma": "measured", "norm_after": LATE}),
}
# Methods another command of the toolkit builds, each into output_dir/<method>/ as a baseline is
# (initial/ and method.json, then the same recovery): name -> the module whose build(recipe, n, config,
# log) does it. They run only when compare.methods names them.
COMMAND_METHODS: dict[str, str] = {
    "surgeon": "flexigpt.prune.compare.surgeon_method",
    "tailor": "flexigpt.prune.compare.tailor_method",
}
METHODS: tuple[str, ...] = (*VARIANTS, *NORM_METHODS, *BASELINE_METHODS, *COMMAND_METHODS)


class BaselineOptions(Section):
    """Options of the baselines (each method reads the ones that concern it)."""

    max_tokens: int | None = Field(
        65536, ge=1, description="ReplaceMe: calibration tokens the linear map is fitted on at most."
    )
    map_steps: int = Field(
        200, ge=0, description="ReplaceMe cosine objective: Adam steps from the least-squares map."
    )
    map_lr: float = Field(1e-4, gt=0, description="ReplaceMe cosine objective: learning rate.")
    layer_steps: int = Field(
        100,
        ge=0,
        description="LLM-Streamline: training steps of the replacement block (one calibration sample each).",
    )
    layer_lr: float = Field(1e-4, gt=0, description="LLM-Streamline: learning rate of the replacement block.")
    init: Literal["first", "last"] = Field(
        "first",
        description="LLM-Streamline: the replacement starts as the first or the last block of the range.",
    )
    tune_layers: int = Field(
        3,
        ge=1,
        description="Reverse order: the last blocks whose recovery trains, with the LM head (the paper: 3).",
    )


class CompareTailorSection(Section):
    """The method ``tailor``: GPTailor's search (the tailor command) at the comparison's ratio.

    The fields are the tailor command's own (docs/tailor.md); the ratio, the device, the export and
    the recovery are the comparison's.
    """

    variants: dict[str, str] = Field(
        default_factory=dict,
        description="Fine-tuned variants of model.source (name -> local directory or hub id) whose layers the "
        "search may stitch in; {}: none, the search only chooses which layers of the source to cut.",
    )
    objective: ObjectiveSection | None = Field(
        None,
        description="The lm-eval tasks the search optimises (the tailor command's tailor.objective); required "
        "when compare.methods names tailor. Tasks that compare.zeroshot also reports are named in the table's "
        "header: the tailor row's scores on them are not held out.",
    )
    trials: int = Field(
        500,
        ge=1,
        description="Trials in all, warm starts included (the tailor command's tailor.trials). Another value "
        "for a finished tailor model is refused, as is any other change of its search: use another output_dir.",
    )
    budgets: BudgetSection = Field(default_factory=BudgetSection, description="Multi-fidelity budgets.")
    warm_start: WarmStartSection | None = Field(
        None,
        description="Heuristic warm start (the tailor command's tailor.warm_start); null: its default heuristics "
        "with Block Influence on the comparison's calibration text (compare.calibration: its files, which must "
        "be local .txt or .jsonl, num_samples and seq_len, one document per sample).",
    )
    sampler: Literal["tpe", "random"] = TailorSection.model_fields["sampler"]
    seed: int = TailorSection.model_fields["seed"]
    merge_methods: list[Literal["task_arithmetic", "ties", "linear"]] = TailorSection.model_fields[
        "merge_methods"
    ]

    @field_validator("merge_methods")
    @classmethod
    def _merge_methods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"give at least one of {list(MERGE_METHODS)}")
        return v


class SurgeonOptions(Section):
    """The LLM Surgeon in the comparison (method ``surgeon``, a surgeon run in output_dir/surgeon-run/).

    It prunes rows and columns of every decoder linear (``structures: rows_columns``) to
    ``target_size = (L - n) / L``, the decoder-linear weights a depth method keeps when it removes n of
    L equal blocks, and keeps every layer. Its calibration text is ``compare.calibration``. There is
    no ``structures`` key: element and 2:4 pruning keep every matrix at its size, so the table's
    stored-parameter axis would mislead.
    """

    shots: int = Field(
        8,
        ge=1,
        description="Shots of the linear schedule to the target size, the curvature re-estimated before each "
        "(the paper: 8 shots per 10% removed; fewer are cheaper, each is a forward/backward pass over the "
        "calibration text per group of compare.surgeon.blocks_per_pass blocks).",
    )
    # the surgeon command's own fields (docs/surgeon.md)
    damp_g: float = SurgeonSection.model_fields["damp_g"]
    damp_a: float = SurgeonSection.model_fields["damp_a"]
    fisher: Literal["empirical", "sampled"] = SurgeonSection.model_fields["fisher"]
    blocks_per_pass: int | None = SurgeonSection.model_fields["blocks_per_pass"]
    factors: Literal["memory", "disk"] = SurgeonSection.model_fields["factors"]
    lora: bool = Field(
        False,
        description="The first-order LoRA correction after every shot, absorbed into the weights, with the "
        "surgeon's defaults (surgeon.lora); the paper's structured runs do not use it.",
    )


class SpeedSection(Section):
    """Measured cost of every model and of the source, in one process, one after another."""

    prompt_tokens: int = Field(128, ge=1, description="Tokens of the prefill.")
    decode_tokens: int = Field(
        32, ge=1, description="Tokens generated one at a time with a KV cache after it."
    )
    repeats: int = Field(
        3, ge=1, description="Timed repetitions (after one warm-up); the median is reported."
    )


class CompareSection(Section):
    """Which methods to compare, at which ratio, and how they are judged."""

    methods: list[str] = Field(
        default_factory=lambda: [m for m in METHODS if m not in COMMAND_METHODS],
        description=f"Methods to build and compare, any of {list(METHODS)} (default: all but "
        f"{list(COMMAND_METHODS)}, which need settings of their own).",
    )
    ratio: float = Field(0.3, gt=0, lt=1, description="Fraction of the blocks every method removes.")
    ratio_rule: Literal["round", "paper_params"] = Field(
        "round", description="round: round(ratio x L) blocks; paper_params: floor(ratio x L)."
    )
    metric: str = Field(
        "block_influence", description="Block importance of the FlexiGPT family (ShortGPT's Block Influence)."
    )
    calibration: CalibrationSection = Field(
        default_factory=CalibrationSection,
        description="The one calibration text of every method (importance, ranges, maps, SLEB's perplexities).",
    )
    selection: SelectionSection = Field(
        default_factory=SelectionSection, description="FlexiGPT base selection."
    )
    replace: ReplaceSection = Field(default_factory=ReplaceSection, description="FlexiGPT replacement slots.")
    baselines: BaselineOptions = Field(
        default_factory=BaselineOptions, description="Options of the baselines."
    )
    surgeon: SurgeonOptions = Field(
        default_factory=SurgeonOptions,
        description="Method surgeon: the LLM Surgeon pruned to the depth methods' decoder-linear size.",
    )
    recovery: Literal["equal", "none"] = Field(
        "equal",
        description="equal: every method gets the train: budget (FlexiGPT its adapters and norms, ShortGPT+LoRA "
        "its LoRA, reverse order its last blocks and head, the other plain models every parameter); none: "
        "no method trains (training-free comparison; LLM-Streamline still trains its replacement block).",
    )
    perplexity: dict[str, PerplexitySection] = Field(
        default_factory=dict,
        description="Named texts the table reports perplexity on (e.g. the recipe's text, WikiText-2 test at "
        "2048 and at 4096 tokens); empty: data.eval, disjoint windows of data.seq_len.",
    )
    zeroshot: ZeroShotSection | None = Field(
        None, description="lm-eval tasks (acc and acc_norm both printed); null: none."
    )
    speed: SpeedSection | None = Field(
        default_factory=SpeedSection,
        description="Prefill / decode time per token and peak memory; null: skip.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where models are built and evaluated."
    )
    norm_after: int | None = Field(
        None,
        ge=1,
        description="flexigpt_late_norm: the recovery step after which its output norms are added (gamma "
        "measured on the trained slots); null: half of train.max_steps. compare.replace.norm_after stays null "
        "(flexigpt itself has its norm from the start).",
    )
    tailor: CompareTailorSection = Field(
        default_factory=CompareTailorSection,
        description="The method tailor (GPTailor): its variants, objective and search; read only when "
        "compare.methods names tailor.",
    )
    lr: dict[str, float] = Field(
        default_factory=dict,
        description="Recovery learning rate per method (method -> lr), e.g. {shortgpt: 2.0e-4} for the full "
        "fine-tuning of a plain model beside adapters at train.lr; a method not named here trains at train.lr "
        "(the trainer's default for its trainable set when train.lr is null). The recovery tokens stay equal; "
        "the table states each method's lr.",
    )

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in METHODS]
        if not v or bad or len(set(v)) != len(v):
            raise ValueError(f"methods={v}: name distinct methods of {list(METHODS)}")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        methods = info.data.get("methods") or []
        bad = {m: lr for m, lr in v.items() if m not in methods or not lr > 0}
        if bad:
            raise ValueError(f"lr={bad}: name methods of compare.methods {methods}, each with an lr > 0")
        return v

    @model_validator(mode="after")
    def _check_section(self) -> CompareSection:
        for m in self.methods:
            set_ = NORM_METHODS.get(m, ("", {}))[1]
            if (
                set_
                and "flexigpt" in self.methods
                and set_ == {k: self.replace.model_dump()[k] for k in set_}
            ):
                raise ValueError(
                    f"methods: {m} sets replace {set_}, which compare.replace already holds, so it would be "
                    "flexigpt built twice; drop one of the two"
                )
        if "tailor" in self.methods and self.tailor.objective is None:
            raise ValueError(
                "tailor.objective: the method tailor needs the lm-eval tasks its search optimises, e.g. "
                "compare.tailor.objective={tasks: [arc_easy]}"
            )
        return self


class CompareRecipe(CommandRecipe):
    """Compare depth-pruning methods (``compare:``) with one recovery budget (``train:``, ``data:``)."""

    command_section: ClassVar[str] = "compare"
    plan_made: ClassVar[str] = "every method's model"
    kind: Literal["compare"] = Field("compare", description="Recipe kind.")
    compare: CompareSection = Field(default_factory=CompareSection, description="The comparison.")

    @model_validator(mode="after")
    def _check_compare(self) -> CompareRecipe:
        c, steps = self.compare, self.train.max_steps
        if c.replace.norm_after is not None:
            raise ValueError(
                "compare.replace.norm_after: leave it null; the method flexigpt_late_norm adds the norm later, "
                "at compare.norm_after"
            )
        if "flexigpt_late_norm" in c.methods:
            if c.recovery != "equal":
                raise ValueError(
                    "compare.methods: flexigpt_late_norm adds its norm during the recovery, so it needs "
                    "compare.recovery: equal (with none it is the flexigpt_no_norm model)"
                )
            if c.norm_after is None and (steps is None or steps < 2):
                raise ValueError(
                    "compare.norm_after: set it for flexigpt_late_norm (its default, half of train.max_steps, needs "
                    f"train.max_steps >= 2, not {steps})"
                )
            if c.norm_after is not None and steps is not None and c.norm_after >= steps:
                raise ValueError(f"compare.norm_after={c.norm_after}: must be below train.max_steps={steps}")
        if not self.compare.perplexity and self.data.eval is None:
            raise ValueError(
                "compare.perplexity is empty and data.eval is null: name at least one text to judge on"
            )
        return self


register_recipe_kind("compare", CompareRecipe)
