"""DeepSpeed ZeRO continued pre-training of a (shared-block) model on a packed token stream.

``train(recipe)`` runs on every rank (launched by ``torchrun`` / ``deepspeed``, or as one plain
process). It builds the model and its trainable set from the recipe (or takes the model a grow or
prune command built), wraps it with ``deepspeed.initialize`` around a ``torch.optim.AdamW`` and a
warm-up + cosine schedule, and trains on ``PackedLoader`` micro-batches. Shared blocks are the
same Parameter objects in several slots, so autograd sums the gradients of every slot into one
``.grad`` before DeepSpeed reduces (ZeRO-1/2) or partitions (ZeRO-3) it.

Every `checkpoint_every` steps, at the end, and on SIGTERM / SIGINT the full state is written
(``train_state``); started again with the same recipe, the run continues from the newest valid
checkpoint and ends with the same weights as an uninterrupted run. TensorBoard scalars go to
``<output_dir>/tb``; a tqdm bar shows progress on rank 0.

A run never reports success on a broken model: it holds the lock of ``output_dir`` (one run per
directory), refuses checkpoints that all fail their checks and resumes that would change the
schedule or data order, stops on a non-finite loss, gradient norm or parameter without saving that
state, and names the path and OS error when a checkpoint cannot be written (``guards``).
"""

from __future__ import annotations

import gc
import json
import math
import random
import signal
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from flexigpt.shared.engine.shared_grad import set_grad_accumulation
from flexigpt.shared.files import write_text_atomic
from flexigpt.shared.recipe import BaseRecipe, RecipeError
from flexigpt.shared.runguard import stop_with_launcher
from flexigpt.shared.text import describe_stream, describe_text, resolve_text_rule
from flexigpt.shared.train.components import (
    DTYPES,
    PRECISION_DTYPE,
    Throughput,
    build_model,
    build_optimizer,
    build_scheduler,
    flops_per_token,
    init_distributed,
    launcher_env,
    load_tokenizer,
    lr_factor,
    make_trainable,
    peak_flops,
)
from flexigpt.shared.train.data import PackedLoader, eval_batches, fingerprint
from flexigpt.shared.train.ds_config import (
    BATCH_KEYS,
    build_ds_config,
    load_ds_config,
    resolve_precision,
    zero_stage,
)
from flexigpt.shared.train.export import ExportError, consolidated_state_dict, export_checkpoint, load_weights
from flexigpt.shared.train.guards import (
    TrainingDiverged,
    check_model_fits,
    check_model_paths,
    check_output_dir,
    checkpoint_bytes,
    divergence_advice,
    params_finite,
)
from flexigpt.shared.train.launch import rank0_step
from flexigpt.shared.train.resume import (
    check_schedule,
    load_or_refuse,
    none_usable,
    output_lock,
    resume_mode,
)
from flexigpt.shared.train.speed import prepare_model
from flexigpt.shared.train.state import (
    CheckpointInfo,
    ResumeError,
    _all_true,
    clean_partial,
    list_checkpoints,
    load_engine_state,
    load_rank_state,
    pick_checkpoint,
    save_checkpoint,
    set_aside,
)


@dataclass
class TrainResult:
    """What a call of ``train`` did."""

    output_dir: Path
    step: int
    tokens_seen: int
    last_loss: float | None = None
    eval_loss: float | None = None
    checkpoint: Path | None = None
    exported: list[Path] = field(default_factory=list)
    interrupted_by: int | None = None
    """The signal number that stopped the run early (after its checkpoint was written), else None."""


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag checked at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *_: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    recipe: BaseRecipe,
    *,
    model: PreTrainedModel | None = None,
    resume: str = "auto",
    allow_plan_change: bool = False,
    allow_world_size_change: bool = False,
    allow_schedule_change: bool = False,
) -> TrainResult:
    """Train `recipe` on every rank; resume, checkpoint, log, and export the final model.

    Args:
        recipe: any recipe kind (its ``model``, ``data``, ``train`` and ``output_dir`` are used).
        model: a ready shared-block model (from a grow / prune command); None builds it from the recipe.
            It must be built the same way on every rank and in every restart.
        resume: ``auto`` (newest valid checkpoint under ``output_dir/checkpoints`` if any), ``never``
            (refuse if checkpoints exist), ``restart`` (set existing checkpoints aside as
            ``.replaced-step_N`` and start at step 0), or the path of one checkpoint directory.
        allow_plan_change: resume from a checkpoint of another plan (weights whose names match).
        allow_world_size_change: resume from a checkpoint of another world size (weights only).
        allow_schedule_change: resume although a field that shapes the LR schedule or the data
            order changed (one line per field is printed); the data streams start again.

    Returns:
        A TrainResult; ``interrupted_by`` is set when a signal stopped the run after checkpointing.

    Raises:
        RecipeError: batch arithmetic, precision, trainable set, paths or output directory do not
            fit this machine / model.
        RunLockError: another run holds ``output_dir``.
        ResumeError: the checkpoint cannot be resumed into this run without an explicit allowance,
            or checkpoints exist and none is usable.
        TrainingError: the run diverged, or a checkpoint could not be written.
    """
    rank, world, _, device = init_distributed(recipe.train.cpu_shm_comm, recipe.train.dist_timeout_s)
    stop_with_launcher()
    allow = (allow_plan_change, allow_world_size_change, allow_schedule_change)
    # DeepSpeed reads LOCAL_RANK when it builds the engine; `lock` holds the run lock once taken
    with launcher_env(), ExitStack() as lock:
        return _train(recipe, model, resume, allow, rank, world, device, lock)


