"""One text rule: calibration windows, the evaluation stream and the perplexity stream make the same
tokens of the same documents, so Block Influence does not depend on which of them fed it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexigpt.prune.depth.importance import compute_importance
from flexigpt.prune.depth.recipe import PruneRecipe
from flexigpt.prune.depth.steps import calibration_tensors
from flexigpt.shared.evaluate.perplexity import encode_documents, stream_documents
from flexigpt.shared.recipe import RecipeError, TextSection, load_recipe
from flexigpt.shared.text import resolve_text_rule
from flexigpt.shared.train.data import eval_batches

from ..conftest import prune_overrides

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPE = REPO_ROOT / "recipes" / "prune" / "local-tiny.yaml"


def _recipe(ws: dict[str, Path], out: Path, *extra: str) -> PruneRecipe:
    recipe = load_recipe(RECIPE, prune_overrides(ws, out, *extra))
    assert isinstance(recipe, PruneRecipe)
    return recipe


@pytest.mark.parametrize("bos", [None, True])
def test_block_influence_of_calibration_windows_equals_hooks_over_the_evaluation_stream(
    prune_workspace, tmp_path, bos
):
    ws = prune_workspace
    n, seq = 8, 32
    recipe = _recipe(
        ws,
        tmp_path / "r",
        f"text.bos={'null' if bos is None else 'true'}",
        "prune.calibration.pack=true",
        f"prune.calibration.num_samples={n}",
        f"prune.calibration.seq_len={seq}",
        f"data.eval.batches={n}",
    )
    tok = AutoTokenizer.from_pretrained(ws["tok"])
    rule = resolve_text_rule(recipe.text, tok)
    # the workspace tokenizer adds no BOS of its own, so null follows it; true puts BOS first
    assert rule.bos is bool(bos) and rule.eos_between_docs
    calibration = list(calibration_tensors(recipe, tok, None))
    assert recipe.data.eval is not None
    evaluation = eval_batches(
        recipe.data.eval, tok, seq_len=seq, rank=0, world_size=1, micro_batch=1, text=rule
    )
    assert len(calibration) == len(evaluation) == n
    for c, e in zip(calibration, evaluation, strict=True):
        assert torch.equal(c, e)
    stream = torch.cat(calibration, dim=1)[0].tolist()
    assert stream.count(tok.eos_token_id) >= 2  # several documents, each followed by EOS
    assert (stream.count(tok.bos_token_id) >= 2) is bool(bos)
    # the perplexity stream of the same documents is the same token sequence
    ppl_stream = encode_documents(
        stream_documents(recipe.data.eval),
        tok,
        max_tokens=n * seq,
        add_bos=rule.bos,
        eos_between_docs=rule.eos_between_docs,
    )
    assert ppl_stream.tolist() == stream
    model = AutoModelForCausalLM.from_pretrained(ws["model"]).eval()
    a = compute_importance(model, calibration, progress=False)
    b = compute_importance(model, evaluation, progress=False)
    assert a.num_tokens == b.num_tokens == n * seq
    assert a.scores == b.scores
    assert a.least_important(2) == b.least_important(2)


def test_rule_follows_the_tokenizer_unless_the_recipe_says(prune_workspace):
    tok = AutoTokenizer.from_pretrained(prune_workspace["tok"])
    assert resolve_text_rule(None, tok).to_dict() == {
        "bos": False,
        "eos_between_docs": True,
        "bos_id": 1,
        "eos_id": 2,
        "decided_by": "tokenizer",
    }
    rule = resolve_text_rule(TextSection(bos=True, eos_between_docs=False), tok)
    assert (rule.bos, rule.eos_between_docs, rule.decided_by) == (True, False, "text:")
    assert rule.document([7, 8]) == [1, 7, 8] and rule.summary() == "BOS + doc"
    # a tokenizer that puts BOS in front of what it encodes gets BOS per document by default
    tok.add_bos_token = True
    tok.update_post_processor()
    if tok("a")["input_ids"][:1] == [1]:
        assert resolve_text_rule(None, tok).bos
    tok.bos_token = None
    with pytest.raises(RecipeError, match=r"text.bos=true but the tokenizer has no BOS token"):
        resolve_text_rule(TextSection(bos=True), tok)


def test_packed_calibration_windows_without_a_rule_keep_their_own_bos():
    from flexigpt.prune.depth.importance import calibration_samples
    from flexigpt.shared.text import TextRule

    rule = TextRule(bos=True, eos_between_docs=True, bos_id=1, eos_id=2)
    encode = lambda t: [ord(c) - 90 for c in t]  # noqa: E731
    windows = list(calibration_samples(["abc", "de"], encode, num_samples=2, seq_len=4, text=rule))
    assert [w.tolist() for w in windows] == [[[1, *encode("abc")]], [[2, 1, *encode("de")]]]
    with pytest.raises(ValueError, match="bos_id"):
        list(calibration_samples(["abc"], encode, num_samples=1, seq_len=4, text=rule, bos_id=1))


def _ngrams(ids: list[int], n: int, eos: int) -> set[tuple[int, ...]]:
    """Every n tokens in a row that stay inside one document (no EOS among them)."""
    return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1) if eos not in ids[i : i + n]}


def test_gamma_text_is_disjoint_from_the_start_perplexity_text(prune_workspace, tmp_path):
    from flexigpt.prune.depth.build import PruneError
    from flexigpt.prune.depth.steps import StartPerplexity, gamma_tensors

    ws = prune_workspace
    # calibration, gamma and perplexity all read the same corpus: only skipping keeps them apart
    recipe = _recipe(ws, tmp_path / "r", "prune.replace.gamma=calibrate", "prune.calibration.gamma_samples=6")
    tok = AutoTokenizer.from_pretrained(ws["tok"])
    ppl = StartPerplexity(recipe, tok)
    eval_ids = ppl.tokens().tolist()
    assert len(ppl.documents) >= 3
    samples, info = gamma_tensors(recipe, tok, None, ppl.documents)
    assert len(samples) == info["samples"] == 6 and info["documents_skipped"] == len(ppl.documents)
    assert "without the" in info["described"]
    eval_grams = _ngrams(eval_ids, 12, tok.eos_token_id)
    for s in samples:
        assert not _ngrams(s[0].tolist(), 12, tok.eos_token_id) & eval_grams
    # the check can fail: the importance windows, read from the start of the same stream, overlap it
    overlap = [
        _ngrams(s[0].tolist(), 12, tok.eos_token_id) & eval_grams
        for s in calibration_tensors(recipe, tok, None)
    ]
    assert any(overlap)
    # a gamma text with nothing outside the perplexity text is refused, naming the key to set
    greedy = _recipe(ws, tmp_path / "g", "prune.replace.gamma=calibrate", "data.eval.batches=400")
    ppl = StartPerplexity(greedy, tok)
    ppl.tokens()
    with pytest.raises(PruneError, match=r"gamma_stream to another split"):
        gamma_tensors(greedy, tok, None, ppl.documents)
