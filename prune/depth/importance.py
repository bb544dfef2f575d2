"""Block importance: which decoder blocks matter least, measured on calibration text.

Three metrics are registered by name in ``IMPORTANCE_METRICS``; recipes refer to them by string:

- ``block_influence`` (ShortGPT, FlexiGPT eq. 1): ``BI_i = 1 - E_{X,t} cos(X_{i,t}, X_{i+1,t})``,
  one minus the mean per-token cosine similarity between a block's input and its output.
- ``angular_distance`` (Gromov et al. 2024, for one block): ``E_{X,t} arccos(cos(...)) / pi``.
  Same ranking signal as BI but on an angle, so scores add up more evenly across blocks.
- ``ppl_drop``: the perplexity of the model with block i skipped, minus the full model's (both
  measured by ``evaluate.perplexity.sample_perplexity``, the package's one perplexity).

For every metric a higher score means a more important block; pruning removes the lowest.

Block inputs and outputs come from forward hooks on each decoder layer, found through the
architecture layout (``layers_path``). HF's ``output_hidden_states`` is not used: its last entry
is taken after the final norm, which would skew the last block's score (ShortGPT's bug).

Calibration data is any iterable of token-id tensors (shape ``(T,)`` or ``(B, T)``, no padding),
so a ``datasets`` stream, a list or a generator can feed it; ``calibration_samples`` cuts text
into such tensors.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.evaluate.perplexity import sample_perplexity, token_rows
from flexigpt.shared.files import write_text_atomic
from flexigpt.shared.text import TextRule

# One metric: (model, decoder layers, calibration samples, progress flag) -> (per-block scores, extras).
MetricFn = Callable[
    [nn.Module, nn.ModuleList, Iterable[torch.Tensor], bool], tuple[list[float], dict[str, Any]]
]


@dataclass(frozen=True)
class ImportanceMetric:
    """A registered block-importance metric."""

    name: str
    """Name used in recipes."""
    description: str
    """One line shown in errors and docs."""
    fn: MetricFn
    """Computes one score per block (higher = more important) and optional extras."""


IMPORTANCE_METRICS: dict[str, ImportanceMetric] = {}


def register_importance(name: str, description: str) -> Callable[[MetricFn], MetricFn]:
    """Register a metric function under `name` (decorator).

    Args:
        name: recipe name of the metric; must be new.
        description: one line for errors and docs.

    Returns:
        A decorator that registers the function and returns it unchanged.

    Raises:
        ValueError: the name is taken or the function does not take (model, layers, samples, progress).
    """

    def deco(fn: MetricFn) -> MetricFn:
        if name in IMPORTANCE_METRICS:
            raise ValueError(f"importance metric {name!r} is already registered")
        params = list(inspect.signature(fn).parameters)
        if params != ["model", "layers", "samples", "progress"]:
            raise ValueError(
                f"importance metric {name!r}: function must take (model, layers, samples, progress), got {params}"
            )
        IMPORTANCE_METRICS[name] = ImportanceMetric(name, description, fn)
        return fn

    return deco


def get_metric(name: str) -> ImportanceMetric:
    """The registered metric called `name`.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    try:
        return IMPORTANCE_METRICS[name]
    except KeyError:
        allowed = ", ".join(f"{k} ({m.description})" for k, m in IMPORTANCE_METRICS.items())
        raise ValueError(f"importance metric={name!r} is unknown; allowed: {allowed}") from None


