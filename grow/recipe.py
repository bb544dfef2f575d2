"""The ``grow`` recipe: the shared sections plus a ``grow:`` section (kind ``grow``).

Every option of the ``grow:`` section is documented where it is declared; where the paper is silent
(``docs/method.md`` section 6, ambiguity 10) the description says which reading
the default is. ``describe_recipe(GrowRecipe)`` prints them all; ``docs/growing.md`` explains them.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from flexigpt.shared.command import CommandRecipe
from flexigpt.shared.engine.plan import TARGETS, AdapterSpec, OutNormSpec
from flexigpt.shared.recipe import Section, register_recipe_kind

from .strategies import STRATEGIES, GrowOptions

Target = Literal["q", "k", "v", "o", "gate", "up", "down"]


class GrowAdapterSection(Section):
    """Low-rank adapters of every new (repeated) slot; the first occurrence of a block has none."""

    rank: int = Field(
        256,
        ge=1,
        description="LoRA rank r. The paper gives r=256 for pruning and says extension uses the same setup; "
        "on TinyLlama that is 9.18M parameters per copy (128.5M for 14 copies).",
    )
    targets: list[Target] = Field(
        default_factory=lambda: list(TARGETS),
        description="Linear layers that get an adapter. Default all seven projections (the paper's lost "
        "footnote 2; the reading that fits its parameter count). OPT has no gate: [q, k, v, o, up, down].",
    )
    init: Literal["zero", "lora"] = Field(
        "lora",
        description="lora: B = 0, A Kaiming-random (standard LoRA; the copy starts as its source block and "
        "the adapter trains from step one; the reading of ambiguity 10, since SVD init has no target when "
        "growing). zero: A = B = 0; both factors then get zero gradients and stay zero, so the copy keeps "
        "exactly its block's weights (for exact-copy checks, or to train only the norms).",
    )
    alpha: float | None = Field(
        None,
        gt=0,
        description="LoRA alpha (scale alpha / r); null: alpha = r, scale 1 (the paper gives none).",
    )
    rank_pattern: dict[Target, int] = Field(
        default_factory=dict, description="Per-target rank overrides, e.g. {k: 64, v: 64}."
    )

    def spec(self) -> AdapterSpec:
        """The engine's AdapterSpec of this section."""
        return AdapterSpec(
            rank=self.rank,
            targets=tuple(self.targets),
            init=self.init,
            alpha=self.alpha,
            rank_pattern=dict(self.rank_pattern),
        )


class GrowOutNormSection(Section):
    """Output feature norm (paper eq. 6) on the attention and MLP outputs of every new slot."""

    gamma: float = Field(
        0.01,
        ge=0,
        description="Initial value of every gamma entry. Not reported by the paper ('a small value'); 0 makes "
        "each new slot add nothing, so the grown model computes exactly the source model (only gamma gets a "
        "gradient at the first step); 0.01 (default) starts close to it and the adapters' B factors get "
        "gradients from the first step.",
    )
    eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon (not given by the paper).")

    def spec(self) -> OutNormSpec:
        """The engine's OutNormSpec of this section."""
        return OutNormSpec(gamma=self.gamma, eps=self.eps)


