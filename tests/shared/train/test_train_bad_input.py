"""Bad input to flexigpt-train: one line naming the key or file and what is allowed, exit status 2,
no traceback, and nothing written to output_dir. Each case runs the real command in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flexigpt.shared.train.cli import main

from .trainkit import make_tokenizer, recipe_dict, workspace, write_recipe

pytestmark = pytest.mark.deepspeed


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture(autouse=True)
def _quiet_library_loggers(monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets logs a failed parse through a handler bound to the stderr of the test that first
    imported it, closed by the time a later test runs; the tests read the command's own lines only."""
    import logging

    for name in ("datasets", "transformers"):
        monkeypatch.setattr(logging.getLogger(name), "handlers", [])


def _refused(capsys, argv: list[str], pattern: str, out: Path | None = None) -> str:
    """Run the command; require exit 2, one message matching `pattern`, no traceback, no run files."""
    import re

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # the message line (a progress bar may share the terminal line before it)
    line = err[err.rindex("flexigpt-train") :].splitlines()[0] if "flexigpt-train" in err else ""
    assert re.search(pattern, line), err[-2000:]
    if out is not None:
        written = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        assert not {"checkpoints", "recipe.yaml", "plan.json", "tb", "final"} & set(written), written
    return line


def _recipe(tmp_path: Path, ws: dict[str, Path], edit=None, **train) -> tuple[Path, Path]:
    out = tmp_path / "out"
    d = recipe_dict(ws, out, max_steps=2, checkpoint_every=2, **train)
    if edit is not None:
        edit(d)
    return write_recipe(tmp_path / "r.yaml", d), out


def _set(path: str, value):
    def edit(d):
        *head, last = path.split(".")
        node = d
        for k in head:
            node = node[k]
        node[last] = value

    return edit


def test_missing_recipe_file(capsys, tmp_path: Path) -> None:
    _refused(capsys, [str(tmp_path / "nope.yaml")], r"nope.yaml")


@pytest.mark.parametrize(
    ("key", "pattern"),
    [
        ("model.source", r"model.source='.*/missing' does not exist \(a local path"),
        ("model.tokenizer", r"model.tokenizer='.*/missing' does not exist \(a local path"),
        ("model.plan", r"model.plan='.*/missing' does not exist"),
    ],
)
def test_missing_local_paths_are_named_not_taken_for_hub_ids(
    capsys, ws, tmp_path: Path, key, pattern
) -> None:
    recipe, out = _recipe(tmp_path, ws, _set(key, str(tmp_path / "missing")))
    _refused(capsys, [str(recipe)], pattern, out)


def test_a_plan_that_is_not_json(capsys, ws, tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text("slots: [0, 1]\n")
    recipe, out = _recipe(tmp_path, ws, _set("model.plan", str(tmp_path / "plan.json")))
    _refused(capsys, [str(recipe)], r"model.plan='.*plan.json' is not a valid plan file", out)


def test_an_unsupported_architecture(capsys, ws, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128)).save_pretrained(
        tmp_path / "gpt2"
    )
    d = recipe_dict(ws, tmp_path / "out", max_steps=2)
    d["model"].update(source=str(tmp_path / "gpt2"), plan=None)
    recipe = write_recipe(tmp_path / "r.yaml", d)
    _refused(
        capsys, [str(recipe)], r"model.source=.*gpt2.*model_type='gpt2' is not supported; supported: llama"
    )


def test_output_dir_that_is_a_file(capsys, ws, tmp_path: Path) -> None:
    recipe, _ = _recipe(tmp_path, ws, _set("output_dir", str(tmp_path / "afile")))
    (tmp_path / "afile").write_text("x")
    _refused(capsys, [str(recipe)], r"output_dir=.*afile' is a file")


def test_output_dir_that_holds_an_incompatible_run(capsys, ws, tmp_path: Path) -> None:
    recipe, out = _recipe(tmp_path, ws)
    assert main([str(recipe)]) == 0
    from flexigpt.shared.engine.plan import AdapterSpec, Plan, SlotSpec

    plan = Plan.load(ws["plan"])
    Plan("llama", 4, (*plan.slots, SlotSpec(block=3, adapter=AdapterSpec(rank=2)))).save(
        tmp_path / "other.json"
    )
    _refused(
        capsys, [str(recipe), f"model.plan={tmp_path / 'other.json'}"], r"another plan .*--allow-plan-change"
    )


def test_a_bad_deepspeed_config(capsys, ws, tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2},')
    recipe, out = _recipe(tmp_path, ws, ds_config=str(tmp_path / "ds.json"))
    _refused(capsys, [str(recipe)], r"ds.json: not valid JSON", out)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    _refused(capsys, [str(recipe)], r"zero_optimization.stage must be 1, 2 or 3", out)


