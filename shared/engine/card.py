"""The model card (``README.md``) that every compact checkpoint directory carries.

transformers alone answers a compact directory (``model_type: "flexigpt"``) with "does not
recognize this architecture ... upgrade transformers / install from source", which sends a reader
the wrong way. The card says what the directory is (a shared-block model of this package, with its
source architecture), how many parameters it stores against its dense (materialised) size, which
block every slot runs and what each slot adds, the lines that load it, and how to get a plain
model. ``config.json`` carries a one-line version of the load hint (``autoclass.LOAD_HINT``) for a reader who
opens that file first.
"""

from __future__ import annotations

from collections import Counter

from transformers import PreTrainedModel

from flexigpt.shared.engine.apply import (
    SOURCE_CLASSES,
    iter_slot_params,
    stored_param_count,
)
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.parts import ADAPTER, OUT_NORM, OWN_NORM
from flexigpt.shared.engine.plan import Plan, SlotSpec

CARD_NAME = "README.md"


def dense_param_count(model: PreTrainedModel) -> int:
    """Parameters of the plain model of the same depth: one private block per slot, adapters merged.

    Output feature norms are not counted: the plain architecture has no place for them.
    """
    cfg = model.source_config
    return get_layout(cfg).top_param_count(cfg) + model.plan.num_slots * get_layout(cfg).block_param_count(
        cfg
    )


def model_card(model: PreTrainedModel, name: str, *, with_tokenizer: bool = False) -> str:
    """The README.md of a compact checkpoint of `model` saved as directory `name`.

    Args:
        model: the shared model being saved (``apply_plan`` / ``load_compact``).
        name: the directory's name, used in the loading lines.
        with_tokenizer: the tokenizer files are saved beside the weights.
    """
    plan: Plan = model.plan
    cfg = model.source_config
    layout = get_layout(cfg)
    stored, dense = stored_param_count(model), dense_param_count(model)
    owned: Counter[str] = Counter()
    for _, _, role, p in iter_slot_params(model):
        owned[role] += p.numel()
    source_name = getattr(cfg, "_name_or_path", "")
    removed = ", ".join(map(str, plan.removed_blocks)) or "none"
    lines = [
        "---",
        "library_name: flexigpt",
        "pipeline_tag: text-generation",
        "tags: [flexigpt, shared-blocks]",
        "---",
        "",
        f"# {name}: a flexigpt compact shared-block model",
        "",
        f"A {layout.description} model (`{SOURCE_CLASSES[layout.model_type].__name__}`"
        + (f", from `{source_name}`" if source_name else "")
        + ") "
        f"saved in the compact format of the flexigpt package: {plan.num_slots} slots over "
        f"{len(plan.physical_blocks)} physical blocks of a {plan.num_source_layers}-block source "
        f"(removed blocks: {removed}). Each block's weights are stored once and run by every slot that "
        "names it; a slot may add low-rank adapters, private norms and an output feature norm of its own.",
        "",
        "transformers alone does not know `model_type: flexigpt` (its message suggests upgrading "
        "transformers, which does not help). Install flexigpt and import it first.",
        "",
        "## Parameters",
        "",
        "| | parameters |",
        "|---|---:|",
        f"| stored here (each block once) | {stored:,} |",
        f"| dense (materialised: one private block per slot, adapters merged) | {dense:,} |",
        f"| slot adapters | {owned[ADAPTER]:,} |",
        f"| slot output norms | {owned[OUT_NORM]:,} |",
        f"| slot private norms | {owned[OWN_NORM]:,} |",
        "",
        f"Hidden size {cfg.hidden_size}, vocabulary {cfg.vocab_size}, "
        f"{'tied' if cfg.tie_word_embeddings else 'untied'} embeddings.",
        "",
        "## Slot map",
        "",
        "| slot | block | | adapter | output norm | own norms |",
        "|---:|---:|---|---|---|---|",
        *(_slot_row(i, s, plan) for i, s in enumerate(plan.slots)),
        "",
        "## Load",
        "",
        "```bash",
        "pip install flexigpt   # or, in a clone of the project: pip install -e .",
        "```",
        "",
        "```python",
        "import flexigpt.shared  # registers model_type 'flexigpt' with transformers' Auto classes",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        "```",
        "",
        f"Run it beside this directory, or give its full path. The result is a `{type(model).__name__}` (a "
        f"subclass of `{SOURCE_CLASSES[layout.model_type].__name__}`) with the sharing restored (the same "
        "Parameter objects in every slot of a block) and the plan as `model.plan` (also in `plan.json`)."
        + (
            " The tokenizer is saved here too: `AutoTokenizer.from_pretrained` reads it."
            if with_tokenizer
            else ""
        ),
    ]
    lines += ["", "## A plain model", "", *_plain_lines(plan, name)]
    return "\n".join(lines) + "\n"


def _slot_row(i: int, s: SlotSpec, plan: Plan) -> str:
    owner = plan.owner_slot(s.block)
    runs = "stores it" if owner == i else f"reuses it (stored with slot {owner})"
    adapter = "-"
    if s.adapter is not None:
        a = s.adapter
        pattern = "".join(f", {t}: rank {r}" for t, r in a.rank_pattern.items())
        src = f" from block {a.svd_from}" if a.svd_from is not None else ""
        adapter = f"rank {a.rank} on {', '.join(a.targets)}{pattern} (init {a.init}{src})"
    norm = f"yes (gamma {s.out_norm.gamma:g} at the start)" if s.out_norm is not None else "-"
    return f"| {i} | {s.block} | {runs} | {adapter} | {norm} | {'yes' if s.own_norms else '-'} |"


def _plain_lines(plan: Plan, name: str) -> list[str]:
    with_norm = [i for i, s in enumerate(plan.slots) if s.out_norm is not None]
    if with_norm:
        return [
            f"{'Slots' if len(with_norm) > 1 else 'Slot'} {', '.join(map(str, with_norm))} "
            f"{'have' if len(with_norm) > 1 else 'has'} output feature norms, which the plain architecture "
            "cannot hold (a "
            "per-token normalisation does not fold into a linear layer), so this model has no plain export. "
            "`flexigpt.shared.engine.apply.materialize(model, keep_output_norm=True)` gives the dense model "
            "in memory, the norms kept as modules."
        ]
    return [
        "A plain checkpoint of the source architecture (one private block per slot, adapters merged), "
        "which transformers loads without this package:",
        "",
        "```python",
        "from flexigpt.shared.engine.checkpoint import export_materialized",
        "",
        f'export_materialized(model, "{name}-plain")',
        "```",
        "",
        "From a training checkpoint, `flexigpt-train export CHECKPOINT OUT_DIR --materialize` writes both.",
    ]
