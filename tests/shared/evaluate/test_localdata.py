"""The paper's five lm-eval tasks, offline, over hand-made local copies of their datasets: lm-eval's
own task definitions (templates, HellaSwag's process_docs, WinoGrande's partial evaluation, acc and
acc_norm) score a tiny model exactly as a direct log-likelihood computation does, and bad
``local_data`` entries are refused by ``flexigpt-eval`` before any model is loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from flexigpt.shared.engine.checkpoint import save_compact
from flexigpt.shared.evaluate.cli import main
from flexigpt.shared.evaluate.localdata import (
    LOCAL_SPLITS,
    LOCAL_YAMLS,
    builtin_yaml,
    read_task_yaml,
    task_yaml,
    write_local_tasks,
)
from flexigpt.shared.evaluate.zeroshot import PAPER_TASKS, evaluate_zeroshot, get_task_manager

from .evalkit import char_tokenizer, pruned_plan, shared_model

# Invented records in each hub dataset's schema (only the fields lm-eval reads, plus a few it ignores).
ARC_EASY = [
    {"id": "e1", "question": "Which one can fly?", "choices": {"text": ["a rock", "a bird", "a shoe"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"id": "e2", "question": "What melts in the sun?", "choices": {"text": ["ice", "iron", "glass", "sand"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "e3", "question": "Where do fish live?", "choices": {"text": ["in trees", "on roofs", "in water"], "label": ["1", "2", "3"]}, "answerKey": "3"},
    {"id": "e4", "question": "What do plants need?", "choices": {"text": ["light", "noise"], "label": ["A", "B"]}, "answerKey": "A"},
    {"id": "e5", "question": "Which is hot?", "choices": {"text": ["snow", "a fire", "a lake", "fog"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
]  # fmt: skip
ARC_CHALLENGE = [
    {"id": "c1", "question": "Why does a ball fall?", "choices": {"text": ["gravity", "wind", "magic"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"id": "c2", "question": "What turns water to steam?", "choices": {"text": ["cold", "heat", "salt", "ink"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "c3", "question": "Which is a gas?", "choices": {"text": ["stone", "wood", "air"], "label": ["A", "B", "C"]}, "answerKey": "C"},
    {"id": "c4", "question": "What makes a shadow?", "choices": {"text": ["blocked light", "loud sound"], "label": ["A", "B"]}, "answerKey": "A"},
]  # fmt: skip
PIQA = [
    {"goal": "To dry wet hands", "sol1": "use a towel", "sol2": "use a spoon of soup", "label": 0},
    {"goal": "To cool a drink", "sol1": "put it on a stove", "sol2": "add ice", "label": 1},
    {"goal": "To cut paper", "sol1": "use scissors", "sol2": "use a pillow", "label": 0},
    {"goal": "To see at night", "sol1": "close both eyes tight", "sol2": "turn on a lamp", "label": 1},
    {"goal": "To keep bread fresh", "sol1": "seal it in a bag", "sol2": "leave it in rain", "label": 0},
    {"goal": "To write a note", "sol1": "use a fork", "sol2": "use a pen", "label": 1},
]
WINOGRANDE = [
    {"sentence": "The cup fell off the table because _ was tilted.", "option1": "the cup", "option2": "the table", "answer": "2"},
    {"sentence": "Ann lent Mia a coat since _ was cold.", "option1": "Ann", "option2": "Mia", "answer": "2"},
    {"sentence": "The bag ripped because _ was too heavy for it.", "option1": "the load", "option2": "the bag", "answer": "1"},
    {"sentence": "Sam beat Tom at chess, so _ was happy.", "option1": "Sam", "option2": "Tom", "answer": "1"},
    {"sentence": "The box did not fit in the car as _ was too big.", "option1": "the box", "option2": "the car", "answer": "1"},
]  # fmt: skip
HELLASWAG = [
    {"ind": 1, "activity_label": "Baking", "ctx_a": "A woman mixes flour and eggs in a bowl.", "ctx_b": "she", "ctx": "A woman mixes flour and eggs in a bowl. she", "endings": ["pours it into a pan.", "[title] throws the bowl away.", "sings to a goat.", "paints the wall."], "label": "0"},
    {"ind": 2, "activity_label": "Cycling", "ctx_a": "A man pumps up a tire.", "ctx_b": "then he", "ctx": "A man pumps up a tire. then he", "endings": ["eats the tire.", "rides down the road.", "sleeps on it.", "[step] buys a cake."], "label": "1"},
    {"ind": 3, "activity_label": "Washing dishes", "ctx_a": "A boy fills the sink with water.", "ctx_b": "he", "ctx": "A boy fills the sink with water. he", "endings": ["flies away.", "reads a map.", "scrubs the plates.", "climbs a tree."], "label": "2"},
    {"ind": 4, "activity_label": "Gardening", "ctx_a": "A girl digs a hole.", "ctx_b": "she", "ctx": "A girl digs a hole. she", "endings": ["drives a bus.", "sings.", "irons a shirt.", "plants a seed in it."], "label": "3"},
]  # fmt: skip

# What lm-eval's hellaswag process_docs makes of the endings with markers (the others stay as they are).
HELLASWAG_ENDINGS = {
    "[title] throws the bowl away.": " throws the bowl away.",
    "[step] buys a cake.": " buys a cake.",
}


def _write(d: Path) -> dict[str, str]:
    """The five datasets in four formats: jsonl, a hub-style parquet directory, csv, a json array."""
    (d / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC_EASY))
    (d / "arc_challenge").mkdir()
    pq.write_table(pa.Table.from_pylist(ARC_CHALLENGE), d / "arc_challenge" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(ARC_EASY), d / "arc_challenge" / "train-00000-of-00001.parquet")
    keys = list(PIQA[0])
    (d / "piqa.csv").write_text(
        ",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in PIQA)
    )
    (d / "winogrande.json").write_text(json.dumps(WINOGRANDE))
    (d / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    return {
        "arc_easy": str(d / "arc_easy.jsonl"),
        "arc_challenge": str(d / "arc_challenge"),
        "piqa": str(d / "piqa.csv"),
        "winogrande": str(d / "winogrande.json"),
        "hellaswag": str(d / "hellaswag.jsonl"),
    }


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> dict[str, str]:
    return _write(tmp_path_factory.mktemp("paper_data"))


@torch.no_grad()
def _ll(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


def _scores(model, tok, items) -> tuple[float, float]:
    """acc and acc_norm over (contexts, continuations, choices, gold): one request per choice."""
    acc = acc_norm = 0
    for contexts, continuations, choices, gold in items:
        lls = [_ll(model, tok, c, x) for c, x in zip(contexts, continuations, strict=True)]
        acc += max(range(len(lls)), key=lambda k: lls[k]) == gold
        acc_norm += max(range(len(lls)), key=lambda k: lls[k] / len(choices[k])) == gold
    return acc / len(items), acc_norm / len(items)


def _expected_requests() -> dict[str, list]:
    """The requests lm-eval's own YAMLs make of the records, written out independently."""

    def arc(r):
        q, ch = f"Question: {r['question']}\nAnswer:", r["choices"]
        return (
            [q] * len(ch["text"]),
            [" " + t for t in ch["text"]],
            ch["text"],
            ch["label"].index(r["answerKey"]),
        )

    def piqa(r):
        q, ch = f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]]
        return [q, q], [" " + c for c in ch], ch, r["label"]

    def wino(r):
        head, tail = r["sentence"].split("_")  # partial evaluation: the option ends the context
        ch = [head + r["option1"], head + r["option2"]]
        return ch, [" " + tail.strip()] * 2, ch, int(r["answer"]) - 1

    def hella(r):
        # process_docs: "activity: ctx_a Ctx_b", bracketed WikiHow markers dropped from the endings
        ends = [HELLASWAG_ENDINGS.get(e, e) for e in r["endings"]]
        q = f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"
        return [q] * len(ends), [" " + e for e in ends], ends, int(r["label"])

    return {
        "arc_easy": [arc(r) for r in ARC_EASY],
        "arc_challenge": [arc(r) for r in ARC_CHALLENGE],
        "piqa": [piqa(r) for r in PIQA],
        "winogrande": [wino(r) for r in WINOGRANDE],
        "hellaswag": [hella(r) for r in HELLASWAG],
    }