CORPORA = {
    "no_text_field": (b'{"text": "the cat sat"}\n{"body": "a dog"}\n', r"bad.jsonl line 2: no 'text' field"),
    "null_text": (b'{"text": "the cat sat"}\n{"text": null}\n', r"bad.jsonl line 2: 'text' is null"),
    "number_text": (
        b'{"text": "the cat sat"}\n{"text": 7}\n',
        r"bad.jsonl line 2: 'text' is a int, not a string",
    ),
    "binary": (
        bytes(range(256)) * 4,
        r"bad.jsonl line 1: not UTF-8 text|bad.jsonl line 1: not a JSON object",
    ),
    "not_utf8": (b'{"text": "the cat sat"}\n{"text": "caf\xe9 \xff"}\n', r"bad.jsonl line 2: not UTF-8 text"),
    "empty": (b"", r"hold no documents"),
}


@pytest.mark.parametrize("case", sorted(CORPORA))
def test_corpus_problems_name_the_file_and_line(capsys, ws, tmp_path: Path, case: str) -> None:
    data, pattern = CORPORA[case]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "bad.jsonl").write_bytes(data)
    recipe, out = _recipe(tmp_path, ws, _set("data.files", [str(tmp_path / "corpus" / "*.jsonl")]))
    line = _refused(capsys, [str(recipe)], pattern)
    assert "data.files" in line
    assert not (out / "checkpoints").exists()


def test_a_corpus_problem_in_a_worker_process_is_named_too(capsys, ws, tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "bad.jsonl").write_bytes(CORPORA["null_text"][0])
    recipe, _ = _recipe(tmp_path, ws, _set("data.files", [str(tmp_path / "corpus" / "*.jsonl")]))
    _refused(capsys, [str(recipe), "data.num_workers=1"], r"bad.jsonl line 2: 'text' is null")


def test_a_tokenizer_larger_than_the_embedding(capsys, ws, tmp_path: Path) -> None:
    big = make_tokenizer(tmp_path / "bigtok", vocab=200)
    recipe, out = _recipe(tmp_path, ws, _set("model.tokenizer", str(big)))
    _refused(
        capsys, [str(recipe)], r"model.tokenizer: \d+ tokens, but the model's embedding has 128 rows", out
    )


def test_seq_len_above_the_position_embeddings(capsys, ws, tmp_path: Path) -> None:
    limit = json.loads((ws["model"] / "config.json").read_text())["max_position_embeddings"]
    recipe, out = _recipe(tmp_path, ws, _set("data.seq_len", limit * 2))
    _refused(
        capsys,
        [str(recipe)],
        rf"data.seq_len={limit * 2} is above the model's max_position_embeddings={limit}",
        out,
    )


def test_a_non_boolean_shared_grad_in_gemm(capsys, ws, tmp_path: Path) -> None:
    path, out = _recipe(tmp_path, ws, shared_grad_in_gemm="sometimes")
    capsys.readouterr()
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "invalid recipe" in err and "Traceback" not in err, err
    assert "train.shared_grad_in_gemm: Input should be a valid boolean" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("train", "pattern"),
    [
        ({"optimizer_impl": "apex"}, "train.optimizer_impl: Input should be 'auto', 'foreach' or 'fused'"),
        ({"compile": "fast"}, "train.compile: Input should be a valid boolean"),
    ],
)
def test_bad_speed_option_values(capsys, ws, tmp_path: Path, train: dict, pattern: str) -> None:
    path, out = _recipe(tmp_path, ws, **train)
    capsys.readouterr()
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "invalid recipe" in err and "Traceback" not in err, err
    assert pattern in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("train", "pattern"),
    [
        ({"ds_config": "ds_configs/zero3.json"}, r"train\.compile=true with ZeRO-3 \(train\.ds_config\)"),
        ({"gradient_checkpointing": True}, r"train\.compile=true with train\.gradient_checkpointing=true"),
        ({"shared_grad_in_gemm": True}, r"train\.compile=true with train\.shared_grad_in_gemm=true"),
    ],
)
def test_compile_combinations_it_cannot_compile(
    capsys, ws, tmp_path: Path, train: dict, pattern: str
) -> None:
    path, out = _recipe(tmp_path, ws, compile=True, **train)
    _refused(capsys, [str(path)], pattern, out)


def test_export_of_a_missing_checkpoint(capsys, tmp_path: Path) -> None:
    _refused(
        capsys, ["export", str(tmp_path / "none"), str(tmp_path / "exp")], r"none is neither a checkpoint"
    )
    assert not (tmp_path / "exp").exists()


def test_a_recipe_of_another_kind_is_still_one_line(capsys, tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"kind": "nonsense"}))
    _refused(capsys, [str(tmp_path / "r.yaml")], r"kind")