def _train(
    recipe: BaseRecipe,
    model: PreTrainedModel | None,
    resume: str,
    allow: tuple[bool, bool, bool],
    rank: int,
    world: int,
    device: torch.device,
    lock: ExitStack,
) -> TrainResult:
    allow_plan_change, allow_world_size_change, allow_schedule_change = allow
    t = recipe.train
    precision = resolve_precision(t.precision, device.type)
    ds_cfg = build_ds_config(
        load_ds_config(t.ds_config), t, world_size=world, precision=precision, where=t.ds_config
    )
    micro, accum, global_batch = (ds_cfg[k] for k in BATCH_KEYS)
    stage, seq_len = zero_stage(ds_cfg), recipe.data.seq_len
    total_steps = t.resolve_steps(global_batch, seq_len)
    out, ckpt_root = Path(recipe.output_dir), Path(recipe.output_dir) / "checkpoints"

    _seed(t.seed)  # identical on every rank: the model (and its adapter init) must be too
    if model is None:
        check_model_paths(recipe.model)
    tokenizer = load_or_refuse(
        load_tokenizer,
        recipe.model,
        "model.tokenizer" if recipe.model.tokenizer else "model.source",
        recipe.model.tokenizer or recipe.model.source,
    )
    text = resolve_text_rule(recipe.text, tokenizer)
    # the saved recipe (and every checkpoint's) records the rule as applied, not "follow the tokenizer"
    recipe = recipe.model_copy(update={"text": text.section()})
    dtype = DTYPES[PRECISION_DTYPE[precision] if recipe.model.dtype == "auto" else recipe.model.dtype]
    if model is None:
        model = load_or_refuse(build_model, recipe.model, "model.source", recipe.model.source, dtype)
    check_model_fits(model, tokenizer, seq_len)
    if getattr(model, "plan", None) is None:
        raise RecipeError(
            "train(model=...): the model has no plan; build it with flexigpt.shared.engine.apply.apply_plan"
        )
    if "materialized" in t.export and any(s.out_norm for s in model.plan.slots):
        raise RecipeError(
            "train.export: the plan has output norms, which a materialised plain model cannot hold; use 'compact'"
        )
    model.config.use_cache = False
    n_trainable = make_trainable(model, t.trainable, t.trainable_layers, t.trainable_head)
    set_grad_accumulation(model, t.shared_grad_in_gemm)
    plan_json = model.plan.to_json()
    fpt = flops_per_token(model, seq_len)
    prepare_model(model, t, stage)  # gradient checkpointing, compilation (before DeepSpeed wraps it)

    # -- which checkpoint, if any, and how much of it carries over ------------------------------
    # Everything above only read; from here on the run writes, so it holds output_dir alone.
    lock.enter_context(output_lock(out, rank))
    check_output_dir(out, checkpoint_bytes(model, n_trainable))  # the run lock created `out`
    clean_partial(ckpt_root)
    existing = list_checkpoints(ckpt_root)
    if resume == "never":
        if existing:
            raise ResumeError(
                f"--resume never, but {ckpt_root} holds checkpoints; use another output_dir or --resume auto"
            )
        candidates: list[CheckpointInfo] = []
    elif resume == "restart":
        moved = set_aside(existing, "replaced")
        if moved and rank == 0:
            print(f"--resume restart: {len(moved)} checkpoints set aside as {ckpt_root}/.replaced-step_*")
        candidates = []
    else:
        explicit = None if resume == "auto" else resume
        candidates = pick_checkpoint(ckpt_root, t.checkpoint_checksums, explicit=explicit)
        if existing and not candidates:
            raise none_usable(existing, "fail their checks")
    modes = [
        resume_mode(c, world, plan_json, stage, allow_plan_change, allow_world_size_change)
        for c in candidates[:1]
    ]
    chosen = candidates[0] if candidates else None
    changes = check_schedule(chosen, recipe, allow_schedule_change, rank) if chosen is not None else []
    if chosen is not None and modes[0] == "weights":
        missing = load_weights(model, consolidated_state_dict(chosen.path), strict=not allow_plan_change)
        if missing and rank == 0:
            print(
                f"resume from {chosen.path} (weights only): {len(missing)} parameters keep their initial values"
            )

    if rank == 0:
        write_text_atomic(out / "recipe.yaml", recipe.to_yaml())
        write_text_atomic(out / "plan.json", plan_json + "\n")
    import deepspeed

    optimizer = build_optimizer(model, t, device)
    scheduler = build_scheduler(optimizer, t, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg, dist_init_required=False
    )
    if chosen is not None and modes[0] == "full":
        while chosen is not None and not load_engine_state(engine, chosen):
            candidates = candidates[1:]
            chosen = candidates[0] if candidates else None
            if chosen is not None and resume_mode(chosen, world, plan_json, stage, False, False) != "full":
                raise ResumeError(
                    f"the newest loadable checkpoint {chosen.path} needs a weights-only resume; start that explicitly"
                )
            if chosen is not None:
                changes = check_schedule(chosen, recipe, allow_schedule_change, rank)
        if chosen is None:
            # the engine holds whatever a failed load left in it: stop rather than train from that
            raise none_usable(existing, "do not load")
    if chosen is not None:
        # checkpoints after the one resumed belong to a timeline that is being redone: keep them on
        # disk, but out of the way of resume and of keep-last rotation
        newer = [p for p in existing if int(p.name[5:]) > chosen.step]
        moved = set_aside(newer, "unused")
        if moved and rank == 0:
            warnings.warn(
                f"resuming from {chosen.path}: the newer checkpoints were set aside as {[str(m) for m in moved]}",
                stacklevel=2,
            )

    loader = PackedLoader(recipe.data, tokenizer, rank=rank, world_size=world, micro_batch=micro, text=text)
    step = tokens_seen = 0
    if chosen is None:
        _seed(t.seed + rank)
    else:
        step, tokens_seen = chosen.step, chosen.tokens_seen
        if modes[0] == "weights" or changes:
            scheduler.last_epoch = step
            scheduler.base_lrs = [t.lr for _ in scheduler.base_lrs]  # a changed train.lr applies from here
            for g, base in zip(engine.optimizer.param_groups, scheduler.base_lrs, strict=True):
                g["initial_lr"] = base
                g["lr"] = base * lr_factor(step, t.warmup_steps, total_steps, t.min_lr_ratio)
        if any(k.startswith("data.") for k, _, _ in changes):
            _seed(t.seed + rank + step)
            warnings.warn(
                "data settings changed: the data streams start again from their beginning", stacklevel=2
            )
        elif chosen.world_size == world:
            loader.load_state_dict(load_rank_state(chosen.path, rank))  # restores the RNG states too
        else:
            _seed(t.seed + rank + step)
            warnings.warn(
                "world size changed: the data streams start again from their beginning", stacklevel=2
            )
        if rank == 0:
            print(f"resumed from {chosen.path} at step {step} ({tokens_seen} tokens seen)")
    evals = (
        eval_batches(
            recipe.data.eval,
            tokenizer,
            seq_len=seq_len,
            rank=rank,
            world_size=world,
            micro_batch=micro,
            text=text,
        )
        if recipe.data.eval is not None
        else []
    )
    loop = _Loop(
        recipe,
        engine,
        loader,
        evals,
        precision=precision,
        rank=rank,
        world=world,
        device=device,
        plan_json=plan_json,
        stage=stage,
        total_steps=total_steps,
        accum=accum,
        global_batch=global_batch,
        flops_per_token=fpt,
        peak=peak_flops(t, device, precision),
        n_trainable=n_trainable,
        # the training eval's perplexity is not comparable to another without its text and windows
        eval_text=describe_text(describe_stream(recipe.data.eval), text, len(evals) * micro * seq_len * world)
        + f", disjoint windows of {seq_len}"
        if recipe.data.eval is not None
        else "",
    )
    try:
        # a checkpoint loaded whole already holds this step; one loaded as weights only does not
        have = chosen.path if chosen is not None and modes[0] == "full" else None
        result = loop.run(step, tokens_seen, have)
    finally:
        loader.close()
        loop.close()
        # the next train call in this process (the prune command's next variant) must not find this
        # engine's master weights, gradients and optimizer state still resident
        _release(engine)
        del engine, loop, optimizer, scheduler
        gc.collect()
    finished = result.step >= total_steps  # not a run stopped at train.stop_at_step
    if finished and result.interrupted_by is None and t.export != "none" and result.checkpoint is not None:
        # rank 0 alone exports (minutes for a large model): the others wait outside any collective
        exported = rank0_step(
            "the final export",
            lambda: export_checkpoint(
                result.checkpoint,
                out / "final",
                materialize=t.export == "compact+materialized",
                dtype=str(dtype).split(".")[-1],
            ),
            ExportError,
            t.rank0_wait_s,
        )
        result.exported = exported or []
    return result


