"""The ``surgeon`` recipe (kind ``surgeon``): the LLM Surgeon and its baselines, run by ``flexigpt-prune``.

Every option is documented where it is declared; ``docs/surgeon.md`` explains them. This module
imports no torch, so a bad recipe is refused at once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from flexigpt.shared.evaluate.cli import PerplexitySection
from flexigpt.shared.recipe import BaseRecipe, Section, StreamSection, TrainSection, register_recipe_kind

Method = Literal["magnitude", "l_obd", "k_obd", "surgeon"]
Target = Literal["q", "k", "v", "o", "gate", "up", "down"]


class SurgeonError(ValueError):
    """A surgeon run is refused; the message names the recipe key and what is allowed."""


class SurgeonCalibration(Section):
    """Calibration windows: the text the curvature (and L-OBD's activations) is measured on."""

    stream: StreamSection | None = Field(
        None,
        description="Where the calibration documents come from; null: the recipe's data stream (data.source, "
        "data.files / data.hub_id, data.split). The paper: WikiText-2 train.",
    )
    num_samples: int = Field(128, ge=1, description="Calibration windows (the paper: 128).")
    seq_len: int = Field(
        2048,
        ge=2,
        description="Tokens per window. The paper's released code uses 4096 for LLaMA-2 (2048 for OPT); must fit "
        "the model's max_position_embeddings.",
    )
    pack: bool = Field(
        True, description="true: documents joined into full seq_len windows; false: one document per window."
    )


class SurgeonLora(Section):
    """The first-order correction: LoRA trained after each shot and absorbed, pruned weights kept at zero."""

    enabled: bool = Field(
        False,
        description="Train LoRA adapters on the decoder linears after every shot and absorb them into the "
        "weights (pruned weights stay zero). The paper's structured runs do not use it.",
    )
    rank: int = Field(8, ge=1, description="Adapter rank (the released code: 8).")
    alpha: float | None = Field(
        None,
        gt=0,
        description="LoRA alpha (scale alpha / rank); null: alpha = rank, scale 1 (the released code).",
    )
    lr: float = Field(1e-4, gt=0, description="Adam learning rate of the adapters (the released code: 1e-4).")
    samples: int = Field(
        3,
        ge=1,
        description="Calibration windows trained on after each shot, a seeded random subset drawn per shot "
        "(the released code: 2.5% of the windows, 3 of 128); at most calibration.num_samples.",
    )
    epochs: int = Field(
        1, ge=1, description="Passes over those windows after each shot (the released code: 1)."
    )
    batch: int = Field(
        1, ge=1, description="Windows per optimizer step (their gradients summed one window at a time)."
    )
    final_pass: bool = Field(
        True, description="After the last shot, one more correction on every calibration window."
    )
    final_epochs: int = Field(
        5,
        ge=1,
        description="Passes of the final correction over every window; the learning rate decays linearly "
        "over the passes (the released code: 5).",
    )
    targets: list[Target] = Field(
        default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"],
        description="Decoder linears that get an adapter (q, k, v, o, gate, up, down).",
    )

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"targets={v}: name one or more distinct linears of q, k, v, o, gate, up, down")
        return v


