"""What a quickstart run is: its scale (model and corpus sizes, training budgets), its directory, its errors.

Two scales exist. ``full`` is the main job: on 2 CPU cores it takes 5-9 minutes, most of them in
its three training commands. ``tiny`` runs the same steps on a much smaller model and corpus in about
two minutes, so the tests exercise the whole command path. A run directory remembers its scale
(``quickstart.json``) and refuses the other one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class QuickstartError(RuntimeError):
    """A step failed; the message names the step and where its log is."""


class QuickstartInterrupted(QuickstartError):
    """SIGINT / SIGTERM stopped a command (after it wrote its checkpoint); running again resumes."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass(frozen=True)
class Scale:
    """Sizes and budgets of one quickstart scale (``full`` or ``tiny``)."""

    name: str
    max_train_files: int | None
    """Stdlib files read for the training split (the first in path order); None: all of them."""
    max_heldout_files: int | None
    """The same for the held-out split."""
    vocab: int
    """Sentencepiece vocabulary, the 256 byte pieces and 3 specials included."""
    layers: int
    """Decoder blocks of the base Llama."""
    hidden: int
    heads: int
    intermediate: int
    """MLP width of the base Llama."""
    seq_len: int
    """Tokens per training sequence (also the perplexity window and the calibration length)."""
    micro_batch: int
    """Sequences per optimizer step (one rank, no accumulation)."""
    base_steps: int
    """Optimizer steps of the base model's training from scratch (all parameters)."""
    base_lr: float
    grow_steps: int
    """Steps of the grown model (adapters and norms of the new slots)."""
    grow_span: tuple[int, int]
    """Blocks start..end (inclusive) repeated once, Block pattern."""
    prune_steps: int
    """Recovery steps of each trained pruned variant (FlexiGPT, ShortGPT+LoRA)."""
    prune_ratio: float
    adapter_rank: int
    """LoRA rank of the grown and the replacement slots, and r of the base-selection metric."""
    calibration_samples: int
    """Sequences of the Block Influence pass."""
    ppl_tokens: int
    """Held-out tokens scored for perplexity."""
    task_docs: int
    """Questions of the toy zero-shot task."""

    def as_dict(self) -> dict[str, Any]:
        """The scale as JSON-able values (recorded in ``quickstart.json``)."""
        d = asdict(self)
        d["grow_span"] = list(self.grow_span)
        return d


SCALES = {
    # a 2.1M-parameter base; 5-9 minutes end to end on 2 busy cores (README), mostly the three trainings
    "full": Scale(
        name="full",
        max_train_files=None,
        max_heldout_files=None,
        vocab=4096,
        layers=6,
        hidden=144,
        heads=4,
        intermediate=384,
        seq_len=256,
        micro_batch=8,
        base_steps=200,
        base_lr=3e-3,
        grow_steps=50,
        grow_span=(2, 4),
        prune_steps=40,
        prune_ratio=0.33,
        adapter_rank=16,
        calibration_samples=32,
        ppl_tokens=32_000,
        task_docs=200,
    ),
    # the same path in about two minutes (the tests run it)
    "tiny": Scale(
        name="tiny",
        max_train_files=40,
        max_heldout_files=8,
        vocab=640,
        layers=4,
        hidden=64,
        heads=4,
        intermediate=160,
        seq_len=64,
        micro_batch=4,
        base_steps=40,
        base_lr=5e-3,
        grow_steps=6,
        grow_span=(1, 2),
        prune_steps=6,
        prune_ratio=0.25,
        adapter_rank=4,
        calibration_samples=8,
        ppl_tokens=4_000,
        task_docs=40,
    ),
}


@dataclass
class Context:
    """Where the run lives and at what scale; paths of every step's output."""

    out: Path
    scale: Scale
    echo: bool = True

    def __post_init__(self) -> None:
        self.out = self.out.resolve()

    @property
    def corpus(self) -> Path:
        """The corpus directory (``train/``, ``heldout/``, ``manifest.json``)."""
        return self.out / "corpus"

    @property
    def tokenizer(self) -> Path:
        """The tokenizer directory (``tokenizer.model`` + the transformers files)."""
        return self.out / "tokenizer"

    def run_dir(self, step: str) -> Path:
        """The output directory of a command's step (base, grow, prune)."""
        return self.out / step
