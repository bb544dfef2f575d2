"""The base model and its fine-tuned variants, read block by block from their safetensors.

A GPTailor candidate draws each kept position from the base, from one variant or from a merge of
several variants. Loading K + 1 large models at once is not an option, so a source is only an
index of tensor names to safetensors files; a block's tensors are read when a candidate needs them.
Merged blocks are computed once per distinct merge (method, variants, scale, layer) and, like the
blocks read, kept in a bounded least-recently-used cache.

The merge arithmetic is mergekit's (``merge_tensors`` over one tensor at a time): task arithmetic,
TIES and linear.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from flexigpt.prune.tailor.stitch import MergeSpec, Position, StitchError
from flexigpt.shared.engine.layout import ArchLayout, get_layout
from flexigpt.shared.files import tensor_files

# Config fields that must agree between the base and a variant for their blocks to be exchangeable.
SHAPE_FIELDS: tuple[str, ...] = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "head_dim",
    "attention_bias",
    "mlp_bias",
)

Block = dict[str, torch.Tensor]


def resolve_source(source: str) -> Path:
    """The local directory of `source` (a directory, or a hub id fetched without its other weights).

    Raises:
        StitchError: neither a directory nor a hub id that can be fetched.
    """
    p = Path(source)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
        )
    except Exception as e:  # the hub raises many kinds; all mean "cannot use this source"
        raise StitchError(
            f"source {source!r}: not a local directory and not fetchable from the hub ({e})"
        ) from e


class Source:
    """One model on disk: its config and where each tensor lives; nothing is loaded up front."""

    def __init__(self, name: str, source: str) -> None:
        """Index `source` (a directory or hub id) under `name`.

        Raises:
            StitchError: no config.json or no safetensors weights.
        """
        from transformers import AutoConfig

        self.name = name
        self.path = resolve_source(source)
        if not (self.path / "config.json").is_file():
            raise StitchError(f"{name}: {self.path} has no config.json")
        self.config = AutoConfig.from_pretrained(self.path)
        files = tensor_files(self.path)
        if files is None:
            raise StitchError(
                f"{name}: {self.path} has no model.safetensors(.index.json); only safetensors are read"
            )
        self.files = files

    def read(self, names: list[str]) -> Block:
        """The tensors `names`, read from their files (one open per file)."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise StitchError(f"{self.name}: tensor {n!r} is missing from {self.path}")
            by_file.setdefault(self.files[n], []).append(n)
        out: Block = {}
        for f, ns in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for n in ns:
                    out[n] = h.get_tensor(n)
        return out