@dataclass
class ImportanceResult:
    """Per-block importance scores of one model on one calibration set."""

    metric: str
    """Name of the metric (see IMPORTANCE_METRICS)."""
    scores: list[float]
    """One score per source block, bottom to top; higher means more important."""
    model_type: str
    """transformers model_type of the scored model."""
    num_samples: int
    """Calibration tensors consumed."""
    num_tokens: int
    """Calibration tokens consumed (sum over samples of batch x length)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Metric-specific figures (e.g. the full model's perplexity for ppl_drop)."""

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    def ranking(self) -> list[int]:
        """Block indices from least to most important (ties: lower index first)."""
        return sorted(range(len(self.scores)), key=lambda i: (self.scores[i], i))

    def least_important(self, n: int) -> list[int]:
        """The `n` least important blocks, in increasing block order.

        Raises:
            ValueError: n is not in 0..num_layers.
        """
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"n={n} blocks to remove: allowed 0..{self.num_layers}")
        return sorted(self.ranking()[:n])

    def to_dict(self) -> dict[str, Any]:
        return {"format": "flexigpt-importance/1", **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        """Write the scores as JSON to `path`."""
        write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ImportanceResult:
        """Read scores written by `save`."""
        d = json.loads(Path(path).read_text())
        d.pop("format", None)
        return cls(**d)


def compute_importance(
    model: nn.Module,
    samples: Iterable[torch.Tensor],
    metric: str = "block_influence",
    *,
    progress: bool = True,
) -> ImportanceResult:
    """Score every decoder block of `model` with a registered metric.

    Args:
        model: a transformers CausalLM of a supported architecture (see shared.layout).
        samples: calibration token ids, each a LongTensor of shape (T,) or (B, T) without padding.
        metric: registered metric name (block_influence, angular_distance, ppl_drop, ...).
        progress: show a tqdm bar over samples.

    Returns:
        The scores, one per block.

    Raises:
        ValueError: unknown metric, or no calibration tokens.
    """
    spec = get_metric(metric)
    layout = get_layout(model.config)
    layers = model.get_submodule(layout.layers_path)
    counter = _CountingSamples(samples, _model_device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores, extra = spec.fn(model, layers, counter, progress)
    finally:
        model.train(was_training)
    if counter.num_tokens == 0:
        raise ValueError("samples: the calibration stream yielded no tokens")
    return ImportanceResult(
        metric, [float(s) for s in scores], layout.model_type, counter.num_samples, counter.num_tokens, extra
    )


# ---------------------------------------------------------------------------------------- metrics


@register_importance("block_influence", "1 - mean cosine(block input, block output), eq. 1")
def _block_influence(
    model: nn.Module, layers: nn.ModuleList, samples: Iterable[torch.Tensor], progress: bool
):
    return _hooked_token_mean(model, layers, samples, progress, lambda c: 1.0 - c), {}


@register_importance("angular_distance", "mean arccos(cosine(block input, block output)) / pi")
def _angular_distance(
    model: nn.Module, layers: nn.ModuleList, samples: Iterable[torch.Tensor], progress: bool
):
    # clamp: rounding can push a cosine of an identity block slightly above 1 (arccos -> NaN).
    return _hooked_token_mean(
        model, layers, samples, progress, lambda c: torch.arccos(c.clamp(-1, 1)) / math.pi
    ), {}


@register_importance("ppl_drop", "perplexity with the block skipped minus the full model's")
def _ppl_drop(model: nn.Module, layers: nn.ModuleList, samples: Iterable[torch.Tensor], progress: bool):
    seqs = list(samples)  # read (and counted) once, scored once per block and once in full
    if not any(ids.shape[-1] >= 2 for ids in seqs):
        raise ValueError("samples: ppl_drop needs sequences of at least 2 tokens")
    base = sample_perplexity(model, seqs).ppl
    without = []
    for layer in tqdm(layers, desc="ppl_drop", unit="block", disable=not progress):
        # Skipping a block = its output is its input; a hook does it for any architecture.
        handle = layer.register_forward_hook(_skip_hook, with_kwargs=True)
        try:
            without.append(sample_perplexity(model, seqs).ppl)
        finally:
            handle.remove()
    return [p - base for p in without], {"ppl_full": base, "ppl_without_block": without}


def _hooked_token_mean(
    model: nn.Module,
    layers: nn.ModuleList,
    samples: Iterable[torch.Tensor],
    progress: bool,
    per_token: Callable[[torch.Tensor], torch.Tensor],
) -> list[float]:
    """Mean over all calibration tokens of per_token(cos(input_i, output_i)), for every block i."""
    n = len(layers)
    sums = torch.zeros(n, dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    count = 0

    def pre_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[i] = _hidden_from_args(args, kwargs)

        return hook

    def post_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            # fp32 cosine: in fp16/bf16 the similarity of a near-identity block rounds to exactly 1.
            cos = torch.nn.functional.cosine_similarity(inputs.pop(i).float(), out.float(), dim=-1)
            sums[i] += per_token(cos).double().sum().cpu()

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
        for ids in tqdm(samples, desc="block importance", unit="sample", disable=not progress):
            model(input_ids=ids, use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [float(s) / max(count, 1) for s in sums]


def _hidden_from_args(args: tuple, kwargs: dict) -> torch.Tensor:
    # transformers passes the hidden states positionally; accept the keyword form too.
    return args[0] if args else kwargs["hidden_states"]


def _skip_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    hidden = _hidden_from_args(args, kwargs)
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _CountingSamples:
    """Iterates the calibration samples once, as (B, T) on the model's device, counting them."""

    def __init__(self, samples: Iterable[torch.Tensor], device: torch.device) -> None:
        self._samples = samples
        self._device = device
        self.num_samples = 0
        self.num_tokens = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for k, ids in enumerate(self._samples):
            ids = token_rows(ids, k).to(self._device)
            self.num_samples += 1
            self.num_tokens += ids.numel()
            yield ids


# ---------------------------------------------------------------------------------------- calibration


def calibration_samples(
    texts: Iterable[str],
    encode: Callable[[str], Sequence[int]],
    *,
    num_samples: int,
    seq_len: int,
    pack: bool = True,
    bos_id: int | None = None,
    text: TextRule | None = None,
) -> Iterator[torch.Tensor]:
    """Cut a text stream into calibration tensors of shape (1, T).

    Args:
        texts: documents, e.g. ``(row["text"] for row in dataset)``; empty ones are skipped (without `text`).
        encode: text -> token ids without special tokens (e.g. a sentencepiece ``encode``).
        num_samples: tensors to yield at most (fewer if the stream ends first).
        seq_len: tokens per tensor (including the BOS token when `bos_id` is given).
        pack: True concatenates documents and yields full windows of seq_len tokens (short
            documents such as WikiText lines fill a window together); False yields one tensor per
            document, truncated to seq_len (ShortGPT / MiniPile style).
        bos_id: without `text`: a token put at the start of every window (pack) or document.
        text: the run's text rule (``shared.text``): every document gets its BOS before and its
            EOS after, and packed windows are plain cuts of that stream, exactly the windows the
            training and evaluation streams make of the same documents. The prune command always
            passes it; `bos_id` is then not allowed.

    Yields:
        LongTensor of shape (1, T), T == seq_len when packing.

    Raises:
        ValueError: num_samples < 1 or seq_len < 2.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: must be >= 1")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: must be >= 2")
    if text is not None and bos_id is not None:
        raise ValueError("bos_id: the text rule decides BOS; pass one of bos_id / text")
    prefix = [] if bos_id is None else [bos_id]
    body = seq_len - len(prefix)
    made = 0
    buf: list[int] = []
    for doc in texts:
        # under the text rule a document is one whatever it holds, as in the training stream
        if text is None and (not doc or not doc.strip()):
            continue
        ids = list(encode(doc))
        if text is not None:
            ids = text.document(ids)
        if not pack:
            yield torch.tensor([prefix + ids[:body]], dtype=torch.long)
            made += 1
        else:
            buf.extend(ids)
            while len(buf) >= body and made < num_samples:
                yield torch.tensor([prefix + buf[:body]], dtype=torch.long)
                del buf[:body]
                made += 1
        if made >= num_samples:
            return


# ---------------------------------------------------------------------------------------- how many

RATIO_RULES: dict[str, str] = {
    "round": "round(ratio * L), halves up: 10 of 32 at 30%, 13 of 32 at 40% (default)",
    "paper_params": "floor(ratio * L): 9 of 32 at 30% (fits the paper's 3.67% overhead), 12 of 32 at 40%",
}


def n_blocks_to_remove(ratio: float, num_layers: int, rule: str = "round") -> int:
    """How many blocks a pruning ratio removes (see docs/pruning.md for the arithmetic).

    Args:
        ratio: fraction of the blocks to remove, 0 < ratio < 1.
        num_layers: decoder blocks of the source model.
        rule: ``round`` (default) or ``paper_params`` (see RATIO_RULES).

    Returns:
        The number of blocks, at least 1 and at most num_layers - 1.

    Raises:
        ValueError: bad ratio, layer count or rule, or a ratio that removes no block or all.
    """
    if rule not in RATIO_RULES:
        raise ValueError(f"ratio rule={rule!r} is unknown; allowed: {RATIO_RULES}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio={ratio!r}: must be strictly between 0 and 1")
    if num_layers < 2:
        raise ValueError(f"num_layers={num_layers}: pruning needs at least 2 blocks")
    x = ratio * num_layers
    # The 1e-9 guards against binary fractions: 0.29 * 100 is 28.999999999999996.
    n = math.floor(x + 0.5 + 1e-9) if rule == "round" else math.floor(x + 1e-9)
    if not 1 <= n <= num_layers - 1:
        raise ValueError(
            f"ratio={ratio} with rule={rule!r} removes {n} of {num_layers} blocks: allowed 1..{num_layers - 1}"
        )
    return n
