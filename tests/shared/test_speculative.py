"""Self-speculative decoding: the draft is the model minus its reusing slots, the output is the full model's.

Greedy: identical tokens to ``model.generate(do_sample=False)`` for grown and pruned plans on every
architecture (sliding windows crossed). Sampling: on an 8-token vocabulary the joint distribution
of two generated tokens is estimated from many samples and compared with the full model's exact
distribution (enumerated), by a chi-square test whose power is shown on the same samples: they
must reject the draft's exact distribution and the one a wrong rejection rule would give.
"""

from __future__ import annotations

import pytest
import torch

from flexigpt.shared.engine.apply import apply_plan, materialize, stored_param_count
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model
from flexigpt.shared.speculative import (
    SlotCache,
    draft_slots,
    make_draft,
    skipped_slots,
    speculative_generate,
)

from ..conftest import ARCHS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: a second thread only adds synchronisation (and contention with parallel runs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ALL_ARCHS = [*ARCHS, "opt"]
PROMPT = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))
NEW = 24  # prompt 10 + 24 new tokens crosses the tiny mistral / qwen2 sliding window (16)


def _peaked(model: torch.nn.Module) -> torch.nn.Module:
    # A freshly initialised model has a tiny residual stream (embeddings of std 0.02) and near-uniform
    # logits: a small-gamma output norm would then dominate every hidden state, and argmax near-ties
    # would make "identical tokens" a test of rounding. Embeddings of unit scale and a larger head
    # give the proportions of a trained model: copies perturb, margins are far above rounding.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(50.0)
        if not model.config.tie_word_embeddings:
            model.get_output_embeddings().weight.mul_(20.0)
    return model


def grown_plan(model_type: str, gamma: float = 0.2) -> Plan:
    """6 slots over 4 blocks (FlexiGPT Block pattern on blocks 1 and 3): copies carry LoRA + output norm."""
    ad = AdapterSpec(4, get_layout(model_type).targets, init="lora")
    on = OutNormSpec(gamma)
    return Plan(
        model_type,
        4,
        (
            SlotSpec(0),
            SlotSpec(1),
            SlotSpec(1, adapter=ad, out_norm=on),
            SlotSpec(2),
            SlotSpec(3),
            SlotSpec(3, adapter=ad, out_norm=on, own_norms=True),
        ),
    )


def pruned_plan(model_type: str, gamma: float = 0.2) -> Plan:
    """Block 1 removed and replaced, at its position, by a slot running block 2 (its base): the
    replacement comes *before* the owner slot of block 2, so it is not a "later occurrence"."""
    ad = AdapterSpec(4, get_layout(model_type).targets, init="svd", svd_from=1)
    rep = SlotSpec(2, adapter=ad, out_norm=OutNormSpec(gamma))
    return Plan(model_type, 4, (SlotSpec(0), rep, SlotSpec(2), SlotSpec(3)))