def _release(engine: Any) -> None:
    """Drop what a finished engine holds: its hooks (``destroy``), optimizer state and module."""
    engine.destroy()
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "state"):
        optimizer.state.clear()
    engine.optimizer = engine.lr_scheduler = None


class _Loop:
    """The step loop with its logging, evaluation and checkpointing (state kept between steps)."""

    def __init__(
        self, recipe: BaseRecipe, engine: Any, loader: PackedLoader, evals: list[torch.Tensor], **kw: Any
    ) -> None:
        self.recipe, self.t, self.engine, self.loader, self.evals = (
            recipe,
            recipe.train,
            engine,
            loader,
            evals,
        )
        self.eval_text = "the held-out stream"  # what evaluations are measured on, in words
        for k, v in kw.items():
            setattr(self, k, v)
        self.out = Path(recipe.output_dir)
        self.last_saved: Path | None = None
        self.bad_steps = 0
        self.writer = None
        self.trace = None
        if recipe.data.trace:
            self.trace = open(self.out / f"data_trace.rank{self.rank}.jsonl", "a")  # noqa: SIM115 (closed in close())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.trace is not None:
            self.trace.close()

    def run(self, step: int, tokens_seen: int, checkpoint: Path | None = None) -> TrainResult:
        """Train from `step` to the end; `checkpoint` is the complete checkpoint of `step`, if any."""
        t, engine = self.t, self.engine
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the scalars a killed run logged after its last checkpoint (step
            # `step` itself was logged before that checkpoint and stays)
            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=step + 1 if step else None)
            print(
                f"training {self.n_trainable:,} parameters, steps {step} -> {self.total_steps}, "
                f"global batch {self.global_batch} x {self.recipe.data.seq_len} tokens, world size {self.world}"
            )
        result = TrainResult(self.out, step, tokens_seen)
        self.last_saved = checkpoint
        bar = tqdm(
            total=self.total_steps, initial=step, disable=self.rank != 0, desc="train", dynamic_ncols=True
        )
        window = Throughput()  # tokens/s of training steps: evaluations and checkpoints are paused out
        saved_at = step if checkpoint is not None else None
        result.checkpoint = checkpoint
        self.bad_steps = 0
        engine.train()
        end = min(self.total_steps, t.stop_at_step or self.total_steps)
        with _StopRequest() as stop:
            while step < end:
                flags = self.train_step(step + 1, stop)
                step += 1
                tokens_seen += self.global_batch * self.recipe.data.seq_len
                window.tokens += self.global_batch * self.recipe.data.seq_len
                result.last_loss = float(flags[0]) / self.world
                self._check_finite(step, result.last_loss, result.checkpoint)
                stopping = bool(flags[1] > 0)
                bar.update(1)
                if step % t.log_every == 0 or step == self.total_steps:
                    self._log(step, tokens_seen, result.last_loss, window.rate(), bar)
                    window.restart()
                if self.evals and t.eval_every and step % t.eval_every == 0:
                    with window.paused():
                        result.eval_loss = self._evaluate(step)
                if step % t.checkpoint_every == 0 or step == end or stopping:
                    with window.paused():
                        result.checkpoint = self._save(step, tokens_seen)
                    saved_at = step
                if stopping:
                    result.interrupted_by = stop.signum or signal.SIGTERM
                    break
        bar.close()
        if result.interrupted_by is None and self.evals and not (t.eval_every and step % t.eval_every == 0):
            result.eval_loss = self._evaluate(step)
        if saved_at != step and step > 0 and result.interrupted_by is None:
            result.checkpoint = self._save(step, tokens_seen)
        result.step, result.tokens_seen = step, tokens_seen
        if step < self.total_steps and result.interrupted_by is None and self.rank == 0:
            print(
                f"stopped at step {step} of {self.total_steps} (train.stop_at_step={t.stop_at_step}); "
                f"its checkpoint {result.checkpoint} continues the run"
            )
        return result

    def _check_finite(self, step: int, loss: float, last: Path | None) -> None:
        """Raise TrainingDiverged when the loss or gradient norm stopped being finite (same on every rank).

        Under fp16, DeepSpeed's loss scaler skips steps whose gradients overflow and lowers the
        scale: normal, unless ``train.max_skipped_steps`` such steps come in a row. In bf16 / fp32
        an overflow-skipped step already means the gradients are not finite.
        """
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else 0.0
        bad = not math.isfinite(loss) or not math.isfinite(gn) or not self.engine.was_step_applied()
        self.bad_steps = self.bad_steps + 1 if bad else 0
        limit = self.t.max_skipped_steps if self.precision == "fp16" else 0
        if self.bad_steps > limit:
            self._diverged(step, f"the loss is {loss:.4g} and the gradient norm {gn:.4g}", last)

    def _diverged(self, step: int, what: str, last: Path | None) -> None:
        kept = (
            f"the newest checkpoint, {last}, is from before it"
            if last is not None
            else "no checkpoint was written"
        )
        raise TrainingDiverged(
            f"training diverged at step {step}: {what} ({self.bad_steps} bad steps in a row). The run stopped "
            f"without saving this state; {kept}. To continue: {divergence_advice(self.precision)}, then run again "
            "(a resume from the last good checkpoint with a new train.lr / warmup needs --allow-schedule-change)"
        )

    def train_step(self, step: int, stop: _StopRequest | None = None) -> torch.Tensor:
        """One optimizer step (`accum` micro-batches) numbered `step`; `stop` is read after the step.

        Returns:
            [sum over ranks of the mean micro-batch loss, number of ranks that got a stop signal],
            from the step's one collective.
        """
        engine = self.engine
        loss_sum = torch.zeros((), dtype=torch.float64)
        for m in range(self.accum):
            batch = self.loader.next_batch()
            if self.trace is not None:
                self.trace.write(json.dumps({"step": step, "micro": m, "seqs": fingerprint(batch)}) + "\n")
                self.trace.flush()
            batch = batch.to(self.device)
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double().cpu()
        # one collective per step: mean loss over ranks and whether any rank got a signal
        signalled = stop is not None and stop.signum is not None
        flags = torch.tensor([loss_sum.item() / self.accum, 1.0 if signalled else 0.0], dtype=torch.float64)
        return self._all_reduce(flags)

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            x = x.to(self.device)
        dist.all_reduce(x)
        return x.cpu()

    def _log(self, step: int, tokens_seen: int, loss: float, tok_s: float, bar: Any) -> None:
        lr = self.engine.get_lr()[0]
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else float("nan")
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        if self.writer is None:
            return
        w = self.writer
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("train/lr", lr, step)
        w.add_scalar("train/grad_norm", gn, step)
        w.add_scalar("train/tokens_seen", tokens_seen, step)
        w.add_scalar("perf/tokens_per_s", tok_s, step)
        if self.peak:
            w.add_scalar("perf/mfu", tok_s * self.flops_per_token / (self.world * self.peak), step)
        w.flush()

    @torch.no_grad()
    def _evaluate(self, step: int) -> float:
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for batch in self.evals:
            batch = batch.to(self.device)
            total[0] += float(self.engine(input_ids=batch, labels=batch).loss)
            total[1] += 1
        self.engine.train()
        total = self._all_reduce(total)
        loss = float(total[0] / total[1])
        if self.writer is not None:
            self.writer.add_scalar("eval/loss", loss, step)
            self.writer.add_scalar("eval/ppl", float(np.exp(min(loss, 50.0))), step)
            self.writer.flush()
        if self.rank == 0:
            tqdm.write(
                f"step {step}: eval loss {loss:.4f} (ppl {np.exp(min(loss, 50.0)):.2f} on {self.eval_text})"
            )
        return loss

    def _save(self, step: int, tokens_seen: int) -> Path:
        # parameters can be non-finite while the loss still is (an inf weight the softmax hides);
        # such a state must never become the newest checkpoint
        if not _all_true(params_finite(self.engine.module)):
            self.bad_steps += 1
            self._diverged(step, "a trained parameter is not finite", self.last_saved)
        self.last_saved = save_checkpoint(
            self.engine,
            self.out / "checkpoints",
            step=step,
            tokens_seen=tokens_seen,
            loader_state=self.loader.state_dict(),
            recipe_yaml=self.recipe.to_yaml(),
            plan_json=self.plan_json,
            zero_stage=self.stage,
            keep_last=self.t.keep_last,
            checksums=self.t.checkpoint_checksums,
        )
        return self.last_saved
