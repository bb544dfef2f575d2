"""Self-speculative decoding: draft with the model minus its reusing slots, verify with the full model.

FlexiGPT §4.2 (docs/method.md): a shared-block model contains a cheaper model of itself. Skip the slots that
re-run a block another slot already runs (grown models) or that replace a removed block (pruned
models) and what is left is the original (or ShortGPT-pruned) network, with the same weights and
no extra parameters. That network drafts ``draft_len`` tokens one at a time; the full model scores
all of them in one forward; the longest agreeing prefix is kept, plus one token from the full
model. Greedy decoding returns the tokens of plain greedy decoding; sampling uses the standard
speculative-sampling acceptance rule (Leviathan et al. 2023, Chen et al. 2023), so every token
is distributed exactly as plain sampling from the full model would draw it.

Which slots draft (``draft_slots``): the *plain* slots (``SlotSpec.is_plain``: no adapter, no
output norm, shared norms), i.e. the original blocks. This covers both directions: in a grown
model the first occurrence of a block is plain and its copies carry adapters / output norms; in a
FlexiGPT-pruned model the kept blocks are plain and each replacement slot carries an SVD-initialised
adapter and output norm, wherever it sits in depth, before or after the owner slot of its base
block (so ``plan.reusing_slots()``, "later occurrences", would be wrong there). When no slot or
every slot is plain (plain stacking, where copies carry nothing of their own), the draft falls back
to the owner slots (first occurrence of each block), i.e. it skips ``plan.reusing_slots()``. A plan
with nothing to skip is refused.

How the draft runs without a copy of the weights, and why not transformers' assisted generation:
the draft is a *view*: an instance of the source CausalLM class whose embedding, final norm, rotary
embedding, head and decoder layers are the very module objects of the full model (nothing is
copied; its config has the draft's layer count and per-layer fields), so transformers' own forward
builds the masks (sliding windows included) and runs it. Each decoder layer's attention keeps the
fixed ``layer_idx`` of its slot, which indexes the KV cache; the draft therefore gets its own cache
(``SlotCache``) that maps each slot index to the layer's position in the view, so the masks (which
query the cache by position) and the attention updates (by slot index) agree. transformers'
assisted generation (``generate(assistant_model=...)``) cannot take that view: it builds the
assistant's cache itself from the assistant's config (one entry per draft layer) and the slots'
attention modules then write to indices beyond it; it also calls the assistant's whole
``generate`` once per round and varies the draft length by a heuristic. The loop below is shorter
than that machinery, keeps both caches right by cropping them to the accepted length after every
round (sliding-window layers record their past so that a rejected tail can be rolled back), and
reports acceptance statistics.

Batches (b >= 1 rows, left-padded prompts with their ``attention_mask``, as ``generate`` takes
them) run through the same loop with rectangular caches: every row drafts ``draft_len`` tokens,
the full model verifies all rows in one forward, and every row keeps m + 1 tokens, m being the
smallest accepted prefix over the rows still running; both caches are cropped by the same amount
for all rows. ``shared/speculative_batch.py`` holds the per-row bookkeeping and argues why the
cut keeps greedy and sampled tokens exact. Rows that end keep running on pad tokens, as in
``generate``.

Greedy equality with ``model.generate`` holds up to floating point: the full model scores several
tokens in one forward, whose sums may round differently from one-token steps; an argmax flips only
where two logits tie to within that rounding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from flexigpt.shared.engine.apply import SOURCE_CLASSES, stack_config
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.parts import skeleton
from flexigpt.shared.engine.plan import Plan
from flexigpt.shared.speculative_batch import accept, check_attention_mask, finish_rows, forward_inputs


# ---------------------------------------------------------------------------------------------
# which slots draft
# ---------------------------------------------------------------------------------------------
def draft_slots(plan: Plan) -> tuple[int, ...]:
    """The slots the draft runs: the plain slots, or the owner slots when that skips nothing.

    Args:
        plan: the slot plan of a shared-block model.

    Returns:
        Slot indices in depth order (a strict, non-empty subset of the slots).

    Raises:
        ValueError: the plan has no slot to skip (no reuse and no slot of its own kind).
    """
    plain = tuple(i for i, s in enumerate(plan.slots) if s.is_plain)
    if 0 < len(plain) < plan.num_slots:
        return plain
    reusing = set(plan.reusing_slots())
    owners = tuple(i for i in range(plan.num_slots) if i not in reusing)
    if len(owners) < plan.num_slots:
        return owners
    raise ValueError(
        f"the plan has no slot to skip: {plan.num_slots} slots, "
        f"{len(plain)} plain, none reusing a block; self-speculative decoding needs a grown or pruned plan"
    )


def skipped_slots(plan: Plan) -> tuple[int, ...]:
    """The slots the draft skips (complement of ``draft_slots``)."""
    keep = set(draft_slots(plan))
    return tuple(i for i in range(plan.num_slots) if i not in keep)


# ---------------------------------------------------------------------------------------------
# the draft: a view of the same modules
# ---------------------------------------------------------------------------------------------
class SlotCache(DynamicCache):
    """A DynamicCache for a view over some slots: attention writes by slot index, masks read by position."""

    def __init__(self, config: PretrainedConfig, slots: tuple[int, ...]) -> None:
        """Build one cache layer per view position, typed (full / sliding) from the view's config."""
        super().__init__(config=config)
        self.position_of = {s: p for p, s in enumerate(slots)}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the states of slot `layer_idx` at its position in the view."""
        return super().update(key_states, value_states, self.position_of[layer_idx], *args, **kwargs)


@dataclass
class Draft:
    """The draft model: a view of a shared model's modules over ``slots`` (no weights copied)."""

    model: PreTrainedModel
    """An instance of the source CausalLM class whose modules are the full model's own."""
    slots: tuple[int, ...]
    """Slots of the full model the draft runs, in depth order."""

    def new_cache(self) -> SlotCache:
        """An empty KV cache for the draft."""
        return SlotCache(self.model.config, self.slots)