# ------------------------------------------------------------------------------------ the draft
def test_draft_slots_cover_grown_pruned_and_plain_stacking():
    assert draft_slots(grown_plan("llama")) == (0, 1, 3, 4)
    assert skipped_slots(grown_plan("llama")) == (2, 5)
    pruned = pruned_plan("llama")
    assert draft_slots(pruned) == (0, 2, 3)
    assert pruned.reusing_slots() == (2,)  # the "later occurrence" rule would skip the kept block
    stacked = Plan("llama", 2, (SlotSpec(0), SlotSpec(1), SlotSpec(0), SlotSpec(1)))
    assert draft_slots(stacked) == (0, 1)  # every slot plain: fall back to the owner slots
    with pytest.raises(ValueError, match="no slot to skip"):
        draft_slots(Plan.identity("llama", 4))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_draft_shares_every_parameter_and_equals_the_shortgpt_model(arch):
    model = apply_plan(tiny_model(arch), pruned_plan(tiny_model(arch).config.model_type))
    before = stored_param_count(model)
    draft = make_draft(model)
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in draft.model.parameters())
    assert stored_param_count(model) == before
    # the draft is the model with slot 1 deleted: same numbers as a plan that never had it
    mt = model.config.model_type
    shortgpt = apply_plan(tiny_model(arch), Plan(mt, 4, (SlotSpec(0), SlotSpec(2), SlotSpec(3))))
    with torch.no_grad():
        assert torch.equal(draft.model(PROMPT).logits, shortgpt(PROMPT).logits)
        # and its own cache (slot index -> view position) gives the same logits incrementally
        cache = draft.new_cache()
        assert isinstance(cache, SlotCache)
        head = draft.model(PROMPT[:, :6], past_key_values=cache, use_cache=True).logits
        tail = draft.model(PROMPT[:, 6:], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(torch.cat([head, tail], 1), shortgpt(PROMPT).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("kind", ["grown", "pruned"])
def test_greedy_gives_the_tokens_of_plain_decoding(arch, kind):
    source = _peaked(tiny_model(arch))
    mt = source.config.model_type
    model = apply_plan(source, grown_plan(mt) if kind == "grown" else pruned_plan(mt))
    ref = model.generate(PROMPT, do_sample=False, max_new_tokens=NEW, eos_token_id=None)
    draft = make_draft(model)
    accepted = proposed = 0
    for k in (1, 3, 8):
        out = speculative_generate(model, PROMPT, NEW, k, eos_token_id=None, draft=draft)
        assert torch.equal(out.sequences, ref), f"draft_len={k}"
        s = out.stats
        assert s.new_tokens == NEW and s.rounds == len(s.accepted_per_round)
        assert s.proposed >= s.accepted == sum(s.accepted_per_round)
        assert s.new_tokens == s.accepted + s.rounds  # each round: accepted drafts + one token
        accepted += s.accepted
        proposed += s.proposed
    assert accepted > 0, "the draft never agreed: the test would not exercise acceptance"
    # the tied-embedding variants (llama3, opt) agree everywhere; on the others rejections must happen too
    assert accepted < proposed or arch in ("llama3", "opt"), "the draft never disagreed: no rollback tested"
    plain = speculative_generate(model, PROMPT, NEW, 0, eos_token_id=None, draft=draft)
    assert torch.equal(plain.sequences, ref) and plain.stats.rounds == NEW


def test_greedy_stops_at_eos_like_generate():
    model = apply_plan(_peaked(tiny_model("llama3")), grown_plan("llama"))
    free = model.generate(PROMPT, do_sample=False, max_new_tokens=NEW, eos_token_id=None)
    eos = int(free[0, PROMPT.shape[1] + 6])  # a token the model emits mid-way
    ref = model.generate(PROMPT, do_sample=False, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    out = speculative_generate(model, PROMPT, NEW, 4, eos_token_id=eos)
    assert torch.equal(out.sequences, ref)
    assert out.sequences[0, -1] == eos and out.stats.new_tokens < NEW


def test_silent_copies_are_always_accepted():
    # gamma 0 and zero adapters: the copies add exactly nothing, the draft *is* the full model
    ad = AdapterSpec(4, init="zero")
    silent = SlotSpec(1, adapter=ad, out_norm=OutNormSpec(0.0))
    plan = Plan("llama", 4, (SlotSpec(0), SlotSpec(1), silent, silent, SlotSpec(2), SlotSpec(3)))
    model = apply_plan(_peaked(tiny_model("llama2")), plan)
    out = speculative_generate(model, PROMPT, 20, 4, eos_token_id=None)
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.rounds == 4  # 5 tokens per round: 4 drafted + 1 from the full model
    assert out.stats.draft_calls == 16


def test_materialised_model_with_its_plan():
    model = apply_plan(_peaked(tiny_model("qwen2")), grown_plan("qwen2"))
    plain = materialize(model, keep_output_norm=True)
    ref = plain.generate(PROMPT, do_sample=False, max_new_tokens=NEW, eos_token_id=None)
    out = speculative_generate(
        plain, PROMPT, NEW, 3, eos_token_id=None, draft=make_draft(plain, plan=model.plan)
    )
    assert torch.equal(out.sequences, ref)


def test_bad_arguments_name_what_is_allowed():
    model = apply_plan(tiny_model("llama2"), grown_plan("llama"))
    with pytest.raises(ValueError, match="input_ids"):
        speculative_generate(model, PROMPT[0], 4)
    with pytest.raises(ValueError, match="draft_len"):
        speculative_generate(model, PROMPT, 4, -1)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(model, PROMPT, 4, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        speculative_generate(model, PROMPT, 4, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="slots"):
        make_draft(model, slots=(0, 1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="no .plan"):
        make_draft(tiny_model("llama2"))
    other = make_draft(apply_plan(tiny_model("llama2"), grown_plan("llama")))
    with pytest.raises(ValueError, match="another model"):
        speculative_generate(model, PROMPT, 4, draft=other)


# ------------------------------------------------------------------------------------ sampling
VOCAB = 8
SAMPLES = 1000


def _sampling_model():
    """Vocabulary 8; embeddings and head scaled so the distributions are spread but distinct, and the
    reusing slot (gamma 1) moves them: the draft's joint distribution is far from the full model's."""
    source = tiny_model("llama2", vocab=VOCAB, hidden=32, heads=2, num_layers=2, seed=0)
    with torch.no_grad():
        source.model.embed_tokens.weight.mul_(10.0)
        source.lm_head.weight.mul_(5.0)
    plan = Plan(
        "llama",
        2,
        (
            SlotSpec(0),
            SlotSpec(1),
            SlotSpec(1, adapter=AdapterSpec(2, init="lora"), out_norm=OutNormSpec(1.0)),
        ),
    )
    return apply_plan(source, plan)


def _warp(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    # written out here (not transformers' warpers) so the expected distribution is independent
    logits = logits.double() / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _exact_joint(model, prompt, temperature, top_k) -> torch.Tensor:
    """P(x1, x2 | prompt) by enumerating x1: (VOCAB, VOCAB)."""
    with torch.no_grad():
        p1 = _warp(model(prompt).logits[0, -1], temperature, top_k)
        ext = torch.cat([prompt.repeat(VOCAB, 1), torch.arange(VOCAB).view(VOCAB, 1)], dim=1)
        p2 = _warp(model(ext).logits[:, -1], temperature, top_k)
    return p1[:, None] * p2


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of `counts` under `probs`; 0 if a count lands on a zero-probability cell."""
    n = counts.sum()
    if (counts[probs == 0] > 0).any():
        return 0.0
    keep = probs > 0
    expected = n * probs[keep]
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (0.7, 5)])
def test_sampling_matches_the_full_models_exact_distribution(temperature, top_k):
    model = _sampling_model()
    draft = make_draft(model)
    prompt = torch.tensor([[1, 5, 3, 6]])
    target = _exact_joint(model, prompt, temperature, top_k)
    drafts = _exact_joint(draft.model, prompt, temperature, top_k)
    # The distribution a common bug gives: on rejection, resample from p instead of max(0, p - q).
    # (2 new tokens, 1 drafted: only the first token goes through the rule; the second is drawn
    # from the full model given the first.)
    p1, q1 = target.sum(1), drafts.sum(1)
    overlap = torch.minimum(p1, q1)
    wrong1 = overlap + (1 - overlap.sum()) * p1
    assert 0.5 * (target - drafts).abs().sum() > 0.3, "draft too close to the full model: no power"
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    accepted = proposed = 0
    for _ in range(SAMPLES):
        out = speculative_generate(
            model, prompt, 2, 1, do_sample=True, temperature=temperature, top_k=top_k,
            generator=gen, eos_token_id=None, draft=draft,
        )  # fmt: skip
        x1, x2 = out.sequences[0, -2:].tolist()
        counts[x1, x2] += 1
        accepted += out.stats.accepted
        proposed += out.stats.proposed
    # both branches of the acceptance rule ran many times
    assert 0.2 * proposed < accepted < 0.9 * proposed
    p_full, p_first = _chi2_pvalue(counts, target), _chi2_pvalue(counts.sum(1), p1)
    assert p_full > 1e-3, f"samples do not follow the full model (chi-square p={p_full:.2e})"
    assert p_first > 1e-3, f"first tokens do not follow the full model (chi-square p={p_first:.2e})"
    # the same samples, the same test, must reject what a wrong rule would give: the test has power
    p_draft, p_wrong = _chi2_pvalue(counts, drafts), _chi2_pvalue(counts.sum(1), wrong1)
    assert p_draft < 1e-12, f"the test cannot tell the draft from the full model (p={p_draft:.2e})"
    assert p_wrong < 1e-5, f"the test cannot tell a wrong residual from the right one (p={p_wrong:.2e})"
