"""The evaluation report: slot maps and stored parameters from real plans, the markdown table, the
plots (from the prune command's real JSON files and real TensorBoard logs), bad inputs, and the
``flexigpt-eval`` command end to end (offline: a local text file and a local lm-eval task)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from flexigpt.shared.engine.apply import apply_plan, stored_param_count
from flexigpt.shared.engine.checkpoint import load_model, save_compact
from flexigpt.shared.engine.plan import Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model
from flexigpt.shared.evaluate.cli import load_config, main
from flexigpt.shared.evaluate.perplexity import encode_documents, file_documents, perplexity
from flexigpt.shared.evaluate.plots import plot_loss_curves
from flexigpt.shared.evaluate.report import (
    ReportError,
    Variant,
    describe_model,
    markdown_table,
    read_report,
    read_scalars,
    slot_map_text,
    write_report,
)
from flexigpt.shared.evaluate.zeroshot import TaskScore, ZeroShotResult, write_choice_task

from .evalkit import char_tokenizer, grown_plan, pruned_plan, random_tokens, shared_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _models() -> dict:
    shortgpt = Plan("llama", 4, (SlotSpec(0), SlotSpec(1), SlotSpec(3)))
    return {
        "base": tiny_model("llama2", num_layers=4),
        "FlexiGPT": shared_model(pruned_plan(out_norm=True)),
        "ShortGPT": apply_plan(tiny_model("llama2", num_layers=4), shortgpt).eval(),
        "grown": shared_model(grown_plan()),
    }


@pytest.fixture(scope="module")
def variants() -> list[Variant]:
    ids = random_tokens(300, seed=3)
    out = []
    for name, model in _models().items():
        stored, slots, n_src, plan = describe_model(model)
        ppl = perplexity(model, ids, context_len=64, stride=32, progress=False)
        out.append(Variant(name, None, stored, slots, n_src, perplexity=ppl, plan=plan))
    return out


def test_slot_maps_and_stored_parameters_follow_the_plans(variants) -> None:
    by = {v.name: v for v in variants}
    assert slot_map_text(by["base"].slots) == "0 1 2 3"
    assert slot_map_text(by["FlexiGPT"].slots) == "0 1* 1*+ 3"
    assert slot_map_text(by["ShortGPT"].slots) == "0 1 3"
    assert slot_map_text(by["grown"].slots) == "0 1* 2* 1*+ 2*+ 3"
    assert by["base"].plan is None and by["FlexiGPT"].plan["slots"][2]["adapter"]["svd_from"] == 2
    assert (by["FlexiGPT"].removed_blocks, by["ShortGPT"].removed_blocks, by["grown"].removed_blocks) == (
        [2],
        [2],
        [],
    )
    models = _models()
    for v in variants:
        assert v.stored_params == stored_param_count(models[v.name])
    base = by["base"].stored_params
    block = sum(p.numel() for p in models["base"].model.layers[2].parameters())
    assert by["ShortGPT"].stored_params == base - block
    # FlexiGPT stores ShortGPT plus the replacement slot's adapters, private norms and output norms
    extra = sum(
        p.numel()
        for n, p in models["FlexiGPT"].model.layers[2].named_parameters()
        if "lora_" in n or "norm" in n
    )
    assert by["FlexiGPT"].stored_params == by["ShortGPT"].stored_params + extra


def test_markdown_table_compares_variants(variants) -> None:
    zs = ZeroShotResult(
        {
            "arc_easy": TaskScore("arc_easy", "acc_norm", 0.5, 0.1, 10),
            "winogrande": TaskScore("winogrande", "acc", 0.25, 0.1, 8),
        },
        mean=0.375,
    )
    rows = [Variant(**{**vars(v), "zeroshot": zs if v.name == "FlexiGPT" else None}) for v in variants]
    table = markdown_table(rows).splitlines()
    assert (
        table[0]
        == "| Variant | Slots | Blocks stored | Stored params | vs first | PPL | ARC-e | WinoG. | Average |"
    )
    flexi = next(line for line in table if line.startswith("| FlexiGPT"))
    cells = [c.strip() for c in flexi.strip("|").split("|")]
    v = rows[1]
    assert cells[:5] == [
        "FlexiGPT",
        "4",
        "3",
        f"{v.stored_params:,}",
        f"{100 * v.stored_params / rows[0].stored_params:.1f}%",
    ]
    assert cells[5] == f"{v.perplexity.ppl:.2f}" and cells[6:] == ["50.00", "25.00", "37.50"]
    assert table[2].split("|")[7].strip() == "n/a"  # base has no zero-shot run


def _importance_and_selection(tmp_path: Path) -> tuple[Path, Path]:
    """The prune command's own result files for the tiny base model (removing block 2)."""
    importance = pytest.importorskip("flexigpt.prune.depth.importance")
    selection = pytest.importorskip("flexigpt.prune.depth.selection")
    model = tiny_model("llama2", num_layers=4)
    imp = importance.compute_importance(
        model, [random_tokens(64, seed=s)[None] for s in range(3)], progress=False
    )
    imp.save(tmp_path / "importance.json")
    sel = selection.select_bases(
        selection.source_from_model(model), [2], rank=4, all_pairs=True, progress=False
    )
    sel.save(tmp_path / "selection.json")
    return tmp_path / "importance.json", tmp_path / "selection.json"