def make_draft(
    model: PreTrainedModel, slots: tuple[int, ...] | None = None, plan: Plan | None = None
) -> Draft:
    """Build the draft of `model`: the same embedding, head and decoder layers, minus skipped slots.

    Args:
        model: a shared-block model (``apply_plan`` / ``load_compact``), or any model of a supported
            family with the same slot stack when `plan` is given (e.g. a materialised export).
        slots: slots the draft runs (default ``draft_slots(plan)``).
        plan: the slot plan (default ``model.plan``).

    Returns:
        The draft; its parameters are the full model's own Parameter objects.

    Raises:
        ValueError: no plan, or `slots` is empty, unsorted, out of range or every slot.
    """
    plan = plan if plan is not None else getattr(model, "plan", None)
    if plan is None:
        raise ValueError("make_draft: the model has no .plan; pass plan= (the model's slot plan)")
    layout = get_layout(model.config)
    layers = model.get_submodule(layout.layers_path)
    if len(layers) != plan.num_slots:
        raise ValueError(f"make_draft: the model has {len(layers)} layers, the plan {plan.num_slots} slots")
    slots = tuple(draft_slots(plan) if slots is None else slots)
    if not slots or list(slots) != sorted(set(slots)) or not 0 <= slots[0] <= slots[-1] < plan.num_slots:
        raise ValueError(
            f"slots={list(slots)}: need distinct increasing slot indices in 0..{plan.num_slots - 1}"
        )
    if len(slots) == plan.num_slots:
        raise ValueError("slots: the draft must skip at least one slot (it names every slot)")
    # Layer i of the view is slot slots[i] of the model: the stack config of those layers.
    config = stack_config(model.config, slots, layout)
    # The view must never build a cache of its own: a DynamicCache sized for the view has no entry
    # at the slots' layer_idx. Callers pass ``Draft.new_cache()`` (and use_cache=True) instead.
    config.use_cache = False
    # Built on the meta device (no allocation), then every module is the full model's own.
    view = skeleton(
        SOURCE_CLASSES[layout.model_type], config, top=model, layers=nn.ModuleList([layers[i] for i in slots])
    )
    view.generation_config = copy.deepcopy(model.generation_config)
    view.train(model.training)
    return Draft(view, slots)


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------
@dataclass
class SpeculativeStats:
    """What one speculative generation did."""

    draft_len: int
    """Tokens drafted per round (fewer in the last rounds, when fewer are left to generate)."""
    draft_slots: tuple[int, ...] = ()
    """Slots the draft ran."""
    batch_size: int = 1
    """Rows decoded together."""
    rounds: int = 0
    """Verify calls: forwards of the full model (one for all rows)."""
    draft_calls: int = 0
    """Forwards of the draft (one for all rows)."""
    proposed: int = 0
    """Draft tokens the full model checked, summed over the rows running in each round."""
    accepted: int = 0
    """Draft tokens kept, summed over the rows running in each round (m per row per round)."""
    row_accepted: int = 0
    """Draft tokens each running row would have kept on its own (its accepted prefix before the
    batch's minimum), summed like ``accepted``; equal to it at batch size 1."""
    row_rounds: int = 0
    """(row, round) pairs in which the row was running (``rounds`` at batch size 1)."""
    new_tokens: int = 0
    """Tokens generated per row: columns added to the prompt (after the last row ends, nothing
    more is generated; a row that ended earlier is padded)."""
    accepted_per_round: list[int] = field(default_factory=list)
    """Accepted draft tokens of every round (the minimum over running rows)."""

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed draft tokens, over all rows (NaN when nothing was drafted)."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def row_acceptance_rate(self) -> float:
        """row_accepted / proposed: the acceptance rate had every row kept its own prefix."""
        return self.row_accepted / self.proposed if self.proposed else float("nan")

    @property
    def mean_row_prefix(self) -> float:
        """Mean accepted prefix of a running row in a round, before the batch's minimum."""
        return self.row_accepted / self.row_rounds if self.row_rounds else float("nan")

    @property
    def mean_accepted_prefix(self) -> float:
        """Mean accepted prefix a running row kept in a round (after the minimum)."""
        return self.accepted / self.row_rounds if self.row_rounds else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """New tokens per forward of the full model (1.0 is plain decoding)."""
        return self.new_tokens / self.rounds if self.rounds else float("nan")


