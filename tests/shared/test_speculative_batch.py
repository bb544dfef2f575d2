"""Batched self-speculative decoding: b rows, left-padded prompts, one verify forward for all rows.

Greedy: every row equals ``model.generate(input_ids, attention_mask=..., do_sample=False)``'s for
grown and pruned plans on every architecture (sliding windows crossed), with equal and with
left-padded prompts, and rows that end early are padded while the others continue. Sampling: a
batch of rows with the same left-padded prompt gives, on an 8-token vocabulary, the full
model's exact joint distribution of two tokens, although most rows are cut at a draft they
accepted (the batch keeps the smallest accepted prefix).
"""

from __future__ import annotations

import pytest
import torch

from flexigpt.shared.engine.apply import apply_plan
from flexigpt.shared.engine.tiny import tiny_model
from flexigpt.shared.speculative import make_draft, speculative_generate
from flexigpt.shared.speculative_batch import check_attention_mask, forward_inputs

from .test_speculative import (
    ALL_ARCHS,
    NEW,
    VOCAB,
    _chi2_pvalue,
    _exact_joint,
    _one_thread,  # noqa: F401  (an autouse fixture)
    _peaked,
    _sampling_model,
    grown_plan,
    pruned_plan,
)


def _prompts(pads: tuple[int, ...], n: int = 10, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of n positions, row i left-padded with pads[i] zeros (pad id 0), and their mask."""
    ids = torch.randint(3, 128, (len(pads), n), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _model(arch: str, kind: str) -> torch.nn.Module:
    source = _peaked(tiny_model(arch))
    mt = source.config.model_type
    return apply_plan(source, grown_plan(mt) if kind == "grown" else pruned_plan(mt))


# ------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("kind", ["grown", "pruned"])
def test_batched_greedy_gives_generates_tokens_row_by_row(arch, kind):
    model = _model(arch, kind)
    draft = make_draft(model)
    row_accepted = accepted = 0
    for pads in ((0, 0, 0), (0, 4, 7)):
        ids, mask = _prompts(pads)
        ref = model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0
        )
        for k in (0, 3):
            out = speculative_generate(
                model, ids, NEW, k, attention_mask=mask, eos_token_id=None, draft=draft
            )
            for r in range(len(pads)):
                assert torch.equal(out.sequences[r], ref[r]), f"pads={pads} draft_len={k} row {r}"
            s = out.stats
            assert s.batch_size == 3 and s.new_tokens == NEW and s.rounds == len(s.accepted_per_round)
            assert s.row_rounds == 3 * s.rounds and s.accepted == 3 * sum(s.accepted_per_round)
            assert s.proposed >= s.row_accepted >= s.accepted
            assert s.new_tokens == sum(s.accepted_per_round) + s.rounds
            row_accepted += s.row_accepted
            accepted += s.accepted
    assert accepted > 0, "the batch never kept a draft: acceptance is not exercised"
    if arch not in ("llama3", "opt"):  # the tied-embedding variants agree everywhere
        assert row_accepted > accepted, "every row always agreed: the minimum rule is not exercised"


@pytest.mark.parametrize("arch", ["llama2", "opt"])  # rotary and learned absolute positions
def test_a_left_padded_row_gets_the_logits_of_its_unpadded_prompt(arch):
    model = _model(arch, "grown")
    ids, mask = _prompts((0, 3))
    inputs = forward_inputs(ids, check_attention_mask(ids, mask), 0)
    assert inputs["position_ids"][1].tolist() == [1, 1, 1, *range(7)]  # generate's rule
    with torch.no_grad():
        padded = model(**inputs).logits[1, 3:]
        alone = model(ids[1:, 3:]).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)
    # the positions matter where they are absolute: counted from the padding, OPT's logits differ
    if arch == "opt":
        with torch.no_grad():
            shifted = model(ids[1:], attention_mask=mask[1:], position_ids=torch.arange(10)[None]).logits[
                0, 3:
            ]
        assert not torch.allclose(shifted, alone, atol=1e-2)


def test_batch_of_one_keeps_its_statistics_and_a_full_mask_changes_nothing():
    model = _model("mistral", "grown")
    ids, mask = _prompts((0,), n=10)
    plain = speculative_generate(model, ids, NEW, 4, eos_token_id=None)
    masked = speculative_generate(model, ids, NEW, 4, attention_mask=mask, eos_token_id=None)
    assert torch.equal(plain.sequences, masked.sequences)
    s = plain.stats
    assert s.batch_size == 1 and s.row_accepted == s.accepted and s.row_rounds == s.rounds
    assert s.mean_row_prefix == s.mean_accepted_prefix == s.accepted / s.rounds
    assert s.row_acceptance_rate == s.acceptance_rate


def test_a_row_that_ends_is_padded_while_the_others_continue():
    model = _model("llama2", "grown")
    ids, mask = _prompts((0, 3, 0))
    n = ids.shape[1]
    free = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, eos_token_id=None)
    new = free[:, n:].tolist()
    # a token row 0 first emits mid-way and rows 1 and 2 never emit: row 0 ends, the others run on
    eos = next(t for j, t in enumerate(new[0]) if j >= 4 and t not in new[0][:j] + new[1] + new[2])
    ref = model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0
    )
    out = speculative_generate(model, ids, NEW, 4, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    end = n + new[0].index(eos)
    assert out.sequences.shape[1] == n + NEW
    assert (out.sequences[0, end + 1 :] == 0).all() and (out.sequences[1:, end + 1 :] != 0).any()
    # without pad_token_id: generation_config's pad token (0 here), else the end-of-sequence id
    default = speculative_generate(model, ids, NEW, 4, attention_mask=mask, eos_token_id=eos)
    assert model.generation_config.pad_token_id == 0 and torch.equal(default.sequences, ref)
    model.generation_config.pad_token_id = None
    default = speculative_generate(model, ids, NEW, 4, attention_mask=mask, eos_token_id=eos)
    assert (default.sequences[0, end:] == eos).all() and torch.equal(default.sequences[1:], ref[1:])
    # every row ends: the output stops where the last row ended, as generate's does
    last = next(t for j, t in enumerate(new[1]) if j >= 2 and t not in new[1][:j])
    both = [eos, last]
    ref = model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, eos_token_id=both, pad_token_id=0
    )
    out = speculative_generate(model, ids, NEW, 4, attention_mask=mask, eos_token_id=both, pad_token_id=0)
    assert torch.equal(out.sequences, ref)


def test_bad_attention_mask_and_pad_token_are_refused_by_name():
    model = _model("llama2", "grown")
    ids, mask = _prompts((0, 3))
    right = mask.flip(1)
    for bad in (
        right,
        mask[:, 1:],
        mask * 2,
        torch.zeros_like(mask),
        mask.index_fill(1, torch.tensor([5]), 0),
    ):
        with pytest.raises(ValueError, match="attention_mask"):
            speculative_generate(model, ids, 4, attention_mask=bad)
    with pytest.raises(ValueError, match="right padding"):
        speculative_generate(model, ids, 4, attention_mask=right)
    with pytest.raises(ValueError, match="input_ids"):
        speculative_generate(model, ids[0], 4)
    with pytest.raises(ValueError, match="pad_token_id"):
        speculative_generate(model, ids, 4, attention_mask=mask, eos_token_id=5, pad_token_id=-1)


# ------------------------------------------------------------------------------------ sampling
def test_batched_sampling_is_reproducible_and_in_vocabulary():
    model = _model("qwen2", "pruned")
    ids, mask = _prompts((0, 4, 7))
    draft = make_draft(model)

    def run(seed: int) -> torch.Tensor:
        return speculative_generate(
            model, ids, NEW, 3, attention_mask=mask, do_sample=True, temperature=0.8, top_k=20,
            generator=torch.Generator().manual_seed(seed), eos_token_id=None, draft=draft,
        ).sequences  # fmt: skip

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, ids.shape[1] + NEW) and torch.equal(a[:, : ids.shape[1]], ids)
    assert ((a >= 0) & (a < model.config.vocab_size)).all()
    # with end tokens: a row is padded after its first one, and the output stops once all have ended
    ends, padded = list(range(5, 128, 9)), 0
    for seed in range(4):
        out = speculative_generate(
            model, ids, NEW, 3, attention_mask=mask, do_sample=True, temperature=1.5,
            generator=torch.Generator().manual_seed(seed), eos_token_id=ends, pad_token_id=0, draft=draft,
        ).sequences[:, ids.shape[1] :].tolist()  # fmt: skip
        first = [next((j for j, t in enumerate(row) if t in ends), None) for row in out]
        for row, j in zip(out, first, strict=True):
            assert j is None or all(t == 0 for t in row[j + 1 :])
            padded += j is not None and j + 1 < len(row)
        assert len(out[0]) == NEW or (None not in first and len(out[0]) == max(first) + 1)
    assert padded > 0, "no row ended before the others: the end-of-sequence path is not exercised"


ROWS, CALLS = 50, 40


def test_batched_sampling_matches_the_full_models_exact_distribution():
    # Two new tokens, one drafted: a round keeps one token per row as soon as any row rejects its
    # draft, so most rows that accepted are cut at that draft (the case the truncation must get right).
    model = _sampling_model()
    draft = make_draft(model)
    prompt = torch.tensor([[1, 5, 3, 6]])
    # every row: the prompt left-padded by two positions (the exact distribution is the unpadded
    # prompt's); the padding holds a token of the vocabulary, so attending to it would show
    ids = torch.cat([torch.full((ROWS, 2), 2), prompt.repeat(ROWS, 1)], dim=1)
    mask = torch.ones_like(ids).index_fill_(1, torch.tensor([0, 1]), 0)
    target = _exact_joint(model, prompt, 1.0, None)
    drafts = _exact_joint(draft.model, prompt, 1.0, None)
    p1, q1 = target.sum(1), drafts.sum(1)
    overlap = torch.minimum(p1, q1)
    wrong1 = overlap + (1 - overlap.sum()) * p1
    gen = torch.Generator().manual_seed(4321)
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    cut = 0
    for _ in range(CALLS):
        out = speculative_generate(
            model,
            ids,
            2,
            1,
            attention_mask=mask,
            do_sample=True,
            generator=gen,
            eos_token_id=None,
            draft=draft,
        )
        for x1, x2 in out.sequences[:, -2:].tolist():
            counts[x1, x2] += 1
        cut += out.stats.row_accepted - out.stats.accepted
    assert cut > ROWS * CALLS // 4, f"only {cut} accepted drafts were cut: the truncation is not exercised"
    p_full, p_first = _chi2_pvalue(counts, target), _chi2_pvalue(counts.sum(1), p1)
    assert p_full > 1e-3, f"samples do not follow the full model (chi-square p={p_full:.2e})"
    assert p_first > 1e-3, f"first tokens do not follow the full model (chi-square p={p_first:.2e})"
    p_draft, p_wrong = _chi2_pvalue(counts, drafts), _chi2_pvalue(counts.sum(1), wrong1)
    assert p_draft < 1e-12, f"the test cannot tell the draft from the full model (p={p_draft:.2e})"
    assert p_wrong < 1e-5, f"the test cannot tell a wrong residual from the right one (p={p_wrong:.2e})"
