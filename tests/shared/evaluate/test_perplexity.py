"""Sliding-window perplexity: window arithmetic, agreement with direct loops and with transformers'
own loss, invariance under batching, shared vs materialised vs exported models, token sources."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexigpt.shared.engine.apply import materialize
from flexigpt.shared.engine.checkpoint import export_materialized, load_compact, save_compact
from flexigpt.shared.engine.tiny import tiny_model
from flexigpt.shared.evaluate.perplexity import (
    encode_documents,
    file_documents,
    load_tokenizer,
    perplexity,
    sample_perplexity,
    sliding_windows,
)

from .evalkit import char_tokenizer, pruned_plan, random_tokens, shared_model


@pytest.mark.parametrize(
    ("n", "ctx", "stride"),
    [(100, 16, 16), (100, 16, 4), (101, 16, 5), (17, 16, 16), (10, 16, 8), (2, 16, 1), (64, 16, 15)],
)
def test_windows_score_each_token_once_with_the_promised_context(n: int, ctx: int, stride: int) -> None:
    windows = sliding_windows(n, ctx, stride)
    scored: list[int] = []
    for k, w in enumerate(windows):
        assert 1 <= w.length <= ctx and w.end <= n
        positions = list(range(w.end - w.targets, w.end))
        assert positions[0] > w.begin, "a scored token needs context inside its window"
        if k > 0:  # past the first window every scored token sees >= ctx - stride tokens
            assert positions[0] - w.begin >= ctx - stride
        scored += positions
    assert len(scored) == len(set(scored)), "a token was scored twice"
    if stride < ctx:
        assert sorted(scored) == list(range(1, n))
    else:  # disjoint windows: every token except each window's first
        assert sorted(scored) == [t for t in range(n) if t % ctx != 0]


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(ValueError, match="stride=0"):
        sliding_windows(10, 8, 0)
    with pytest.raises(ValueError, match=r"stride=9: allowed 1..context_len \(8\)"):
        sliding_windows(10, 8, 9)
    with pytest.raises(ValueError, match="context_len=1"):
        sliding_windows(10, 1, 1)
    model = tiny_model("llama2", num_layers=2, max_positions=64)
    with pytest.raises(
        ValueError, match=r"context_len=65 exceeds the model's max_position_embeddings \(64\)"
    ):
        perplexity(model, random_tokens(100), context_len=65, stride=8, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, [5], context_len=8, stride=8, progress=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        perplexity(model, random_tokens(20), context_len=8, batch_size=0, progress=False)


@torch.no_grad()
def test_disjoint_windows_equal_a_direct_loop() -> None:
    model = tiny_model("llama2", num_layers=2)
    ids = random_tokens(300)
    ctx = 64
    total, count = 0.0, 0
    for start in range(0, len(ids), ctx):
        chunk = ids[start : start + ctx][None]
        if chunk.shape[1] < 2:
            continue
        logits = model(chunk).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    res = perplexity(model, ids, context_len=ctx, stride=ctx, batch_size=1, progress=False)
    assert res.tokens == count == 300 - 5  # 5 windows (64, 64, 64, 64, 44), each loses its first token
    assert (res.context_len, res.stride, res.windows, res.stream_tokens) == (64, 64, 5, 300)
    assert math.isfinite(res.ppl)
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-6)
    assert res.nll == pytest.approx(total / count, rel=1e-6)
    batched = perplexity(model, ids, context_len=ctx, stride=ctx, batch_size=3, progress=False)
    assert batched.ppl == pytest.approx(res.ppl, rel=1e-6) and batched.tokens == res.tokens


@torch.no_grad()
def test_samples_are_the_disjoint_window_recipe_and_the_batch_next_token_loss() -> None:
    """Calibration samples (importance, gamma calibration) go through the same scoring loop."""
    model = tiny_model("mistral", num_layers=2)
    g = torch.Generator().manual_seed(4)
    samples = [torch.randint(3, 128, (2, 24), generator=g), torch.randint(3, 128, (24,), generator=g)]
    res = sample_perplexity(model, samples)
    # the same rows joined into one stream, windows as long as a row: the recipe with stride = context
    stream = perplexity(
        model, torch.cat([s.reshape(-1) for s in samples]), context_len=24, stride=24, progress=False
    )
    assert (res.tokens, res.windows, res.context_len, res.stride, res.stream_tokens) == (
        3 * 23,
        3,
        24,
        24,
        72,
    )
    assert (stream.tokens, stream.windows) == (res.tokens, res.windows)
    assert res.nll == pytest.approx(stream.nll, rel=1e-9)
    # what a batch of fixed windows scores: the summed next-token loss of every (B, T) sample
    total = 0.0
    for ids in samples:
        ids = ids.reshape(-1, ids.shape[-1])
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum"))
    assert res.ppl == pytest.approx(math.exp(total / (3 * 23)), rel=1e-6)
    assert sample_perplexity(model, samples, batch_size=3).ppl == pytest.approx(res.ppl, rel=1e-6)
    # rows of different lengths: each its own window; a one-token row has nothing to score
    ragged = [torch.randint(3, 128, (1, n), generator=g) for n in (9, 17, 1)]
    nll = sum(
        float(torch.nn.functional.cross_entropy(model(input_ids=r).logits[0, :-1], r[0, 1:], reduction="sum"))
        for r in ragged[:2]
    )
    got = sample_perplexity(model, ragged)
    assert (got.tokens, got.windows, got.context_len, got.stream_tokens) == (8 + 16, 2, 17, 27)
    assert got.ppl == pytest.approx(math.exp(nll / 24), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sample_perplexity(model, [torch.tensor([[7]])])
    with pytest.raises(ValueError, match=r"samples\[1\]: expected an integer token-id tensor"):
        sample_perplexity(model, [samples[1], samples[1].float()])


@torch.no_grad()
def test_overlapping_windows_match_transformers_masked_loss() -> None:
    """The guide's recipe, written with transformers' own loss and -100 labels, as the reference."""
    model = tiny_model("llama3", num_layers=2)
    ids = random_tokens(250, seed=1)
    ctx, stride = 48, 20
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        trg = end - prev_end
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, :-trg] = -100
        n_valid = int((labels[:, 1:] != -100).sum())
        total += float(model(x, labels=labels).loss) * n_valid
        count += n_valid
        prev_end = end
        if end == len(ids):
            break
    res = perplexity(model, ids, context_len=ctx, stride=stride, batch_size=4, progress=False)
    assert res.tokens == count == len(ids) - 1
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    # more context per token changes the number: the stride is not a no-op
    disjoint = perplexity(model, ids, context_len=ctx, stride=ctx, progress=False)
    assert disjoint.ppl != pytest.approx(res.ppl, rel=1e-6)


def test_defaults_follow_the_model_limit() -> None:
    model = tiny_model("llama2", num_layers=2, max_positions=64)
    res = perplexity(model, random_tokens(200), progress=False)
    assert (res.context_len, res.stride) == (64, 32)
    assert res.tokens == 199
    assert "context_len 64, stride 32" in res.summary()


def test_shared_materialised_and_exported_models_agree(tmp_path) -> None:
    ids = random_tokens(400, seed=2)
    kw = dict(context_len=64, stride=32, batch_size=4, progress=False)
    model = shared_model(pruned_plan())
    res = perplexity(model, ids, **kw)
    base = perplexity(tiny_model("llama2", num_layers=4), ids, **kw)
    assert res.ppl != pytest.approx(base.ppl, rel=1e-4), "the shared model should differ from its source"
    assert perplexity(materialize(model), ids, **kw).ppl == pytest.approx(res.ppl, rel=1e-5)
    save_compact(model, tmp_path / "compact")
    assert perplexity(load_compact(tmp_path / "compact", attn_implementation="eager"), ids, **kw).ppl == (
        pytest.approx(res.ppl, rel=1e-5)
    )
    export_materialized(model, tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager")
    assert perplexity(plain, ids, **kw).ppl == pytest.approx(res.ppl, rel=1e-5)
    # output norms: the shared model and its in-memory materialisation
    normed = shared_model(pruned_plan(out_norm=True))
    want = perplexity(normed, ids, **kw).ppl
    assert perplexity(materialize(normed, keep_output_norm=True), ids, **kw).ppl == pytest.approx(
        want, rel=1e-5
    )


def test_documents_join_with_eos_and_stop_at_max_tokens(tmp_path) -> None:
    tok = char_tokenizer()
    (tmp_path / "a.txt").write_text("ab\ncd")
    (tmp_path / "b.txt").write_text("xyz")
    docs = list(file_documents(str(tmp_path / "*.txt")))
    assert docs == ["ab\ncd", "xyz"]
    ids = encode_documents(docs, tok)
    want = tok("ab\ncd", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    want += tok("xyz", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == want
    assert encode_documents(docs, tok, add_bos=True).tolist()[:2] == [tok.bos_token_id, want[0]]
    assert encode_documents(iter(docs), tok, max_tokens=4).tolist() == want[:4]
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        list(file_documents(str(tmp_path / "nothing-here*.txt")))
    with pytest.raises(ValueError, match="max_tokens=1"):
        encode_documents(docs, tok, max_tokens=1)


def test_jsonl_files_go_through_the_data_stream(tmp_path) -> None:
    rows = [{"text": "hello there", "meta": {"redpajama_set_name": "RedPajamaC4"}}, {"text": "second doc"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(file_documents([str(tmp_path / "d.jsonl")])) == ["hello there", "second doc"]


def test_wikitext2_with_the_real_tokenizer(shared_data) -> None:
    """The real check: LLaMA's tokenizer (loaded from the bare .model file) on WikiText-2 test."""
    import sentencepiece as spm

    tok = load_tokenizer(shared_data / "tokenizers" / "llama2-32k.model")
    sp = spm.SentencePieceProcessor(model_file=str(shared_data / "tokenizers" / "llama2-32k.model"))
    text = (shared_data / "wikitext-2" / "test.txt").read_text()[:20000]
    # transformers reads the literal "<unk>" of WikiText as the unknown token (sentencepiece spells
    # it out); every other line encodes to sentencepiece's ids and decodes back to itself.
    lines = [ln.strip() for ln in text.split("\n") if ln.strip() and "<unk>" not in ln]
    assert len(lines) > 10
    for line in lines:
        ids = tok(line, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(line)
        assert tok.decode(ids) == line
    ids = encode_documents(file_documents(str(shared_data / "wikitext-2" / "test.txt")), tok, max_tokens=1500)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"][:1500]
    model = tiny_model("llama2", num_layers=2, hidden=32, vocab=32000, max_positions=512)
    res = perplexity(model, ids, context_len=256, stride=128, batch_size=4, progress=False)
    assert res.tokens == 1499 and res.stream_tokens == 1500
    # an untrained model is close to uniform over the 32k vocabulary
    assert 0.5 * 32000 < res.ppl < 2 * 32000


def test_documents_joined_with_a_string_become_one_text(tmp_path) -> None:
    from flexigpt.shared.evaluate.cli import PerplexitySection
    from flexigpt.shared.evaluate.perplexity import describe_section, section_documents

    rows = [" = Title = \n", "", " First line .\n", " Second .\n"]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    plain = PerplexitySection(files=[str(tmp_path / "rows.jsonl")])
    joined = PerplexitySection(files=[str(tmp_path / "rows.jsonl")], join="\n\n")
    assert list(section_documents(plain)) == rows
    assert list(section_documents(joined)) == ["\n\n".join(rows)]
    assert describe_section(joined).endswith("documents joined with '\\n\\n'")
    assert "documents joined" not in describe_section(plain)


def test_wikitext2_joined_with_blank_lines_gives_the_reference_codes_tokens(shared_data, tmp_path) -> None:
    """The SparseGPT / SliceGPT / LLM Surgeon text: tokenizer("\\n\\n".join(test["text"])) over the rows of
    wikitext-2-raw-v1 (one row per line of the raw file, blank lines empty), here rebuilt from test.txt."""
    from flexigpt.shared.evaluate.cli import PerplexitySection
    from flexigpt.shared.evaluate.perplexity import section_documents

    lines = (shared_data / "wikitext-2" / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    rows = [ln if ln.strip() else "" for ln in lines]
    assert len(rows) == 4358  # the hub split's row count
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    tok = load_tokenizer(shared_data / "tokenizers" / "llama2-32k.model")
    pc = PerplexitySection(files=[str(tmp_path / "test.jsonl")], join="\n\n", context_len=2048, stride=2048)
    ids = encode_documents(section_documents(pc), tok, add_bos=True, eos_between_docs=True)
    reference = tok("\n\n".join(rows), add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1:].tolist() == reference  # BOS by the text rule
    assert len(ids) // 2048 == 161 and len(ids) // 4096 == 80  # windows of the two conventions
