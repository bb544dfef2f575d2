"""The quickstart: stdlib corpus extraction and split, the tokenizer round trip, the toy task, and the
whole command end to end at the tiny scale (real train / grow / prune commands, real lm-eval), then
run again to check that it resumes instead of starting over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flexigpt.corpus import (
    SUBSET,
    QuickstartDataError,
    build_corpus,
    check_round_trip,
    continuation_docs,
    extract_pieces,
    is_heldout,
    passages,
    read_documents,
    sentences,
    source_files,
    stdlib_root,
    train_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

SOURCE = textwrap.dedent(
    '''\
    #!/usr/bin/env python3
    # -*- coding: utf-8 -*-
    """Module docstring: what this module is for."""

    import os  # noqa: F401

    # A comment block that explains why the constant
    # has the value it has.
    LIMIT = 3


    def f(x):
        """Return x plus one, for the test of extraction."""
        # ----------------------------------------
        return x + 1  # short
    '''
)


def test_extract_pieces_keeps_docstrings_and_comment_blocks_in_source_order():
    pieces = extract_pieces(SOURCE)
    assert pieces == [
        "Module docstring: what this module is for.",
        "A comment block that explains why the constant\nhas the value it has.",
        "Return x plus one, for the test of extraction.",
    ]  # shebang, coding cookie, noqa, separators and short comments are dropped
    assert passages(pieces, min_chars=50) == ["\n\n".join(pieces[:2]), pieces[2]]
    with pytest.raises(SyntaxError):
        extract_pieces("def broken(:\n")


def test_source_files_skip_tests_and_the_split_is_a_fixed_hash_of_the_path():
    files = source_files(stdlib_root())
    rel = [f.relative_to(stdlib_root()).parts for f in files]
    assert len(files) > 300 and not any({"test", "tests", "site-packages"} & set(p) for p in rel)
    # the split depends on the path only (same on every machine); about 8% held out
    assert is_heldout("json/decoder.py", 8) == is_heldout("json/decoder.py", 8)
    share = sum(is_heldout("/".join(p), 8) for p in rel) / len(rel)
    assert 0.03 < share < 0.15


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "corpus"
    build_corpus(out, max_train_files=12, max_heldout_files=4)
    return out


def test_corpus_is_slimpajama_jsonl_with_a_manifest(corpus):
    m = json.loads((corpus / "manifest.json").read_text())
    assert m["python"] == ".".join(map(str, sys.version_info[:3]))
    assert m["train"]["source_files"] == 12 and m["heldout"]["source_files"] == 4
    rows = [json.loads(line) for f in sorted((corpus / "train").glob("*.jsonl")) for line in f.open()]
    assert len(rows) == m["train"]["documents"] and all(
        r["meta"]["redpajama_set_name"] == SUBSET for r in rows
    )
    assert len({r["meta"]["path"] for r in rows}) == 12
    # shuffled across files: the first documents do not all come from one module
    assert len({r["meta"]["path"] for r in rows[:8]}) > 2
    assert sum(len(r["text"].encode()) for r in rows) == m["train"]["bytes"]
    held = {json.loads(line)["meta"]["path"] for line in (corpus / "heldout" / "part-000.jsonl").open()}
    assert all(is_heldout(p, 8) for p in held) and not held & {r["meta"]["path"] for r in rows}
    with pytest.raises(QuickstartDataError, match="exists already"):
        build_corpus(corpus)
    assert not list(corpus.parent.glob(".*tmp"))


def test_tokenizer_round_trip_matches_sentencepiece(corpus, tmp_path):
    tok_dir = train_tokenizer(corpus, tmp_path / "tok", vocab_size=400)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) and len(tok) == 400
    texts = list(read_documents(corpus / "heldout")) + ["  two leading spaces\n\n\ttab", "x  =  1\n"]
    check_round_trip(tok_dir, texts)  # raises on any difference
    # the check is not vacuous: with a dummy prefix the two libraries disagree on a leading space
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_prefix_space": True}))
    (tok_dir / "tokenizer.json").unlink()
    with pytest.raises(QuickstartDataError, match="round trip"):
        check_round_trip(tok_dir, ["  leading"])


def test_toy_task_documents_are_well_formed_and_deterministic(corpus):
    texts = list(read_documents(corpus / "heldout")) + list(read_documents(corpus / "train"))
    assert all(s[0].isupper() and s.endswith(".") and "\n" not in s for s in sentences(texts))
    docs = continuation_docs(texts, 20, seed=3)
    assert docs == continuation_docs(texts, 20, seed=3)
    for d in docs:
        assert len(d["choices"]) == len(set(d["choices"])) == 4 and 0 <= d["label"] < 4
        # the true ending is in the text; the others are its words in another order
        assert any(d["query"] + " " + d["choices"][d["label"]] in " ".join(t.split()) for t in texts)
        assert len({tuple(sorted(c[:-1].split())) for c in d["choices"]}) == 1 and all(
            c[-1] == "." for c in d["choices"]
        )
    assert len({d["label"] for d in docs}) > 1
    with pytest.raises(QuickstartDataError, match="lower the task size"):
        continuation_docs(texts[:1], 10_000)


# ------------------------------------------------------------------------------- end to end
def _quickstart(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [sys.executable, "-m", "flexigpt.quickstart", "--tiny", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.deepspeed
def test_tiny_quickstart_end_to_end_then_resumes(tmp_path):
    out = tmp_path / "qs"
    first = _quickstart(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((out / "report" / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["base", "grown", "flexigpt", "shortgpt", "shortgpt_lora"]
    by = {v["name"]: v for v in report["variants"]}
    assert by["grown"]["num_slots"] == 6 and by["grown"]["physical_blocks"] == 4
    assert len(by["flexigpt"]["removed_blocks"]) == 1 and by["flexigpt"]["num_slots"] == 4
    assert by["shortgpt"]["num_slots"] == 3
    for v in report["variants"]:
        assert 1 < v["perplexity"]["ppl"] < 640  # below the uniform guess over the vocabulary
        score = v["zeroshot"]["scores"]["docstring_continuation"]
        assert score["metric"] == "acc_norm" and score["samples"] == 40
    assert set(report["plots"]) >= {"slot map", "block influence", "base selection", "loss curves"}
    for png in report["plots"].values():
        assert (out / "report" / png).stat().st_size > 1000
    md = (out / "report" / "report.md").read_text()
    assert "toy task" in md and "| base |" in md
    assert md.count(", text rule doc + EOS") == 5  # every variant's perplexity states the text rule
    timings = json.loads((out / "timings.json").read_text())
    assert all(
        timings["steps"][s] is not None for s in ("corpus", "tokenizer", "base", "grow", "prune", "eval")
    )

    # a second run finds every step done and redoes nothing
    mtime = (out / "base" / "final_materialized" / "model.safetensors").stat().st_mtime_ns
    second = _quickstart(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done in an earlier run") == 6
    assert "quickstart finished: every step was done by an earlier run" in second.stdout
    assert (out / "base" / "final_materialized" / "model.safetensors").stat().st_mtime_ns == mtime
    again = json.loads((out / "timings.json").read_text())
    assert again["ran_now"] == [] and again["steps"] == timings["steps"]

    # a run that died after the grow command trained: that step runs again and the command resumes
    # from its last checkpoint instead of training again; the steps before it are not touched
    (out / "steps" / "grow.json").unlink()
    (out / "steps" / "eval.json").unlink()
    third = _quickstart(out)
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count("done in an earlier run") == 4
    grow_log = (out / "logs" / "grow.log").read_text()
    assert grow_log.count("resumed from") == 1 and "continuing with training" in grow_log
    assert (out / "base" / "final_materialized" / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_run_dir_of_another_scale_is_refused(tmp_path):
    from flexigpt.quickstart import run
    from flexigpt.quickstart_steps import QuickstartError

    out = tmp_path / "qs"
    out.mkdir()
    (out / "quickstart.json").write_text(json.dumps({"scale": "full", "settings": {}}))
    with pytest.raises(QuickstartError, match="other settings"):
        run(out, tiny=True, echo=False)
    assert sorted(p.name for p in out.iterdir()) == ["quickstart.json"]


def test_a_run_with_every_step_done_reports_its_own_wall_time(tmp_path, capsys):
    from flexigpt.quickstart import run
    from flexigpt.quickstart_scale import SCALES
    from flexigpt.quickstart_steps import STEPS

    out = tmp_path / "qs"
    out.mkdir()
    settings = {"scale": "tiny", "settings": SCALES["tiny"].as_dict()}
    (out / "quickstart.json").write_text(json.dumps(settings))
    (out / "steps").mkdir()
    for i, step in enumerate(STEPS):
        (out / "steps" / f"{step.name}.json").write_text(json.dumps({"step": step.name, "seconds": 10.0 + i}))
    # the invocation began 1.5 s before run() was called (imports, argument parsing)
    record = run(out, tiny=True, echo=False, started=time.perf_counter() - 1.5)
    assert record["ran_now"] == [] and record["seconds_this_run"] >= 1.5
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(
        f"quickstart finished: every step was done by an earlier run; this run checked them and skipped "
        f"all {len(STEPS)} in {record['seconds_this_run']:.1f} s"
    )
    assert "corpus 10 s (earlier)" in last