def test_the_five_real_tasks_score_local_data_as_a_direct_computation(local_data) -> None:
    import datasets.config

    tok = char_tokenizer()
    model = shared_model(pruned_plan(out_norm=True), seed=3)
    offline_before = datasets.config.HF_HUB_OFFLINE
    # lm-eval's own five tasks are registered by name too (their folders indexed, not the whole
    # registry): the local data is what gets scored, under the same names
    root = builtin_yaml("piqa").parents[1]
    folders = [root / d for d in ("arc", "piqa", "winogrande", "hellaswag")]
    assert all(t in get_task_manager(folders, include_defaults=False).task_index for t in PAPER_TASKS)
    res = evaluate_zeroshot(
        model, tok, None, batch_size=8, include_path=folders, include_defaults=False, local_data=local_data
    )
    assert offline_before == datasets.config.HF_HUB_OFFLINE, "the offline switch is restored"
    assert list(res.scores) == list(PAPER_TASKS)
    counts = {"arc_easy": 5, "arc_challenge": 4, "piqa": 6, "winogrande": 5, "hellaswag": 4}
    for task, items in _expected_requests().items():
        score, got = res.scores[task], res.extra["metrics"][task]
        assert (score.metric, score.samples) == (PAPER_TASKS[task], counts[task]), task
        acc, acc_norm = _scores(model, tok, items)
        assert got["acc,none"] == pytest.approx(acc), task
        if task == "winogrande":
            assert "acc_norm,none" not in got  # lm-eval reports acc only (whole-sentence choices)
        else:
            assert got["acc_norm,none"] == pytest.approx(acc_norm), task
        assert score.value == got[f"{PAPER_TASKS[task]},none"]
    assert res.mean == pytest.approx(sum(got.value for got in res.scores.values()) / 5)


