"""The DeepSpeed trainer in one process (gloo on CPU): ZeRO-2/3 training of a shared-block model,
shared-parameter gradients under ZeRO-3, checkpoint fallback and resume rules, export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flexigpt.shared.engine.plan import AdapterSpec, Plan, SlotSpec
from flexigpt.shared.recipe import recipe_from_dict
from flexigpt.shared.train.export import consolidated_state_dict, export_checkpoint
from flexigpt.shared.train.state import ResumeError, list_checkpoints
from flexigpt.shared.train.trainer import train

from .trainkit import recipe_dict, workspace

pytestmark = pytest.mark.deepspeed
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture(autouse=True)
def _no_leaked_launcher_env():
    """A one-rank group started in this process must not leave launcher variables behind: a
    subprocess started later would take itself for rank 0 of this group and bind its port."""
    before = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    assert {k: os.environ.get(k) for k in DIST_ENV} == before


def _scalars(tb: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(tb)).Reload().Scalars(tag)]


def _run(ws: dict[str, Path], out: Path, resume: str = "auto", **train_kw):
    return train(recipe_from_dict(recipe_dict(ws, out, **train_kw)), resume=resume)


@pytest.mark.parametrize("stage", ["2", "3"])
def test_zero_trains_a_shared_block_model_and_the_loss_falls(stage: str, ws, tmp_path: Path) -> None:
    d = recipe_dict(
        ws,
        tmp_path,
        ds_config=f"ds_configs/zero{stage}.json",
        trainable="all",
        lr=3e-3,
        max_steps=16,
        log_every=1,
        export="compact",
    )
    d["data"]["eval"] = {"source": "files", "files": [str(ws["heldout"] / "*")], "batches": 2}
    d["train"]["eval_every"] = 8
    res = train(recipe_from_dict(d))
    loss = _scalars(tmp_path / "tb", "train/loss")
    assert len(loss) == 16 and sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.3, loss
    evals = _scalars(tmp_path / "tb", "eval/loss")
    assert len(evals) == 2 and evals[1] < evals[0]
    for tag in ("train/lr", "train/grad_norm", "train/tokens_seen", "perf/tokens_per_s"):
        assert len(_scalars(tmp_path / "tb", tag)) == 16, tag
    assert _scalars(tmp_path / "tb", "train/tokens_seen")[-1] == res.tokens_seen == 16 * 4 * 32
    # the exported compact model is the checkpoint's weights and loads through the Auto class
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(res.exported[0])
    assert final.plan.num_slots == 6
    state = consolidated_state_dict(res.checkpoint)
    for name, p in final.named_parameters():
        assert torch.equal(p.detach(), state[name]), name


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_zero_shared_parameters_get_the_gradients_of_every_slot(stage: str, ws) -> None:
    """Under ZeRO-1/2/3, a block run by two slots gets the sum of both slots' gradients, over two micro-batches.

    ZeRO-1/2 reduce a gradient in the hook of the Parameter's gradient accumulation, which the
    in-GEMM summation of shared linears (``engine.shared_grad``) must call once with the full sum;
    ZeRO-3 partitions the weights and takes plain linears.
    """
    import deepspeed

    from flexigpt.shared.engine.apply import canonical_name, materialize, set_trainable
    from flexigpt.shared.engine.shared_grad import SharedLinear, set_grad_accumulation
    from flexigpt.shared.recipe import TrainSection
    from flexigpt.shared.train.components import build_model, build_optimizer, init_distributed, launcher_env
    from flexigpt.shared.train.ds_config import build_ds_config, load_ds_config

    init_distributed(cpu_shm_comm=False)
    r = recipe_from_dict(recipe_dict(ws, Path("unused")))
    torch.manual_seed(0)
    model = build_model(r.model, torch.float32)
    set_trainable(model, "all")
    assert isinstance(model.model.layers[1].mlp.up_proj, SharedLinear)
    set_grad_accumulation(model, True)
    with torch.no_grad():  # non-zero adapters, so the slots' inputs differ from the dense model's at init
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    dense = materialize(model, keep_output_norm=True).train()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(4, 128, (2, 32), generator=gen) for _ in range(2)]
    for batch in batches:  # the loss of each micro-batch is divided by the accumulation steps
        (dense(input_ids=batch, labels=batch).loss / 2).backward()
    block1 = dict(model.model.layers[1].named_parameters())
    dense_grads = [
        {canonical_name(n): p.grad for n, p in dense.model.layers[i].named_parameters()} for i in (1, 4)
    ]
    want = {n: dense_grads[0][n] + dense_grads[1][n] for n in block1 if n.endswith("proj.weight")}
    assert len(want) == 7
    for n in want:  # both slots contribute: the sum differs from either slot's gradient alone
        assert not torch.allclose(want[n], dense_grads[0][n]) and not torch.allclose(
            want[n], dense_grads[1][n]
        )
    train_cfg = TrainSection(micro_batch=2, grad_accum=2, max_steps=1, grad_clip=0.0)
    cfg = build_ds_config(
        load_ds_config(f"ds_configs/zero{stage}.json"), train_cfg, world_size=1, precision="fp32"
    )
    shared = {n: block1[n] for n in want}
    with launcher_env():  # ZeRO-3 reads LOCAL_RANK in its step hooks too
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, train_cfg), config=cfg
        )
        for i, batch in enumerate(batches):
            engine.backward(engine(input_ids=batch, labels=batch).loss)
            if i < len(batches) - 1:
                engine.step()  # not a boundary: only counts the micro-step, as the trainer's loop does
        for name, p in shared.items():
            got = deepspeed.utils.safe_get_full_grad(p).reshape(want[name].shape)
            torch.testing.assert_close(got, want[name], rtol=1e-4, atol=1e-6, msg=name)
            assert got.abs().sum() > 0


@pytest.mark.parametrize("stage", ["2", "3"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(stage: str, ws, tmp_path: Path) -> None:
    kw = {"max_steps": 6, "checkpoint_every": 2, "keep_last": 3, "ds_config": f"ds_configs/zero{stage}.json"}
    ref = _run(ws, tmp_path / "ref", **kw)
    out = tmp_path / "run"
    _run(ws, out, **kw)
    steps = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert steps == ["step_00000006", "step_00000004", "step_00000002"]
    # corrupt the newest in place (same size: only the checksum notices) and truncate the next one
    newest, middle = list_checkpoints(out / "checkpoints")[:2]
    optim = next(newest.glob("*optim_states.pt"))
    data = bytearray(optim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    optim.write_bytes(bytes(data))
    model_states = next(middle.glob("*model_states.pt"))
    model_states.write_bytes(model_states.read_bytes()[:100])
    with pytest.warns(UserWarning, match="step_00000006 is incomplete or corrupt .*crc32"):
        res = _run(ws, out, **kw)
    assert res.step == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the scalars the first run logged after step 2 were purged; each step appears once
    logged = [e.step for e in EventAccumulator(str(out / "tb")).Reload().Scalars("train/loss")]
    assert logged == [2, 4, 6], logged
    # it resumed from step 2 and redid steps 3-6 exactly as the uninterrupted run did
    want, got = consolidated_state_dict(ref.checkpoint), consolidated_state_dict(res.checkpoint)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # the finished run started once more: nothing to train, its checkpoint is left as it is
    manifest = res.checkpoint / "manifest.json"
    mtime = manifest.stat().st_mtime_ns
    again = _run(ws, out, **kw)
    assert again.step == 6 and again.checkpoint == res.checkpoint and manifest.stat().st_mtime_ns == mtime


def test_resume_refuses_a_changed_plan_unless_asked(ws, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(ws, out, max_steps=2, checkpoint_every=2)
    before = consolidated_state_dict(out / "checkpoints" / "step_00000002")
    with pytest.raises(ResumeError, match="--resume never"):
        _run(ws, out, resume="never", max_steps=4)
    plan = Plan.load(ws["plan"])
    bigger = Plan("llama", 4, (*plan.slots, SlotSpec(block=3, adapter=AdapterSpec(rank=2))))
    bigger.save(tmp_path / "bigger.json")
    d = recipe_dict(ws, out, max_steps=2, checkpoint_every=2)
    d["model"]["plan"] = str(tmp_path / "bigger.json")
    with pytest.raises(ResumeError, match="another plan .* --allow-plan-change"):
        train(recipe_from_dict(d))
    res = train(recipe_from_dict(d), allow_plan_change=True)
    assert res.step == 2  # nothing left to train: the checkpoint is rewritten with the new plan
    after = consolidated_state_dict(res.checkpoint)
    lora = "model.layers.4.self_attn.q_proj.lora_B.default.weight"
    assert before[lora].abs().sum() > 0 and torch.equal(after[lora], before[lora])  # carried over
    new = "model.layers.6.self_attn.q_proj.lora_B.default.weight"
    assert new not in before and torch.equal(after[new], torch.zeros_like(after[new]))  # fresh slot


def test_export_from_a_checkpoint_without_an_engine(ws, tmp_path: Path) -> None:
    """CLI export (no DeepSpeed engine): compact and materialised models with the trained weights."""
    from transformers import AutoModelForCausalLM

    from flexigpt.shared.train.cli import main

    plain_plan = Plan(
        "llama",
        4,
        tuple(
            SlotSpec(block=b, adapter=AdapterSpec(rank=4) if i >= 4 else None)
            for i, b in enumerate([0, 1, 2, 3, 1, 2])
        ),
    )
    plain_plan.save(tmp_path / "plan.json")
    d = recipe_dict(ws, tmp_path / "run", max_steps=2, checkpoint_every=2, lr=0.05)
    d["model"]["plan"] = str(tmp_path / "plan.json")
    res = train(recipe_from_dict(d))
    assert (
        main(["export", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "exp"), "--materialize"]) == 0
    )
    compact = AutoModelForCausalLM.from_pretrained(tmp_path / "exp")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "exp_materialized")
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.num_hidden_layers == 6
    assert (
        compact.model.layers[1].self_attn.q_proj.weight
        is compact.model.layers[4].self_attn.q_proj.base_layer.weight
    )
    lora_b = compact.model.layers[4].self_attn.q_proj.lora_B.default.weight
    assert lora_b.abs().sum() > 0  # trained away from its zero init
    x = torch.arange(4, 36).view(1, 32)
    torch.testing.assert_close(compact(x).logits, plain(x).logits, rtol=1e-4, atol=1e-5)
    # the same as exporting by function, from the checkpoint directory itself
    (again,) = export_checkpoint(res.checkpoint, tmp_path / "exp2")
    twin = AutoModelForCausalLM.from_pretrained(again)
    for (n, p), (_, q) in zip(compact.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_the_in_gemm_gradient_sum_is_a_recipe_key(ws, tmp_path: Path) -> None:
    from flexigpt.shared.train.components import build_model

    recipe = recipe_from_dict(
        recipe_dict(
            ws, tmp_path / "run", trainable="all", max_steps=2, checkpoint_every=2, shared_grad_in_gemm=True
        )
    )
    model = build_model(recipe.model, torch.float32)
    q = model.model.layers[1].self_attn.q_proj
    before = q.weight.detach().clone()
    assert not q.grad_pass.enabled  # off unless the recipe asks
    res = train(recipe, model=model)
    assert q.grad_pass.enabled and res.step == 2 and torch.isfinite(torch.tensor(res.last_loss))
    assert not torch.equal(q.weight.detach(), before)  # the shared block trained


def test_trainable_layers_restrict_the_rule(ws) -> None:
    from flexigpt.shared.recipe import RecipeError
    from flexigpt.shared.train.components import build_model, make_trainable

    r = recipe_from_dict(recipe_dict(ws, Path("unused")))
    model = build_model(r.model, torch.float32)
    layers = model.model.layers
    count = make_trainable(model, "all", [4, 5])
    want = {id(p): p.numel() for i in (4, 5) for p in layers[i].parameters()}
    assert count == sum(want.values())
    assert layers[1].self_attn.q_proj.weight.requires_grad  # block 1 is run by slot 4 too
    assert (
        not layers[0].self_attn.q_proj.weight.requires_grad
        and not model.model.embed_tokens.weight.requires_grad
    )
    assert make_trainable(model, "adapters", None) == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n
    )
    with pytest.raises(RecipeError, match=r"trainable_layers: \[9\] out of range; the model has slots 0..5"):
        make_trainable(model, "all", [9])
    with pytest.raises(RecipeError, match="leaves no parameter to train"):
        make_trainable(model, "adapters", [0, 1])
    # reverse-order recovery: the last slots and the head (and final norm), nothing else of the top
    count = make_trainable(model, "all", [5], head=True)
    top = [model.lm_head.weight, model.model.norm.weight]
    assert all(p.requires_grad for p in top) and not model.model.embed_tokens.weight.requires_grad
    assert count == sum(p.numel() for p in layers[5].parameters()) + sum(p.numel() for p in top)
