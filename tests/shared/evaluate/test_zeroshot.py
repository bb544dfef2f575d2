"""Zero-shot evaluation through lm-eval, offline on local tasks the tests write: the scores equal a
direct log-likelihood computation, shared and materialised models score the same, bad task names
and metrics are refused, and the paper's metrics are ones lm-eval's built-in tasks report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from flexigpt.shared.engine.apply import materialize
from flexigpt.shared.evaluate.zeroshot import (
    PAPER_TASKS,
    ZeroShotError,
    ZeroShotResult,
    check_tasks,
    evaluate_zeroshot,
    get_task_manager,
    parse_tasks,
    task_metrics,
    write_choice_task,
)

from .evalkit import char_tokenizer, pruned_plan, shared_model

# An ARC-shaped task: the same templates as lm-eval's arc_easy.yaml, over a local jsonl.
ARC_YAML = """task: toy_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _arc_docs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["red", "blue", "a cat", "the river", "seven", "no", "yes", "it rains", "stone", "up"]
    docs = []
    for i in range(n):
        texts = rng.sample(words, 4)
        labels = ["A", "B", "C", "D"]
        docs.append(
            {
                "question": f"Which one is {rng.choice(words)} number {i}?",
                "choices": {"text": texts, "label": labels},
                "answerKey": labels[rng.randrange(4)],
            }
        )
    return docs


@pytest.fixture(scope="module")
def arc_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    docs = _arc_docs(16)
    data = d / "toy_arc.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (d / "toy_arc.yaml").write_text(ARC_YAML.format(data=json.dumps(str(data))))
    qa = [
        {"query": f"Q{i}: 2 + {i} =", "choices": [str(2 + i), str(3 + i) + "!", "x"], "label": i % 3}
        for i in range(9)
    ]
    write_choice_task(d, "toy_sum", qa)
    return d, docs, qa


@torch.no_grad()
def _direct_scores(model, tok, items: list[tuple[str, list[str], int]]) -> tuple[float, float]:
    """acc and acc_norm as lm-eval defines them, from a plain forward pass per choice."""
    acc = acc_norm = 0
    for context, choices, gold in items:
        lls = []
        for choice in choices:
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            lls.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
        acc += max(range(len(lls)), key=lambda k: lls[k]) == gold
        acc_norm += max(range(len(lls)), key=lambda k: lls[k] / len(choices[k])) == gold
    return acc / len(items), acc_norm / len(items)


def test_local_tasks_match_a_direct_loglikelihood_loop(arc_task) -> None:
    d, docs, qa = arc_task
    tok = char_tokenizer()
    model = shared_model(pruned_plan(out_norm=True))
    res = evaluate_zeroshot(
        model, tok, ["toy_arc", "toy_sum:acc_norm"], batch_size=4, include_path=d, include_defaults=False
    )
    assert list(res.scores) == ["toy_arc", "toy_sum"]
    arc, total = res.scores["toy_arc"], res.scores["toy_sum"]
    assert (arc.metric, arc.samples, total.metric, total.samples) == ("acc", 16, "acc_norm", 9)
    arc_items = [
        (f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"], "ABCD".index(doc["answerKey"]))
        for doc in docs
    ]
    acc, acc_norm = _direct_scores(model, tok, arc_items)
    got = res.extra["metrics"]["toy_arc"]
    assert got["acc,none"] == pytest.approx(acc) and got["acc_norm,none"] == pytest.approx(acc_norm)
    assert arc.value == pytest.approx(acc)
    _, sum_norm = _direct_scores(model, tok, [(q["query"], q["choices"], q["label"]) for q in qa])
    assert total.value == pytest.approx(sum_norm)
    assert res.mean == pytest.approx((acc + sum_norm) / 2)
    assert arc.stderr is not None and arc.stderr > 0
    # the materialised model (output norms kept in memory) answers the same
    again = evaluate_zeroshot(
        materialize(model, keep_output_norm=True), tok, {"toy_arc": "acc"}, batch_size=3, include_path=d,
        include_defaults=False,
    )  # fmt: skip
    assert again.scores["toy_arc"].value == pytest.approx(acc)
    assert "toy_arc" in res.summary() and "mean" in res.summary()
    assert ZeroShotResult.from_dict(json.loads(json.dumps(res.to_dict()))) == res


def test_limit_counts_documents(arc_task, caplog) -> None:
    d, _, _ = arc_task
    caplog.set_level("WARNING", logger="lm_eval")
    res = evaluate_zeroshot(
        shared_model(pruned_plan()),
        char_tokenizer(),
        ["toy_sum"],
        limit=4,
        include_path=d,
        include_defaults=False,
    )
    assert res.scores["toy_sum"].samples == 4 and res.limit == 4
    # lm-eval's warning about a model object (whose loading arguments do not apply) is not shown
    assert not [r for r in caplog.records if "model kwarg is not of type" in r.getMessage()]


def test_parse_tasks_uses_the_papers_metrics() -> None:
    assert parse_tasks(None) == PAPER_TASKS
    assert list(PAPER_TASKS) == ["arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag"]
    assert parse_tasks(["piqa", "winogrande", "mine", "other:acc_norm"]) == {
        "piqa": "acc_norm",
        "winogrande": "acc",
        "mine": "acc",
        "other": "acc_norm",
    }
    with pytest.raises(ZeroShotError, match="empty"):
        parse_tasks([])
    with pytest.raises(ZeroShotError, match="no task name"):
        parse_tasks([":acc"])


def test_unknown_tasks_and_metrics_are_refused(arc_task) -> None:
    d, _, _ = arc_task
    tm = get_task_manager(d, include_defaults=False)
    assert get_task_manager(d, include_defaults=False) is tm, "task managers are built once"
    with pytest.raises(ZeroShotError, match=r"unknown lm-eval task 'toy_ark'.*did you mean \['toy_arc'\]"):
        check_tasks(tm, {"toy_ark": "acc"})
    with pytest.raises(ZeroShotError, match=r"does not report metric 'f1'; allowed: \['acc', 'acc_norm'\]"):
        check_tasks(tm, {"toy_arc": "f1"})
    with pytest.raises(ValueError, match=r"docs\[0\].label=5"):
        write_choice_task(d, "bad", [{"query": "q", "choices": ["a"], "label": 5}])


def test_builtin_paper_tasks_report_the_papers_metric() -> None:
    """Indexes lm-eval's own YAMLs of the five tasks (only their folders: the full registry takes
    seconds to index; no dataset is downloaded)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    tm = get_task_manager(
        [root / d for d in ("arc", "piqa", "winogrande", "hellaswag")], include_defaults=False
    )
    for task, metric in PAPER_TASKS.items():
        assert task in tm.task_index, task
        assert metric in task_metrics(tm, task), (task, task_metrics(tm, task))
    assert "acc_norm" not in task_metrics(tm, "winogrande")  # why WinoGrande uses acc