class SurgeonSection(Section):
    """What is pruned, how, and how far."""

    methods: list[Method] = Field(
        default_factory=lambda: ["surgeon"],
        description="Methods to run, each from the source model on the same calibration: magnitude (identity "
        "curvature, no update), l_obd (activations only), k_obd (K-FAC costs without off-diagonal terms, no "
        "update), surgeon (K-FAC costs with compensation and the correlated update).",
    )
    structures: Literal["rows_columns", "2:4", "element"] = Field(
        "rows_columns",
        description="rows_columns: whole rows and columns of every decoder linear (structured; dead MLP units "
        "and heads are then cut out of the matrices); 2:4: at most two of every four consecutive input weights "
        "(target_size >= 0.5); element: single weights.",
    )
    target_size: float = Field(
        0.7,
        gt=0,
        lt=1,
        description="Fraction of the decoder-linear weights left non-zero after the last shot (the paper's "
        "'target size'; embeddings, norms and the LM head are never pruned).",
    )
    shots: int = Field(
        24,
        ge=1,
        description="Shots of the linear schedule to target_size; curvature is re-estimated on the pruned, "
        "updated model before each. The paper: 40 shots to 50%, i.e. 8 shots per 10%.",
    )
    save_sizes: list[float] = Field(
        default_factory=list,
        description="Intermediate sizes saved as variants too (each must fall on a shot of the schedule); "
        "target_size is always saved.",
    )
    damp_g: float = Field(0.01, ge=0, description="λ of G: G + λ·mean(diag G)·I (the paper's code: 0.01).")
    damp_a: float = Field(0.01, ge=0, description="λ of A: A + λ·mean(diag A)·I (the paper's code: 0.01).")
    fisher: Literal["empirical", "sampled"] = Field(
        "empirical",
        description="Labels of the gradients in G: the true next tokens (empirical Fisher) or drawn from the "
        "model's own prediction.",
    )
    update: Literal["correlated", "independent"] = Field(
        "correlated",
        description="surgeon's weight update: all removed rows (columns) of a layer solved jointly, or each on "
        "its own (the paper's ablation). Single weights (element, 2:4): correlated solves them jointly in "
        "groups of at most max_correlate; independent sums each weight's own update.",
    )
    max_correlate: int = Field(
        2000,
        ge=1,
        description="element and 2:4 with update: correlated: at most this many removed weights of a layer "
        "are solved jointly (whole rows together while they fit, longer rows in chunks); the released code "
        "uses 2000. Each group costs a solve of its size and an out x rows x in product.",
    )
    obd: bool = Field(
        False,
        description="surgeon only: ignore the off-diagonal curvature (diagonal costs, no update), which is "
        "exactly k_obd.",
    )
    blocks_per_pass: int | None = Field(
        None,
        ge=1,
        description="Blocks whose factors are collected in one calibration pass; null: all at once. Fewer "
        "blocks hold fewer factors in memory (LLaMA-2-7B: about 2.2 GB fp32 per block) at one "
        "forward/backward pass over the calibration per group.",
    )
    factors: Literal["memory", "disk"] = Field(
        "memory",
        description="Where factors wait between the costs and the update: memory, or one file per layer in "
        "output_dir (removed after the shot) so that only one layer's factors are in memory then.",
    )
    lora: SurgeonLora = Field(
        default_factory=SurgeonLora,
        description="The first-order correction between shots (every method of the run gets it when enabled).",
    )
    calibration: SurgeonCalibration = Field(
        default_factory=SurgeonCalibration, description="Calibration text."
    )
    perplexity: PerplexitySection | None = Field(
        None,
        description="Held-out text each variant (and the unpruned model) is measured on; null: data.eval's "
        "stream, data.eval.batches x data.seq_len tokens in windows of data.seq_len.",
    )
    save_plain: bool = Field(
        True, description="Also export each variant as a plain model of the source architecture (zeros kept)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where pruning runs; auto: cuda if any."
    )
    seed: int = Field(0, description="Seed of the sampled Fisher labels.")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"methods={v}: name one or more distinct methods")
        return v

    @model_validator(mode="after")
    def _check(self) -> SurgeonSection:
        if self.structures == "2:4" and self.target_size < 0.5:
            raise ValueError(f"target_size={self.target_size}: 2:4 keeps at least half the weights (>= 0.5)")
        for s in self.save_sizes:
            self.shot_of(s)
        if self.lora.enabled and self.lora.samples > self.calibration.num_samples:
            raise ValueError(
                f"surgeon.lora.samples={self.lora.samples} exceeds surgeon.calibration.num_samples="
                f"{self.calibration.num_samples}; "
                f"allowed 1..{self.calibration.num_samples}"
            )
        return self

    def target(self, shot: int) -> float:
        """Fraction of the decoder-linear weights zero after `shot` (1-based) on the linear schedule."""
        return shot * (1.0 - self.target_size) / self.shots

    def shot_of(self, size: float) -> int:
        """The shot after which `size` is reached.

        Raises:
            ValueError: `size` is not on the schedule.
        """
        k = (1.0 - size) * self.shots / (1.0 - self.target_size)
        if not (size > self.target_size and size < 1 and abs(k - round(k)) < 1e-6):
            steps = [round(1 - self.target(i), 6) for i in range(1, self.shots)]
            raise ValueError(
                f"save_sizes: {size} is not an intermediate size of the {self.shots}-shot schedule to "
                f"{self.target_size}; allowed: {steps}"
            )
        return round(k)

    def saved_shots(self) -> dict[int, float]:
        """Shot -> size for every variant to save (the last shot included)."""
        out = {self.shot_of(s): s for s in self.save_sizes}
        out[self.shots] = self.target_size
        return dict(sorted(out.items()))


class SurgeonRecipe(BaseRecipe):
    """Prune a model with the LLM Surgeon (``surgeon:``); no training follows."""

    kind: Literal["surgeon"] = Field("surgeon", description="Recipe kind.")
    surgeon: SurgeonSection = Field(default_factory=SurgeonSection, description="The LLM Surgeon.")
    train: TrainSection = Field(
        default_factory=lambda: TrainSection(max_steps=1, grad_accum=1),
        description="Not read: no training follows the surgeon (every recipe kind has the section).",
    )

    @model_validator(mode="after")
    def _check_surgeon(self) -> SurgeonRecipe:
        if self.surgeon.perplexity is None and self.data.eval is None:
            raise ValueError(
                "surgeon.perplexity: null measures perplexity on data.eval, which is null too; set "
                "surgeon.perplexity (files or stream) or data.eval"
            )
        if self.model.plan is not None:
            raise ValueError("model.plan: the surgeon command prunes a plain model; set model.plan to null")
        return self


register_recipe_kind("surgeon", SurgeonRecipe)
