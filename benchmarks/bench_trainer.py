"""Trainer throughput: the DeepSpeed trainer's step vs a plain PyTorch loop on the same model and data.

Both sides train a copy of the same small shared-block LLaMA (4 blocks run by 6 slots, rank-8
adapters) on the same packed WikiText-2 batches (``PackedLoader``, so data time is in both), with
the same AdamW, warm-up + cosine schedule and gradient clipping, fp32, the same thread count.
Side A is the trainer's own step (``trainer._Loop.train_step``: DeepSpeed engine forward /
backward / step per micro-batch plus the per-step collective); side B is a hand-written loop.
Chunks of steps alternate A B A B after a warm-up; the figure is the median ratio of tokens/s.
Both sides must reach the same losses (checked).

``--options`` times the trainer's step against itself instead: its default (``optimizer_impl:
auto``, eager) against ``optimizer_impl: fused``, ``compile: true`` and both, each a DeepSpeed
engine over its own copy of the model on the same batches, in rounds that rotate their order after
a warm-up (which includes compilation). The figures are the median ratios of tokens/s to the
default's in the same round; every variant must reach the default's losses (checked).

    python benchmarks/bench_trainer.py [--stage 2] [--trainable all] [--pairs 7] [--steps 6] [--options]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "wikitext-2"


def _workspace(d: Path, vocab: int) -> tuple[Path, Path]:
    """A BPE tokenizer trained on WikiText-2 valid, and WikiText-2 test as SlimPajama-schema jsonl."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (WIKI / "valid.txt").read_text()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator(text.split("\n"), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(d / "tok")
    docs = [p for p in (WIKI / "test.txt").read_text().split("\n \n") if p.strip()]
    (d / "corpus").mkdir()
    with open(d / "corpus" / "wiki.jsonl", "w") as f:
        for p in docs:
            f.write(json.dumps({"text": p, "meta": {"redpajama_set_name": "RedPajamaWikipedia"}}) + "\n")
    return d / "tok", d / "corpus" / "wiki.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="2", choices=["1", "2", "3"])
    ap.add_argument(
        "--ds-config", default=None, help="a DeepSpeed config instead of ds_configs/zero<stage>.json"
    )
    ap.add_argument("--trainable", default="all", choices=["adapters", "adapters+norms", "all"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per timed chunk")
    ap.add_argument(
        "--options",
        action="store_true",
        help="time train.optimizer_impl=fused and train.compile=true against the trainer's default",
    )
    args = ap.parse_args()
    if not WIKI.is_dir():
        print(f"skipped: WikiText-2 not found at {WIKI}")
        return

    import deepspeed
    import torch
    from transformers import AutoTokenizer

    from flexigpt.shared.engine.apply import apply_plan, set_trainable
    from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
    from flexigpt.shared.engine.tiny import tiny_model
    from flexigpt.shared.recipe import recipe_from_dict
    from flexigpt.shared.train.components import (
        build_optimizer,
        build_scheduler,
        flops_per_token,
        init_distributed,
        launcher_env,
    )
    from flexigpt.shared.train.data import PackedLoader
    from flexigpt.shared.train.ds_config import build_ds_config, load_ds_config
    from flexigpt.shared.train.speed import prepare_model
    from flexigpt.shared.train.trainer import _Loop

    tmp = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    vocab = 512
    tok_dir, corpus = _workspace(tmp, vocab)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    total = 1000
    recipe = recipe_from_dict(
        {
            "kind": "train",
            "model": {"source": "(in memory)"},
            "data": {"source": "files", "files": [str(corpus)], "seq_len": args.seq_len, "shuffle_buffer": 64},
            "train": {"trainable": args.trainable, "ds_config": args.ds_config or f"ds_configs/zero{args.stage}.json", "micro_batch": args.micro,
                      "grad_accum": args.accum, "lr": 1e-3, "warmup_steps": 5, "max_steps": total, "export": "none"},
            "output_dir": str(tmp / "out"),
        }
    )  # fmt: skip
    t = recipe.train
    rank, world, _, device = init_distributed(False)
    torch.manual_seed(0)
    plan = Plan("llama", 4, tuple([SlotSpec(block=i) for i in range(4)] + [SlotSpec(block=b, adapter=AdapterSpec(rank=8), out_norm=OutNormSpec(0.1)) for b in (1, 2)]))  # fmt: skip
    model = apply_plan(
        tiny_model(
            "llama2", num_layers=4, hidden=args.hidden, heads=4, vocab=vocab, max_positions=args.seq_len
        ),
        plan,
    )
    model.config.use_cache = False
    n_train = set_trainable(model, args.trainable)
    plain = copy.deepcopy(model).train()  # deepcopy keeps the sharing (same Parameter in both slots)
    cfg = build_ds_config(load_ds_config(t.ds_config), t, world_size=world, precision="fp32")
    fpt = flops_per_token(model, args.seq_len)

    def trainer_loop(m: torch.nn.Module, tv: Any) -> tuple[Any, Any]:
        """The trainer's step loop over model `m` with train section `tv`, and its data loader."""
        prepare_model(m, tv, int(args.stage))  # as the trainer: checkpointing, compilation
        opt = build_optimizer(m, tv, device)
        with launcher_env():  # DeepSpeed reads LOCAL_RANK while it builds the engine
            eng, _, _, _ = deepspeed.initialize(
                model=m, optimizer=opt, lr_scheduler=build_scheduler(opt, tv, total), config=cfg
            )
        ld = PackedLoader(recipe.data, tokenizer, rank=rank, world_size=world, micro_batch=args.micro)
        lp = _Loop(recipe, eng, ld, [], rank=rank, world=world, device=device, plan_json=plan.to_json(), stage=int(args.stage),
                   total_steps=total, accum=args.accum, global_batch=args.micro * args.accum * world,
                   flops_per_token=fpt, peak=None, n_trainable=n_train)  # fmt: skip
        eng.train()
        return lp, ld

    if args.options:
        _time_options(args, model, t, trainer_loop, world, n_train)
        return
    loop, loader_a = trainer_loop(model, t)

    opt_b = build_optimizer(plain, t)
    sched_b = build_scheduler(opt_b, t, total)
    loader_b = PackedLoader(recipe.data, tokenizer, rank=rank, world_size=world, micro_batch=args.micro)
    params_b = [p for p in plain.parameters() if p.requires_grad]

    def plain_step() -> float:
        loss_sum = 0.0
        for _ in range(args.accum):
            batch = loader_b.next_batch()
            loss = plain(input_ids=batch, labels=batch).loss
            (loss / args.accum).backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(params_b, t.grad_clip)
        opt_b.step()
        sched_b.step()
        opt_b.zero_grad(set_to_none=True)
        return loss_sum / args.accum

    losses_a: list[float] = []
    losses_b: list[float] = []

    def chunk_a(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            losses_a.append(float(loop.train_step(len(losses_a) + 1)[0]) / world)
        return time.perf_counter() - t0

    def chunk_b(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            losses_b.append(plain_step())
        return time.perf_counter() - t0

    chunk_a(3), chunk_b(3)  # warm-up
    tokens = args.steps * args.micro * args.accum * args.seq_len * world
    ratios, tps_a, tps_b = [], [], []
    for i in range(args.pairs):
        if i % 2 == 0:
            ta, tb = chunk_a(args.steps), chunk_b(args.steps)
        else:
            tb, ta = chunk_b(args.steps), chunk_a(args.steps)
        tps_a.append(tokens / ta)
        tps_b.append(tokens / tb)
        ratios.append((tokens / ta) / (tokens / tb))
    loader_a.close(), loader_b.close()
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses_a, losses_b, strict=True))
    assert worst < 1e-3, f"the two sides diverged: max relative loss difference {worst:.2e}"
    n_params = sum(p.numel() for p in plain.parameters())
    print(f"model: {n_params:,} stored parameters ({n_train:,} trainable, rule {args.trainable}), 6 slots over 4 blocks, "
          f"hidden {args.hidden}, seq {args.seq_len}, micro {args.micro} x accum {args.accum}, fp32, "
          f"{torch.get_num_threads()} threads, ZeRO-{args.stage}, {len(losses_a)} steps per side, "
          f"losses agree to {worst:.1e} (relative)")  # fmt: skip
    print(f"trainer tokens/s: median {statistics.median(tps_a):,.0f} (range {min(tps_a):,.0f}-{max(tps_a):,.0f}); "
          f"plain loop: median {statistics.median(tps_b):,.0f} (range {min(tps_b):,.0f}-{max(tps_b):,.0f})")  # fmt: skip
    print(f"trainer/plain tokens/s: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}, {args.pairs} pairs of {args.steps} steps); target >= 0.90")  # fmt: skip
    sys.stdout.flush()


# the trainer's speed options against its default (train.optimizer_impl: auto, eager)
VARIANTS = {
    "default": {},
    "fused": {"optimizer_impl": "fused"},
    "compile": {"compile": True},
    "fused+compile": {"optimizer_impl": "fused", "compile": True},
}


def _time_options(args: Any, model: Any, t: Any, trainer_loop: Any, world: int, n_train: int) -> None:
    """``--options``: the trainer's step with each of ``VARIANTS``, in rotating rounds (ratios to default)."""
    import torch

    loops, losses = {}, {}
    for name, kw in VARIANTS.items():
        # each engine trains its own copy (deepcopy keeps the sharing); the copies start equal
        loops[name] = trainer_loop(copy.deepcopy(model), t.model_copy(update=kw))
        losses[name] = []

    def chunk(name: str, n: int) -> float:
        loop, out = loops[name][0], losses[name]
        t0 = time.perf_counter()
        for _ in range(n):
            out.append(float(loop.train_step(len(out) + 1)[0]) / world)
        return time.perf_counter() - t0

    warm = {name: chunk(name, 3) for name in VARIANTS}  # compilation happens here
    tokens = args.steps * args.micro * args.accum * args.seq_len * world
    names = list(VARIANTS)
    tps: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
    for i in range(args.pairs):
        order = names[i % len(names) :] + names[: i % len(names)]
        took = {name: chunk(name, args.steps) for name in order}
        for name in names:
            tps[name].append(tokens / took[name])
        for name in names[1:]:
            ratios[name].append(tps[name][-1] / tps["default"][-1])
    for _, ld in loops.values():
        ld.close()
    ref = losses["default"]
    worst = {n: max(abs(a - b) / abs(b) for a, b in zip(losses[n], ref, strict=True)) for n in names[1:]}
    assert max(worst.values()) < 1e-3, f"a variant left the default's losses: {worst}"
    print(f"model: {sum(p.numel() for p in model.parameters()):,} stored parameters ({n_train:,} trainable, rule "
          f"{args.trainable}), 6 slots over 4 blocks, hidden {args.hidden}, seq {args.seq_len}, micro {args.micro} x "
          f"accum {args.accum}, fp32, {torch.get_num_threads()} threads, ZeRO-{args.stage}, {len(ref)} steps per variant; "
          f"torch {torch.__version__}")  # fmt: skip
    print("warm-up (3 steps, includes compilation): " + ", ".join(f"{n} {s:.1f} s" for n, s in warm.items()))
    for name in names:
        med = statistics.median(tps[name])
        print(f"{name}: tokens/s median {med:,.0f} (range {min(tps[name]):,.0f}-{max(tps[name]):,.0f})")
    for name in names[1:]:
        r = ratios[name]
        print(f"{name}/default tokens/s: median {statistics.median(r):.3f} (range {min(r):.3f}-{max(r):.3f}, "
              f"{args.pairs} rounds of {args.steps} steps); losses agree to {worst[name]:.1e} (relative)")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