def test_the_written_tasks_make_the_requests_of_lm_evals_own_templates(local_data, tmp_path) -> None:
    """Every request (context, continuation) of the five tasks is the one written out above."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    model, tok = shared_model(pruned_plan(), seed=1), char_tokenizer()
    yamls = write_local_tasks(local_data, tmp_path)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[str(p) for p in yamls.values()], num_fewshot=0, task_manager=get_task_manager(None, False),
        log_samples=True,
    )  # fmt: skip
    for task, items in _expected_requests().items():
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(items), task
        for sample, (contexts, continuations, _, gold) in zip(samples, items, strict=True):
            assert [tuple(a[:2]) for a in sample["arguments"]] == list(
                zip(contexts, continuations, strict=True)
            )
            # WinoGrande's target is the shared continuation; its gold option comes from doc_to_text
            assert sample["target"] == (continuations[0].strip() if task == "winogrande" else gold), task


def test_task_yaml_includes_lm_evals_own_definition_and_replaces_only_the_data(local_data) -> None:
    for task, rel in LOCAL_YAMLS.items():
        own = read_task_yaml(builtin_yaml(task))
        assert own["task"] == task and builtin_yaml(task).as_posix().endswith("lm_eval/tasks/" + rel)
        assert LOCAL_SPLITS[task] == (own.get("test_split") or own["validation_split"]), task
        cfg = yaml.safe_load(task_yaml(task, local_data[task]))
        assert cfg["include"] == str(builtin_yaml(task)) and cfg["task"] == task
        files = cfg["dataset_kwargs"]["data_files"][LOCAL_SPLITS[task]]
        assert all(os.path.isabs(f) for f in files)
        assert set(cfg) == {"include", "task", "dataset_path", "dataset_name", "dataset_kwargs"} | {
            "training_split",
            "validation_split",
            "test_split",
        }
    # a hub-style directory contributes only the evaluated split's files
    arc = yaml.safe_load(task_yaml("arc_challenge", local_data["arc_challenge"]))
    assert [Path(f).name for f in arc["dataset_kwargs"]["data_files"]["test"]] == [
        "test-00000-of-00001.parquet"
    ]
    assert arc["dataset_path"] == "parquet" and arc["training_split"] is None


def _refused(capsys, tmp_path, *overrides: str) -> str:
    out = tmp_path / "out"
    assert main(["models.a=missing-model", f"output_dir={out}", *overrides]) == 2
    assert not out.exists(), "nothing is written (and no model loaded) for a refused recipe"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "zeroshot.local_data" in err
    return err


def test_bad_local_data_is_refused_before_any_model_loads(local_data, tmp_path, capsys) -> None:
    err = _refused(capsys, tmp_path, f"zeroshot.local_data.arc={local_data['arc_easy']}")
    assert (
        "unknown task 'arc'" in err
        and "'arc_easy', 'arc_challenge', 'piqa', 'winogrande', 'hellaswag'" in err
    )
    err = _refused(capsys, tmp_path, f"zeroshot.local_data.piqa={tmp_path / 'none.jsonl'}")
    assert "local_data.piqa" in err and "does not exist" in err
    (tmp_path / "piqa.txt").write_text("x\n")
    err = _refused(capsys, tmp_path, f"zeroshot.local_data.piqa={tmp_path / 'piqa.txt'}")
    assert "suffix '.txt'" in err and "'.parquet'" in err
    (tmp_path / "arc.csv").write_text("question,answerKey\nq,A\n")
    err = _refused(capsys, tmp_path, f"zeroshot.local_data.arc_easy={tmp_path / 'arc.csv'}")
    assert "local_data.arc_easy" in err and "csv holds flat text columns only" in err
    err = _refused(capsys, tmp_path, f"zeroshot.local_data.hellaswag={local_data['arc_easy']}")
    assert (
        "local_data.hellaswag" in err
        and "lacks ['activity_label', 'ctx_a', 'ctx_b', 'endings', 'label']" in err
    )
    (tmp_path / "wino.jsonl").write_text(json.dumps({**WINOGRANDE[0], "answer": 2}) + "\n")
    err = _refused(capsys, tmp_path, f"zeroshot.local_data.winogrande={tmp_path / 'wino.jsonl'}")
    assert 'answer must be the text "1" or "2"' in err
    (tmp_path / "piqa.jsonl").write_text(json.dumps({**PIQA[0], "label": "1"}) + "\n")
    err = _refused(capsys, tmp_path, f"zeroshot.local_data.piqa={tmp_path / 'piqa.jsonl'}")
    assert "label must be the number 0 or 1 (got '1')" in err
    (tmp_path / "val").mkdir()
    err = _refused(capsys, tmp_path, f"zeroshot.local_data.piqa={tmp_path / 'val'}")
    assert "no file of the validation split" in err
    err = _refused(
        capsys,
        tmp_path,
        "zeroshot.tasks=[piqa]",
        f"zeroshot.local_data.winogrande={local_data['winogrande']}",
    )
    assert "['winogrande'] are not among tasks ['piqa']" in err


def test_eval_command_scores_local_data_and_rescores_when_it_changes(
    local_data, tmp_path, capsys, monkeypatch
) -> None:
    from flexigpt.shared.evaluate import zeroshot

    asked = []  # every task is local: lm-eval's built-in registry is not indexed, whatever include_defaults

    def spy(include_path=None, include_defaults=True):
        asked.append(include_defaults)
        return get_task_manager(include_path, include_defaults)

    monkeypatch.setattr(zeroshot, "get_task_manager", spy)
    tok = char_tokenizer()
    save_compact(shared_model(pruned_plan(out_norm=True)), tmp_path / "flexi", tokenizer=tok)
    wino = tmp_path / "winogrande.jsonl"
    wino.write_text("".join(json.dumps(r) + "\n" for r in WINOGRANDE))
    args = [
        f"models.flexigpt={tmp_path / 'flexi'}",
        f"output_dir={tmp_path / 'eval'}",
        "zeroshot.tasks=[piqa, winogrande]",
        f"zeroshot.local_data={{piqa: {local_data['piqa']}, winogrande: {wino}}}",
    ]
    assert main(args) == 0
    assert asked == [False]
    assert "reusing" not in capsys.readouterr().out
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    scores = rep["variants"][0]["zeroshot"]["scores"]
    assert {t: (s["metric"], s["samples"]) for t, s in scores.items()} == {
        "piqa": ("acc_norm", 6),
        "winogrande": ("acc", 5),
    }
    assert main(args) == 0
    assert "reusing" in capsys.readouterr().out
    wino.write_text("".join(json.dumps(r) + "\n" for r in WINOGRANDE[:3]))  # other data: scored anew
    assert main(args) == 0
    assert "reusing" not in capsys.readouterr().out
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert rep["variants"][0]["zeroshot"]["scores"]["winogrande"]["samples"] == 3
