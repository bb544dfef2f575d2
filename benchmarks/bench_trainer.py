"""Trainer throughput: the DeepSpeed trainer's step vs a plain PyTorch loop on the same model and data.

Both sides train a copy of the same small shared-block LLaMA (4 blocks run by 6 slots, rank-8
adapters) on the same packed WikiText-2 batches (``PackedLoader``, so data time is in both), with
the same AdamW, warm-up + cosine schedule and gradient clipping, fp32, the same thread count.
Side A is the trainer's own step (``trainer._Loop.train_step``: DeepSpeed engine forward /
backward / step per micro-batch plus the per-step collective); side B is a hand-written loop.
Chunks of steps alternate A B A B after a warm-up; the figure is the median ratio of tokens/s.
Both sides must reach the same losses (checked).

    python benchmarks/bench_trainer.py [--stage 2] [--trainable all] [--pairs 7] [--steps 6]
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
    opt_a = build_optimizer(model, t)
    with launcher_env():  # DeepSpeed reads LOCAL_RANK while it builds the engine
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=opt_a, lr_scheduler=build_scheduler(opt_a, t, total), config=cfg
        )
    loader_a = PackedLoader(recipe.data, tokenizer, rank=rank, world_size=world, micro_batch=args.micro)
    loop = _Loop(recipe, engine, loader_a, [], rank=rank, world=world, device=device, plan_json=plan.to_json(), stage=int(args.stage),
                 total_steps=total, accum=args.accum, global_batch=args.micro * args.accum * world,
                 flops_per_token=flops_per_token(model, args.seq_len), peak=None, n_trainable=n_train)  # fmt: skip
    engine.train()

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


if __name__ == "__main__":
    main()
