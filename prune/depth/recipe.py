"""The ``prune`` recipe: the shared sections plus a ``prune:`` section (kind ``prune``).

Every option is documented where it is declared. Where the paper is silent
(``docs/method.md`` section 6) the description names the ambiguity and the
reading the default takes; ``describe_recipe(PruneRecipe)`` prints them all and
``docs/pruning.md`` explains them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from flexigpt.shared.command import CommandRecipe
from flexigpt.shared.engine.plan import TARGETS
from flexigpt.shared.evaluate.cli import PerplexitySection
from flexigpt.shared.recipe import Section, StreamSection, register_recipe_kind

if TYPE_CHECKING:
    from flexigpt.prune.depth.replace import ReplacementOptions

Target = Literal["q", "k", "v", "o", "gate", "up", "down"]
Variant = Literal["flexigpt", "shortgpt", "shortgpt_lora"]
VARIANTS: tuple[str, ...] = ("flexigpt", "shortgpt", "shortgpt_lora")
# The metrics importance.py registers. The recipe is checked against these names so that a bad
# recipe is answered without importing torch; a metric registered by the user's own code (which has
# imported the registry by then) is accepted too.
BUILTIN_METRICS: tuple[str, ...] = ("block_influence", "angular_distance", "ppl_drop")


def importance_metric_names() -> list[str]:
    """The metric names a recipe may use: the built-in ones, plus any registered in this process."""
    registry = sys.modules.get("flexigpt.prune.depth.importance")
    names = dict.fromkeys(BUILTIN_METRICS)
    names.update(dict.fromkeys(getattr(registry, "IMPORTANCE_METRICS", {})))
    return list(names)


class CalibrationSection(Section):
    """Calibration text for block importance (and for ``replace.gamma: calibrate``)."""

    stream: StreamSection | None = Field(
        None,
        description="Where the calibration documents come from; null: the recipe's own data stream (data.source, "
        "data.files / data.hub_id, data.split, data.subsets). The paper used the validation split of MiniPile "
        "(hub id JeanKaddour/minipile), the split it also reports perplexity on; the 7B recipes set it.",
    )
    num_samples: int = Field(
        500,
        ge=1,
        description="Calibration sequences. Not given by the paper (ambiguity 9); reading: all 500 documents of "
        "MiniPile validation.",
    )
    seq_len: int = Field(
        2048,
        ge=2,
        description="Tokens per sequence at most. Not given by the paper (ambiguity 9); reading: the model "
        "context of the recovery run, 2048. Must fit the model's max_position_embeddings.",
    )
    pack: bool = Field(
        False,
        description="false: one document per sequence, truncated to seq_len (MiniPile documents are long); "
        "true: documents joined into full seq_len windows (for short-line corpora such as WikiText). BOS and "
        "EOS follow the recipe's text: rule, as in training and evaluation.",
    )
    gamma_stream: StreamSection | None = Field(
        None,
        description="Where replace.gamma: calibrate chooses gamma and gamma: measured measures it; null: the "
        "calibration stream. Either way, "
        "documents that are part of the start-perplexity text (prune.perplexity or data.eval) are skipped, so "
        "gamma is never chosen on the text it is then judged on. When the calibration stream is the "
        "perplexity text (the 7B recipes calibrate importance on MiniPile validation and report on it), name "
        "another split here.",
    )
    gamma_samples: int | None = Field(
        None, ge=1, description="Sequences of the gamma text (cut as for importance); null: num_samples."
    )


class SelectionSection(Section):
    """Base selection for the FlexiGPT variant (eq. 2-5): which kept block each removed block reuses."""

    rank: int = Field(256, ge=1, description="r of the low-rank metric (the paper: 256); clamped per matrix.")
    combine: Literal["sum", "sum_sq"] = Field(
        "sum",
        description="How the per-matrix distances of q, k, v, o, gate, up, down make a block distance. Not "
        "stated by the paper (ambiguity 3); reading: their sum.",
    )
    svd: Literal["exact", "randomized"] = Field(
        "exact",
        description="Rank-r factors by a truncated exact SVD, or torch.svd_lowrank (much faster on CPU for "
        "4096 x 11008 matrices; an approximation, confirm with exact when picks are close).",
    )
    low_rank_metric: bool = Field(
        True,
        description="Ablation switch (Table 4, 'high-rank prune'). false: plain ||W_i - W_j||_F on the full "
        "weights, the naive metric with which every removed block picks block 0 in the paper.",
    )
    all_pairs: bool = Field(
        False,
        description="Also compute kept-kept and removed-removed distances, for a full heatmap like the paper's "
        "Fig. 4 (more pairs, same picks).",
    )
    read_from: Literal["auto", "safetensors", "model"] = Field(
        "auto",
        description="Where the block weights come from. safetensors: the source's files, one tensor at a time "
        "(the original weights whatever model.dtype loads; works without the model in memory); model: the "
        "loaded model; auto: safetensors when the source has them, else the model.",
    )


class ReplaceSection(Section):
    """What replaces a removed block (FlexiGPT) and the LoRA of the ShortGPT+LoRA baseline."""

    rank: int = Field(
        256,
        ge=1,
        description="Adapter rank (the paper: 256); also the rank of the ShortGPT+LoRA baseline, whose LoRA "
        "configuration the paper does not state (reading: the same). Clamped per target to the matrix size.",
    )
    targets: list[Target] = Field(
        default_factory=lambda: list(TARGETS),
        description="Linears that get adapters. The paper's footnote 2 is lost (ambiguity 1); reading: all "
        "seven projections, the only choice that fits its 3.67% parameter overhead. OPT has no gate: "
        "[q, k, v, o, up, down].",
    )
    alpha: float | None = Field(
        None,
        gt=0,
        description="LoRA alpha; null: alpha = rank (scale 1). Not given (ambiguity 6); the SVD init is exact "
        "for any alpha (it is divided by the scale).",
    )
    svd_init: bool = Field(
        True,
        description="Ablation switch (Table 4, 'LoRA init'). true: adapters start as the top-r SVD of the full "
        "W_i - W_base (eq. 7-8; ambiguity 5: the full weights, not the metric's reconstructions); false: "
        "init_without_svd.",
    )
    svd: Literal["exact", "randomized"] = Field(
        "exact",
        description="The SVD of the adapter init (svd_init): exact (torch.linalg.svd) or randomized "
        "(torch.svd_lowrank, r + 10 columns, 2 power iterations: an approximation, seconds instead of about a "
        "minute per 4096 x 11008 matrix on a CPU; the plan records init=svd_randomized).",
    )
    init_without_svd: Literal["lora", "zero"] = Field(
        "lora",
        description="Adapter init when svd_init is false, and of the ShortGPT+LoRA baseline: lora (A random, "
        "B zero: the model starts as ShortGPT) or zero.",
    )
    out_norm: bool = Field(
        True,
        description="Ablation switch (Table 4, 'output norm'): a bias-free LayerNorm on the o_proj and "
        "down_proj outputs of every replacement slot (eq. 6).",
    )
    gamma: float | Literal["calibrate", "measured"] = Field(
        "measured",
        description="Initial output-norm gamma. Not reported by the paper (ambiguity 7). 'measured': per "
        "feature, the RMS of the SVD-initialised slot's own o_proj / down_proj output over that of its "
        "normalised output, measured on the gamma text, so the norm starts near identity in scale (the "
        "default: on the quickstart's 2M-parameter model it recovered as well as no norm and far better than "
        "0.01, docs/comparison.md); a number >= 0 (every entry; 0.01 is the paper's reading, which starts the "
        "slot's attention and MLP outputs at about 1% of their scale); 'calibrate': measure the perplexity on "
        "the gamma text for every gamma_candidates value and keep one by gamma_rule (gamma 0 is exactly the "
        "ShortGPT model, the default target).",
    )
    gamma_candidates: list[float | Literal["measured", "none"]] = Field(
        default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
        description="Values tried by gamma: calibrate (ambiguity 7's reading: sweep 1e-3..1e-1): numbers > 0, "
        "'measured' (the measured gammas) and 'none' (the slots without the output norm: when chosen, the "
        "plan and the model have no output norm at all, exactly as with out_norm: false).",
    )
    gamma_rule: Literal["largest_below", "closest"] = Field(
        "largest_below",
        description="largest_below: of the candidates whose perplexity is not above ShortGPT's, the one through "
        "which the slots contribute most (numbers by size, then 'measured', then 'none'; the paper's start "
        "PPL 21.82 is just below ShortGPT's 22.76); closest: the candidate nearest to it in log-perplexity.",
    )
    norm_after: int | None = Field(
        None,
        ge=1,
        description="Add the output norm only after this many recovery steps: the FlexiGPT model is built and "
        "trained without it up to that step, then every replacement slot gets its norm, gamma set by gamma "
        "(a number, or 'measured' on the trained slots' own outputs), and the recovery continues with the same "
        "schedule and data stream to the end (the optimizer moments start again). The model before recovery "
        "is then the no-norm model. null: the norm is there from the start.",
    )
    out_norm_eps: float = Field(1e-5, gt=0, description="Output-norm epsilon (not given by the paper).")
    own_norms: bool = Field(
        False,
        description="false: a replacement slot shares the base block's input / post-attention norms with the "
        "rest of the block (ambiguity 15's reading); true: private copies, initialised from the removed block.",
    )

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not v >= 0:
            raise ValueError(f"gamma={v}: must be >= 0, 'measured' or 'calibrate'")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"targets={v}: need one or more distinct targets of {list(TARGETS)}")
        return v

    @field_validator("gamma_candidates")
    @classmethod
    def _candidates(cls, v: list[float | str]) -> list[float | str]:
        if not v or any(not isinstance(g, str) and not g > 0 for g in v) or len(set(v)) != len(v):
            raise ValueError(
                f"gamma_candidates={v}: need one or more distinct values > 0, 'measured' or 'none'"
            )
        return v


class PruneSection(Section):
    """Block pruning: how many blocks, which ones, what replaces them, and how the start is measured."""

    variants: list[Variant] = Field(
        default_factory=lambda: ["flexigpt"],
        description="Models to build from one importance pass: flexigpt (shared replacement slots), shortgpt "
        "(blocks deleted; also exported as a plain HF model), shortgpt_lora (ShortGPT + LoRA on every kept "
        "block). Each gets output_dir/<variant>/ and its own recovery run with the same train: budget.",
    )
    ratio: float = Field(0.3, gt=0, lt=1, description="Pruning ratio (the paper: 0.3 and 0.4).")
    ratio_rule: Literal["round", "paper_params"] = Field(
        "round",
        description="Blocks removed for the ratio (ambiguity 2). round: round(ratio x L), 10 / 13 of 32 at "
        "30% / 40%; paper_params: floor(ratio x L), 9 / 12 of 32 (9 fits the paper's 3.67% overhead).",
    )
    metric: str = Field(
        "block_influence",
        description="Block importance metric; the lowest-scoring blocks are removed in one shot. "
        "block_influence (eq. 1, ShortGPT), angular_distance, ppl_drop.",
    )
    calibration: CalibrationSection = Field(
        default_factory=CalibrationSection, description="Calibration text of the importance pass."
    )
    selection: SelectionSection = Field(
        default_factory=SelectionSection, description="Base selection (flexigpt variant only)."
    )
    replace: ReplaceSection = Field(default_factory=ReplaceSection, description="Replacement slots.")
    perplexity: PerplexitySection | None = Field(
        None,
        description="Where the start perplexity of every variant (and of the unpruned source) is measured; "
        "null: data.eval's stream, its first batches x micro_batch x seq_len tokens, windows of data.seq_len. "
        "The paper reports perplexity on MiniPile validation; context and stride are not given (ambiguity 9).",
    )
    shortgpt_recovery: Literal["none", "all"] = Field(
        "none",
        description="Recovery training of the shortgpt variant. none: it is not trained (the paper's ShortGPT "
        "rows); all: full fine-tuning with the same budget (a reading of the OPT table's undefined "
        "'ShortGPT + FT').",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where importance, selection, replacement and perplexity run; auto: cuda if any."
    )
    memory: Literal["whole", "per_block"] = Field(
        "whole",
        description="How much of the source is in memory. whole: the model is loaded once; per_block: never "
        "whole, each decoder block's matrices are read from the source's safetensors files when a forward, an "
        "SVD init or a checkpoint shard needs them and dropped after (one block at a time; needs a local "
        "safetensors source; checkpoints are written in 2GB shards). See docs/pruning.md section 5.",
    )

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"variants: name at least one of {list(VARIANTS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"variants={v}: each variant at most once")
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        allowed = importance_metric_names()
        if v not in allowed:
            raise ValueError(f"metric={v!r} is unknown; allowed: {sorted(allowed)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> PruneSection:
        if self.replace.gamma in ("calibrate", "measured") and not self.replace.out_norm:
            raise ValueError(
                f"replace.gamma={self.replace.gamma!r} needs replace.out_norm=true (there is no gamma without it)"
            )
        if self.memory == "per_block" and self.selection.read_from == "model":
            raise ValueError(
                "prune.selection.read_from='model' reads the blocks from the loaded model, which "
                "prune.memory='per_block' never loads; allowed with per_block: 'auto' or 'safetensors'"
            )
        return self

    def options(self) -> ReplacementOptions:
        """The replacement options of this section (gamma 'calibrate' or 'measured' holds 1.0 until the
        measurement: the plan of such a run takes its gamma from ``gamma.json``)."""
        return replacement_options(self.replace, self.selection)


def replacement_options(r: ReplaceSection, s: SelectionSection) -> ReplacementOptions:
    """The replacement options of a ``replace:`` and a ``selection:`` section (gamma 'calibrate' or
    'measured' holds 1.0 until it is measured)."""
    from flexigpt.prune.depth.replace import ReplacementOptions  # torch: only once a run starts

    gamma = 1.0 if isinstance(r.gamma, str) else float(r.gamma)
    return ReplacementOptions(
        rank=r.rank,
        targets=tuple(r.targets),
        alpha=r.alpha,
        svd_init=r.svd_init,
        init_without_svd=r.init_without_svd,
        svd_init_method=r.svd,
        out_norm=r.out_norm,
        gamma=gamma,
        out_norm_eps=r.out_norm_eps,
        own_norms=r.own_norms,
        low_rank_metric=s.low_rank_metric,
        metric_rank=s.rank,
        combine=s.combine,
        svd=s.svd,
    )


class PruneRecipe(CommandRecipe):
    """Prune a model (``prune:``), then train every variant's recovery (``train:``, ``data:``)."""

    command_section: ClassVar[str] = "prune"
    plan_made: ClassVar[str] = "the plans"
    kind: Literal["prune"] = Field("prune", description="Recipe kind.")
    prune: PruneSection = Field(default_factory=PruneSection, description="Block pruning.")

    @model_validator(mode="after")
    def _check_prune(self) -> PruneRecipe:
        r, t = self.prune.replace, self.train
        if r.norm_after is not None:
            if not r.out_norm or r.gamma == "calibrate":
                raise ValueError(
                    f"prune.replace.norm_after={r.norm_after} adds the output norm later: it needs out_norm: true "
                    f"and gamma a number or 'measured' (not out_norm={r.out_norm}, gamma={r.gamma!r})"
                )
            if t.max_steps is not None and r.norm_after >= t.max_steps:
                raise ValueError(
                    f"prune.replace.norm_after={r.norm_after}: must be below train.max_steps={t.max_steps} "
                    "(the steps trained with the norm come after it)"
                )
            if t.stop_at_step is not None:
                raise ValueError(
                    "train.stop_at_step: not with prune.replace.norm_after, whose first recovery phase stops there "
                    "itself; stop the command with a signal instead (a rerun resumes)"
                )
        if self.prune.perplexity is None and self.data.eval is None:
            raise ValueError(
                "prune.perplexity: null measures the start perplexity on data.eval, which is null too; set "
                "prune.perplexity (files or stream) or data.eval"
            )
        return self


register_recipe_kind("prune", PruneRecipe)