def _vocab(path: Path) -> dict[str, int] | None:
    """The tokenizer vocabulary saved in `path`, or None when it has no tokenizer."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class MergeOptions:
    """Fixed knobs of the merge methods."""

    ties_density: float = 0.5


class SourceSet:
    """The base and its variants, checked to be exchangeable block by block, with a block cache."""

    def __init__(
        self,
        base: str,
        variants: Mapping[str, str],
        *,
        cache_blocks: int = 64,
        merge: MergeOptions | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Index every source and check shapes and tokenizers against the base.

        Args:
            base: hub id or directory of the base model.
            variants: name -> hub id or directory of each fine-tuned variant.
            cache_blocks: blocks kept in memory at most.
            merge: merge knobs.
            dtype: dtype blocks are returned in (merges are computed in float32 first).

        Raises:
            StitchError: an unsupported architecture, a shape that differs, or a variant tokenizer that
                numbers the base's tokens differently.
        """
        self.base = Source("base", base)
        self.layout: ArchLayout = get_layout(self.base.config)
        self.variants = {n: Source(n, s) for n, s in variants.items()}
        self.cache_blocks = cache_blocks
        self.merge = merge or MergeOptions()
        self.dtype = dtype
        self._cache: OrderedDict[Any, Block] = OrderedDict()
        self.reads = 0
        self.merges = 0
        self._check()

    @property
    def num_layers(self) -> int:
        return int(self.base.config.num_hidden_layers)

    def names(self) -> tuple[str, ...]:
        """Every source name a plan may use."""
        return ("base", *self.variants)

    def _check(self) -> None:
        bc = self.base.config
        base_vocab = _vocab(self.base.path)
        for name, v in self.variants.items():
            for f in SHAPE_FIELDS:
                a, b = getattr(bc, f, None), getattr(v.config, f, None)
                if a != b:
                    raise StitchError(
                        f"tailor.variants.{name}: config.{f}={b!r} differs from the base's {a!r}; variants must "
                        "share the base's architecture and shapes"
                    )
            vv = _vocab(v.path)
            if base_vocab is not None and vv is not None:
                moved = [t for t, i in base_vocab.items() if vv.get(t) != i]
                if moved:
                    raise StitchError(
                        f"tailor.variants.{name}: its tokenizer numbers {len(moved)} of the base's tokens "
                        f"differently (e.g. {moved[:3]}); its layers were trained on other ids. Tokens a variant "
                        "only adds after the base's are fine (they are dropped)"
                    )

    # ----------------------------------------------------------------------------------- blocks
    def layer_names(self, source: Source, layer: int) -> list[str]:
        prefix = f"{self.layout.layers_path}.{layer}."
        return [n for n in source.files if n.startswith(prefix)]

    def top_names(self, source: Source) -> list[str]:
        """Every tensor outside the decoder stack (embeddings, final norm, lm_head)."""
        prefix = f"{self.layout.layers_path}."
        return [n for n in source.files if not n.startswith(prefix)]

    def _source(self, name: str) -> Source:
        if name == "base":
            return self.base
        if name not in self.variants:
            raise StitchError(f"source {name!r} is unknown; allowed: {list(self.names())}")
        return self.variants[name]

    def _cached(self, key: Any, make: Any) -> Block:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        block = make()
        self._cache[key] = block
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return block

    def raw_block(self, name: str, layer: int) -> Block:
        """Layer `layer` of source `name`, keyed by the name inside the block (``self_attn.q_proj.weight``)."""

        def make() -> Block:
            src = self._source(name)
            names = self.layer_names(src, layer)
            if not names:
                raise StitchError(f"{name}: no tensors of layer {layer} in {src.path}")
            self.reads += 1
            cut = len(f"{self.layout.layers_path}.{layer}.")
            return {n[cut:]: t.to(self.dtype) for n, t in src.read(names).items()}

        return self._cached(("raw", name, layer), make)

    def block(self, pos: Position) -> Block:
        """The tensors of one stitched position (read, or merged once and cached)."""
        if pos.merge is None:
            return self.raw_block(pos.source, pos.layer)
        m = pos.merge
        return self._cached(
            ("merge", m.method, m.variants, m.scale, pos.layer), lambda: self._merged(m, pos.layer)
        )

    def _merged(self, m: MergeSpec, layer: int) -> Block:
        base = self.raw_block("base", layer)
        vs = [self.raw_block(v, layer) for v in m.variants]
        self.merges += 1
        return {k: merge_tensor(m, base[k], [v[k] for v in vs], self.merge).to(self.dtype) for k in base}


def merge_tensor(
    m: MergeSpec, base: torch.Tensor, variants: list[torch.Tensor], opts: MergeOptions
) -> torch.Tensor:
    """One merged tensor by mergekit's merge method (computed in float32).

    - task_arithmetic: ``base + scale * sum_j (v_j - base)`` (GPTailor's merge);
    - ties: TIES on the task vectors, each trimmed to ``ties_density``, weighted by ``scale``;
    - linear: ``(1 - scale) * base + scale * mean_j v_j``.

    Raises:
        StitchError: an unknown method.
    """
    from mergekit.merge_methods.api import merge_tensors

    xs = [base.float(), *(v.float() for v in variants)]
    k = len(variants)
    if m.method == "task_arithmetic":
        return merge_tensors(xs, "task_arithmetic", parameters={"weight": m.scale}, base_index=0)
    if m.method == "ties":
        return merge_tensors(
            xs, "ties", parameters={"weight": m.scale, "density": opts.ties_density}, base_index=0
        )
    if m.method == "linear":
        weights = [1.0 - m.scale] + [m.scale / k] * k
        return merge_tensors(xs, "linear", parameters={"weight": weights, "normalize": False})
    raise StitchError(f"merge method {m.method!r} is unknown; allowed: task_arithmetic, ties, linear")