@dataclass
class SpeculativeOutput:
    """Tokens and statistics of ``speculative_generate``."""

    sequences: torch.LongTensor
    """Prompt plus generated tokens, shape (b, prompt + new), like ``generate``'s output."""
    stats: SpeculativeStats


def _warpers(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    # transformers' own warpers in generate's order, so the target distribution is exactly the one
    # generate(do_sample=True, temperature=..., top_k=..., top_p=...) samples from.
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k=top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=top_p))
    return procs


def _check_args(
    input_ids: torch.Tensor,
    max_new_tokens: int,
    draft_len: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids: shape {tuple(input_ids.shape)} is not supported; allowed (b>=1, n>=1) "
            "(a batch of prompts, left-padded with an attention_mask where lengths differ)"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    if not isinstance(draft_len, int) or draft_len < 0:
        raise ValueError(f"draft_len={draft_len!r}: must be an integer >= 0 (0 is plain decoding)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: must be > 0 (use do_sample=False for greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r}: must be an integer >= 0 (0 or None: off)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: must be in (0, 1]")


def _eos_ids(model: PreTrainedModel, eos_token_id: int | list[int] | None | str) -> list[int]:
    if eos_token_id == "default":
        eos_token_id = model.generation_config.eos_token_id
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _pad_id(model: PreTrainedModel, pad_token_id: int | None, eos: list[int]) -> int | None:
    """The token rows emit after their end (generate's rule: the pad token, else the first end token)."""
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None and eos:
        pad_token_id = eos[0]
    if pad_token_id is not None and (not isinstance(pad_token_id, int) or pad_token_id < 0):
        raise ValueError(f"pad_token_id={pad_token_id!r}: must be a token id (an integer >= 0)")
    return pad_token_id


@torch.no_grad()
def speculative_generate(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    draft_len: int = 4,
    *,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None | str = "default",
    pad_token_id: int | None = None,
    draft: Draft | None = None,
    progress: bool = False,
) -> SpeculativeOutput:
    """Generate with the model's own draft (skipped reusing slots), verified by the full model.

    Args:
        model: a shared-block model with a ``.plan`` (or pass a prebuilt `draft`).
        input_ids: the prompts, shape (b, n); prompts of different lengths left-padded.
        max_new_tokens: tokens to generate (fewer if every row ends first).
        draft_len: draft tokens per round; 0 runs plain decoding through the same loop.
        attention_mask: (b, n), 0 on left padding and 1 on tokens (as ``generate`` takes it);
            None: no padding. Right padding is refused.
        do_sample: sample (speculative-sampling acceptance rule) instead of greedy decoding.
        temperature: sampling temperature (as ``generate``'s).
        top_k: keep the k most likely tokens (None or 0: off), applied to draft and full model alike.
        top_p: nucleus sampling threshold (None or 1.0: off).
        generator: random generator for sampling (the draft's and the acceptance draws).
        eos_token_id: a row ends after this token (or any of a list); "default" reads
            ``model.generation_config``; None never stops early.
        pad_token_id: what a row emits after its end while others run (default
            ``generation_config.pad_token_id``, else the first end-of-sequence id).
        draft: a draft built by ``make_draft(model)``, to reuse it across calls.
        progress: show a tqdm bar of generated tokens.

    Returns:
        The sequences (prompt + new tokens) and the statistics of the run.

    Raises:
        ValueError: a bad argument (the message names it and what is allowed), or a `draft`
            built for another model.
    """
    _check_args(input_ids, max_new_tokens, draft_len, temperature, top_k, top_p)
    mask = check_attention_mask(input_ids, attention_mask)
    draft = draft if draft is not None else make_draft(model)
    head = get_layout(model.config).top_modules[0]
    if draft.model.get_submodule(head) is not model.get_submodule(head):
        raise ValueError("draft: it was built for another model; pass make_draft(model) of this model")
    warp = _warpers(temperature, top_k, top_p) if do_sample else None
    eos_list = _eos_ids(model, eos_token_id)
    pad = _pad_id(model, pad_token_id, eos_list)
    eos = torch.tensor(eos_list, device=input_ids.device) if eos_list else None
    stats = SpeculativeStats(draft_len=draft_len, draft_slots=draft.slots, batch_size=input_ids.shape[0])
    full_cache, draft_cache = DynamicCache(config=model.config), draft.new_cache()
    # Sliding-window layers forget tokens beyond the window; recording lets crop() roll them back.
    full_cache.activate_past_recording()
    draft_cache.activate_past_recording()
    seq = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    bar = tqdm(total=max_new_tokens, desc="speculative decoding", unit="tok", disable=not progress)
    while stats.new_tokens < max_new_tokens:
        # k drafted tokens can yield k + 1 new ones: never draft more than is left to generate.
        k = min(draft_len, max_new_tokens - stats.new_tokens - 1)
        drafted, q_probs = _draft_tokens(draft, draft_cache, seq, mask, k, warp, generator, stats)
        cand = torch.cat([seq, drafted], dim=1)
        logits = model(
            **forward_inputs(cand, mask, full_cache.get_seq_length()),
            past_key_values=full_cache,
            use_cache=True,
            logits_to_keep=k + 1,
        ).logits
        stats.rounds += 1
        new, prefix, m = accept(logits, drafted, q_probs, warp, generator, ~done)
        running = int((~done).sum())
        stats.proposed += k * running
        stats.accepted += m * running
        stats.row_accepted += int(prefix.sum())
        stats.row_rounds += running
        stats.accepted_per_round.append(m)
        # Both caches keep exactly the accepted tokens; the last new token is fed next round.
        _crop(full_cache, k - m)
        _crop(draft_cache, max(0, k - 1 - m))
        new, done = finish_rows(new[:, : max_new_tokens - stats.new_tokens], done, eos, pad)
        seq = torch.cat([seq, new], dim=1)
        stats.new_tokens += new.shape[1]
        bar.update(new.shape[1])
        if bool(done.all()):
            break
    bar.close()
    return SpeculativeOutput(seq, stats)


def _crop(cache: DynamicCache, n: int) -> None:
    """Drop the last `n` tokens of every layer (and trim sliding layers back to their window)."""
    # Cache.crop would also visit layers that were never written (a draft cache before its first
    # forward), and transformers 5.23's sliding layer fails on those.
    for layer in cache.layers:
        if layer.is_initialized:
            layer.crop(-n)


def _draft_tokens(
    draft: Draft,
    cache: SlotCache,
    seq: torch.Tensor,
    mask: torch.Tensor | None,
    k: int,
    warp: LogitsProcessorList | None,
    generator: torch.Generator | None,
    stats: SpeculativeStats,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """k draft tokens (b, k) and, when sampling, their draft distributions (b, k, vocab)."""
    tokens, probs = [], []
    ids = seq
    for _ in range(k):
        # the tokens the draft has not seen (>= 1), with the mask and positions over all of them
        inputs = forward_inputs(ids, mask, cache.get_seq_length())
        logits = draft.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        stats.draft_calls += 1
        if warp is None:
            tok = logits.argmax(dim=-1)
        else:
            p = torch.softmax(warp(seq, logits.float()), dim=-1)
            tok = torch.multinomial(p, 1, generator=generator)[:, 0]
            probs.append(p)
        tokens.append(tok)
        ids = torch.cat([ids, tok[:, None]], dim=1)
    drafted = torch.stack(tokens, dim=1) if tokens else seq.new_empty((seq.shape[0], 0))
    return drafted, (torch.stack(probs, dim=1) if probs else None)