def _tensorboard(logdir: Path, losses: list[float], start: int = 0, tag: str = "train/loss") -> None:
    w = SummaryWriter(str(logdir))
    for i, loss in enumerate(losses):
        w.add_scalar(tag, loss, start + i)
    w.close()


def test_write_report_with_every_plot(variants, tmp_path) -> None:
    imp, sel = _importance_and_selection(tmp_path)
    _tensorboard(tmp_path / "run_a" / "tb", [4.0, 3.0, 2.5])
    _tensorboard(tmp_path / "run_b" / "tb", [4.2, 3.5])
    out = tmp_path / "report"
    rep = write_report(
        variants,
        out,
        importance=imp,
        selection=sel,
        tensorboard={"FlexiGPT": tmp_path / "run_a", "grown": tmp_path / "run_b"},
    )
    names = {"slot_map.png", "block_influence.png", "base_selection.png", "loss_curves.png"}
    assert set(rep["plots"].values()) == names
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
    md = (out / "report.md").read_text()
    assert "`0 1* 1*+ 3`" in md and "removed [2]" in md and "![loss curves](loss_curves.png)" in md
    assert "context_len 64, stride 32" in md
    assert "loss curves: tag 'eval/loss' is in no TensorBoard log" in md
    again = read_report(out / "report.json")
    assert [v.to_dict() for v in again] == [v.to_dict() for v in variants]


def test_tensorboard_scalars_merge_resumed_runs_and_name_missing_tags(tmp_path) -> None:
    _tensorboard(tmp_path / "tb", [5.0, 4.0, 3.0])
    _tensorboard(tmp_path / "tb", [2.9, 2.0], start=2)  # a resumed run: a second event file
    _tensorboard(tmp_path / "tb", [9.0], tag="train/lr")
    pts = read_scalars(tmp_path / "tb")
    assert pts["train/loss"] == [(0, 5.0), (1, 4.0), (2, pytest.approx(2.9)), (3, 2.0)]
    with pytest.raises(ReportError, match=r"none of \['eval/los'\].*present: \['train/loss', 'train/lr'\]"):
        plot_loss_curves({"a": tmp_path / "tb"}, tmp_path / "x.png", ["eval/los"])
    with pytest.raises(ReportError, match="no event files"):
        read_scalars(tmp_path / "nothing")


def test_bad_inputs_are_named(variants, tmp_path) -> None:
    (tmp_path / "imp.json").write_text(json.dumps({"format": "flexigpt-selection/1", "scores": [1.0]}))
    with pytest.raises(ReportError, match="format='flexigpt-selection/1', expected 'flexigpt-importance/1'"):
        write_report(variants, tmp_path / "r", importance=tmp_path / "imp.json")
    (tmp_path / "sel.json").write_text(
        json.dumps({"format": "flexigpt-selection/1", "distances": [[0, 1]], "picks": {}})
    )
    with pytest.raises(ReportError, match="square"):
        write_report(variants, tmp_path / "r", selection=tmp_path / "sel.json")
    with pytest.raises(ReportError, match="unique"):
        write_report([variants[0], variants[0]], tmp_path / "r")
    with pytest.raises(ReportError, match="at least one"):
        write_report([], tmp_path / "r")