class GrowSection(Section):
    """Depth expansion: which blocks repeat, in which order, and what the new slots start as."""

    strategy: str = Field(
        "block",
        description="block | sequential (FlexiGPT, shared slots), llama_pro | stack | solar (dense baselines), "
        "solar_shared (SOLAR's map over shared blocks).",
    )
    start: int = Field(3, ge=0, description="First block of the repeated span (0-based).")
    end: int | None = Field(
        16,
        ge=0,
        description="Last block of the span, inclusive (0-based); null: derived from target_layers. Default "
        "3..16: 14 blocks repeated once take TinyLlama 22 -> 36 (the paper's example '3 through 18' would "
        "give 38 layers inclusive, 37 half-open).",
    )
    stride: int = Field(
        1,
        ge=1,
        description="Repeat every stride-th block of start..end (LLaMA-Pro's own layout: a copy after every 4th).",
    )
    repeat: int = Field(1, ge=1, description="Copies added per repeated block.")
    target_layers: int | None = Field(
        None, ge=1, description="Depth the grown model must have (checked against the span); null: no check."
    )
    adapter: GrowAdapterSection | None = Field(
        default_factory=GrowAdapterSection,
        description="Adapters of the new slots (block / sequential only); null: none.",
    )
    out_norm: GrowOutNormSection | None = Field(
        default_factory=GrowOutNormSection,
        description="Output feature norm of the new slots (block / sequential only); null: none.",
    )
    own_norms: bool = Field(
        True,
        description="New slots own their input / post-attention norms, initialised from their source block "
        "(the paper: repeated blocks have 'unique ... normalisation parameters'); false: share them.",
    )
    placement: Literal["block", "sequential"] | None = Field(
        None,
        description="Order of the dense baselines' copies; null: the strategy's own (llama_pro: block, a copy "
        "right after its source, as LLaMA-Pro; stack: sequential, a repeated slice as mergekit's passthrough).",
    )

    @model_validator(mode="after")
    def _check(self) -> GrowSection:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; allowed: {sorted(STRATEGIES)}")
        if self.end is not None and self.end < self.start:
            raise ValueError(f"end={self.end} is before start={self.start}; the span is start..end inclusive")
        if self.end is None and self.target_layers is None:
            raise ValueError("end: null needs target_layers (the span is derived from it)")
        dense = STRATEGIES[self.strategy].kind == "dense"
        if dense:
            # set explicitly to something other than "none" is a mistake worth naming; null / false
            # (or leaving them out) is how a recipe written for a shared strategy switches to a dense one
            given = self.model_fields_set
            shared_only = [
                k
                for k in ("adapter", "out_norm", "own_norms")
                if k in given and getattr(self, k) not in (None, False)
            ]
            if shared_only:
                raise ValueError(
                    f"{', '.join(shared_only)}: only the shared strategies (block, sequential) have adapters and "
                    f"norms on the new slots; strategy={self.strategy!r} makes dense copies (set them to null / false)"
                )
        elif self.placement is not None:
            raise ValueError(
                f"placement: only the dense strategies (llama_pro, stack) take it; strategy={self.strategy!r} is "
                "its own order"
            )
        return self

    def options(self) -> GrowOptions:
        """The strategies' options for this section."""
        dense = STRATEGIES[self.strategy].kind == "dense"
        default_placement = "sequential" if self.strategy == "stack" else "block"
        return GrowOptions(
            start=self.start,
            end=self.end,
            stride=self.stride,
            repeat=self.repeat,
            target_layers=self.target_layers,
            adapter=None if dense or self.adapter is None else self.adapter.spec(),
            out_norm=None if dense or self.out_norm is None else self.out_norm.spec(),
            own_norms=self.own_norms and not dense,
            placement=self.placement or default_placement,
        )


class GrowRecipe(CommandRecipe):
    """Grow a model in depth (``grow:``), then continue pre-training it (``train:``, ``data:``)."""

    command_section: ClassVar[str] = "grow"
    kind: Literal["grow"] = Field("grow", description="Recipe kind.")
    grow: GrowSection = Field(default_factory=GrowSection, description="Depth expansion.")

    @model_validator(mode="after")
    def _check_grow(self) -> GrowRecipe:
        kind = STRATEGIES[self.grow.strategy].kind
        if kind == "dense" and self.train.trainable != "all":
            raise ValueError(
                f"train.trainable={self.train.trainable!r}: a dense grown model has no adapters or slot norms; set "
                "train.trainable=all (which layers of it train is the strategy's rule: llama_pro trains the copies)"
            )
        if kind == "shared" and self.grow.adapter is None and self.train.trainable == "adapters":
            raise ValueError("train.trainable='adapters' with grow.adapter=null leaves nothing to train")
        return self


register_recipe_kind("grow", GrowRecipe)
