"""From a plan to a grown model, and the parameter arithmetic the grow command reports.

``grow_model`` dispatches on the plan's kind: a shared ``Plan`` goes to the engine's
``apply_plan`` (new slots reuse their block's Parameters), a ``DensePlan`` to ``grow_dense``
(private copies). ``param_counts`` predicts, from the config alone, what the grown model stores
and what its dense equivalent (a plain model of the same depth) would store; the grow command
checks the prediction against the built model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel

from flexigpt.shared.engine.apply import apply_plan, check_plan_fits, expected_trainable, stored_param_count
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import Plan, PlanError

from .dense import dense_param_count, grow_dense
from .strategies import DensePlan, GrowError


@dataclass(frozen=True)
class ParamCounts:
    """Parameter arithmetic of a grown model (every figure counts a shared tensor once)."""

    source: int
    """Parameters of the source model."""
    stored: int
    """Parameters the grown model stores."""
    dense_equivalent: int
    """Parameters of a plain model of the grown depth (every layer a private block)."""
    new_slot_params: int
    """What the new layers add: adapters + norms (shared) or whole blocks (dense)."""
    layers: int
    """Depth of the grown model."""

    def describe(self) -> str:
        """One line for the command's output."""
        return (
            f"stored parameters: {self.stored:,} = source {self.source:,} + new {self.new_slot_params:,}; "
            f"dense {self.layers}-layer equivalent {self.dense_equivalent:,} "
            f"(stored / dense = {self.stored / self.dense_equivalent:.2%})"
        )


def check_fits(plan: Plan | DensePlan, source_config: PretrainedConfig) -> None:
    """Check `plan` against the source config before any weight is loaded.

    Raises:
        GrowError: the source's architecture is not supported (or refused, as post-LN OPT), an
            adapter targets a linear it lacks (OPT: gate) or its rank exceeds a targeted matrix
            (named as the ``grow.adapter`` key to change), or the plan is for another architecture
            or depth.
    """
    try:  # an unsupported family, or one the engine refuses (post-LN OPT), is the source's fault
        layout = get_layout(source_config)
    except PlanError as e:
        raise GrowError(f"model.source: {e}") from None
    if isinstance(plan, DensePlan):
        if (plan.model_type, plan.num_source_layers) != (
            source_config.model_type,
            source_config.num_hidden_layers,
        ):
            raise GrowError(
                f"dense plan for {plan.model_type}/{plan.num_source_layers} layers does not fit the source"
            )
        return
    shapes = layout.matrix_shapes(source_config)
    for spec in [s.adapter for s in plan.slots if s.adapter is not None]:
        if layout.missing_targets(spec.targets):
            raise GrowError(layout.targets_message("grow.adapter.targets", spec.targets))
        for t in spec.targets:
            r, (out_f, in_f) = spec.rank_for(t), shapes[t]
            if r > min(out_f, in_f):
                key = f"grow.adapter.rank_pattern.{t}" if t in spec.rank_pattern else "grow.adapter.rank"
                raise GrowError(
                    f"{key}={r} exceeds target {t!r} of this model ({out_f}x{in_f}): allowed 1..{min(out_f, in_f)}; "
                    "lower it (grow.adapter.rank_pattern sets one target's rank)"
                )
    check_plan_fits(plan, source_config)


def param_counts(plan: Plan | DensePlan, source_config: PretrainedConfig) -> ParamCounts:
    """Predict the parameter counts of growing a `source_config` model by `plan` (no weights needed).

    Args:
        plan: a shared or dense growth plan.
        source_config: the source model's config.

    Returns:
        The counts; for a shared plan ``stored`` is the engine's own prediction of the compact model.
    """
    source = dense_param_count(source_config, source_config.num_hidden_layers)
    if isinstance(plan, Plan):
        layers = plan.num_slots
        stored = expected_trainable(plan, source_config, "all")
    else:
        layers = plan.num_layers
        stored = dense_param_count(source_config, layers)
    return ParamCounts(source, stored, dense_param_count(source_config, layers), stored - source, layers)


def grow_model(
    source: PreTrainedModel, plan: Plan | DensePlan, *, seed: int | None = None
) -> PreTrainedModel:
    """Grow `source` (consumed) by `plan` and check the stored parameter count against the prediction.

    Args:
        source: a loaded plain model of a supported family.
        plan: a shared ``Plan`` (FlexiGPT block / sequential) or a ``DensePlan`` (baselines).
        seed: seeds torch before the new slots are initialised (random LoRA A), so every rank and
            every rebuild gets the same model; None leaves the RNG as it is.

    Returns:
        The grown model: a ``Shared<Family>ForCausalLM`` or a plain ``<Family>ForCausalLM``.

    Raises:
        GrowError: the source is already a shared-block model, or the built model stores another
            number of parameters than the plan predicts.
    """
    if getattr(source, "plan", None) is not None:
        raise GrowError(
            "the source is a shared-block (compact) model; grow a plain model (materialise it first with "
            "flexigpt.shared.engine.checkpoint.export_materialized if it has no output norms)"
        )
    config = source.config
    check_fits(plan, config)
    want = param_counts(plan, config).stored
    if seed is not None:
        torch.manual_seed(seed)
    model = apply_plan(source, plan) if isinstance(plan, Plan) else grow_dense(source, plan)
    got = stored_param_count(model)
    if got != want:
        raise GrowError(f"the grown model stores {got:,} parameters, the plan predicts {want:,}")
    return model