def test_eval_command_end_to_end_and_resume(tmp_path, capsys) -> None:
    tok = char_tokenizer()
    base = tiny_model("llama2", num_layers=4)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    save_compact(shared_model(pruned_plan(out_norm=True)), tmp_path / "flexi", tokenizer=tok)
    text = tmp_path / "heldout.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 12)
    qa = [
        {"query": f"{i} + 1 =", "choices": [str(i + 1), str(i + 2) + "?"], "label": i % 2} for i in range(6)
    ]
    write_choice_task(tmp_path / "tasks", "toy_sum", qa)
    _tensorboard(tmp_path / "flexi_run" / "tb", [3.0, 2.0])
    imp, sel = _importance_and_selection(tmp_path)
    args = [
        f"models.base={tmp_path / 'base'}",
        f"models.flexigpt={tmp_path / 'flexi'}",
        f"output_dir={tmp_path / 'eval'}",
        f"perplexity.files=[{text}]",
        "perplexity.context_len=128",
        "perplexity.stride=64",
        "zeroshot.tasks=[toy_sum:acc_norm]",
        f"zeroshot.include_path=[{tmp_path / 'tasks'}]",
        "zeroshot.include_defaults=false",
        f"report.tensorboard.flexigpt={tmp_path / 'flexi_run'}",
        "report.loss_tags=[train/loss]",
        f"report.importance={imp}",
        f"report.selection={sel}",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "reusing" not in first and "| flexigpt | 4 | 3 |" in first
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert [v["name"] for v in rep["variants"]] == ["base", "flexigpt"]
    assert len(rep["plots"]) == 4
    ids = encode_documents(file_documents(str(text)), tok)
    for v in rep["variants"]:
        model = load_model(v["path"], dtype=torch.float32)
        want = perplexity(model, ids, context_len=128, stride=64, batch_size=4, progress=False)
        assert v["perplexity"]["ppl"] == pytest.approx(want.ppl, rel=1e-6)
        assert v["perplexity"]["tokens"] == len(ids) - 1 and math.isfinite(v["perplexity"]["ppl"])
        assert v["zeroshot"]["scores"]["toy_sum"]["samples"] == 6
    # a second run reuses both variants; a changed setting recomputes them
    assert main(args) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    assert main([*args, "perplexity.stride=32"]) == 0
    assert "reusing" not in capsys.readouterr().out
    assert (
        json.loads((tmp_path / "eval" / "report.json").read_text())["variants"][0]["perplexity"]["stride"]
        == 32
    )


def test_eval_config_errors_name_the_key(tmp_path, capsys) -> None:
    assert main(["models.a=x", f"output_dir={tmp_path}", "perplexity.strid=3"]) == 2
    assert "unknown key 'perplexity.strid'; did you mean 'stride' or 'stream'?" in capsys.readouterr().err
    with pytest.raises(ValueError, match="report.tensorboard"):
        load_config(None, ["models.a=x", f"output_dir={tmp_path}", "report.tensorboard.b=y"])
    with pytest.raises(ValueError, match="set exactly one of files / stream"):
        load_config(None, ["models.a=x", f"output_dir={tmp_path}", "perplexity.context_len=8"])
    cfg = load_config(None, ["models.a=x", f"output_dir={tmp_path}", "zeroshot=null"])
    assert cfg.zeroshot is None and cfg.perplexity is None
    tiny_model("llama2", num_layers=2).save_pretrained(tmp_path / "no_tok")
    assert (
        main([f"models.base={tmp_path / 'no_tok'}", f"output_dir={tmp_path / 'out'}", "zeroshot=null"]) == 2
    )
    assert "models.base: cannot load a tokenizer from" in capsys.readouterr().err
