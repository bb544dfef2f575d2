"""A source model whose decoder blocks stay on disk: one block's matrices in memory at a time.

``StreamedSource`` builds the source CausalLM on the meta device and reads from its safetensors
files everything but the decoder blocks' matrices: embeddings, final norm, head, every block's
norms and biases (a few MB per block), the rotary buffers rebuilt from the config. Each block
matrix is a real ``nn.Parameter`` of the right shape and dtype whose data is a *placeholder*: a
zero-stride view of one element, which costs no memory. The matrices are read from the files when
a block's turn comes (``materialized``) and replaced by placeholders again after.

Because the Parameters are real objects of the right shape, everything built from the model keeps
working unchanged: ``apply_plan`` shares them between slots, ``verify`` and the parameter counts
see them, transformers' own forward (masks, rotary embedding, KV cache) runs. What must never see
a placeholder is guarded here:

- a forward: ``streamed_forward(model)`` adds hooks on every decoder layer (of the source or of a
  shared model built from it) that read the layer's block before it runs and drop it after, so the
  calibration hidden states are carried block by block (SparseGPT-style calibration);
- the SVD init of adapters: ``apply_plan(..., blocks=source.materialized)`` reads the base block
  and the removed block a slot approximates while that slot is built;
- a checkpoint: ``save_compact(..., read=source.read)`` writes every tensor shard by shard and
  reads each placeholder's values from the source files as its shard is written.

``max_materialized`` records the most blocks ever in memory at once (one during a forward, the
base and the removed block while an adapter is SVD-initialised).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.parts import skeleton
from flexigpt.shared.files import tensor_files

SOURCE_INDEX = "model.safetensors.index.json"
SOURCE_WEIGHTS = "model.safetensors"


class StreamError(ValueError):
    """A source that cannot be read block by block (no local safetensors files, a missing tensor)."""


def _placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # a view of one element with every stride 0: the right shape, dtype and device, no memory
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def is_placeholder(t: torch.Tensor) -> bool:
    """True for a tensor whose values are not in memory (a zero-stride view standing for a block matrix)."""
    return t.dim() > 0 and t.numel() > 1 and all(s == 0 for s in t.stride())


class StreamedSource:
    """A plain source model with its decoder blocks' matrices read from disk on demand.

    Args:
        folder: a local HF checkpoint directory with ``config.json`` and safetensors weights
            (one ``model.safetensors`` or shards named by ``model.safetensors.index.json``).
        config: its config (``_attn_implementation`` as the model should run).
        cls: the CausalLM class of the family.
        dtype: the dtype every tensor is cast to when read.
        device: where tensors are read to.

    Raises:
        StreamError: the directory has no safetensors weights or lacks a tensor of the model.
    """

    def __init__(
        self,
        folder: str | Path,
        config: PretrainedConfig,
        cls: type[PreTrainedModel],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.folder, self.dtype, self.device = Path(folder), dtype, torch.device(device)
        self.layout = get_layout(config)
        self._files = _weight_map(self.folder)
        # original checkpoints of some families (the hub's OPT files) name tensors without the base
        # model's prefix ("decoder.layers.0..." for "model.decoder.layers.0..."); transformers loads both
        self._strip = f"{cls.base_model_prefix}."
        model = skeleton(cls, config)  # meta, rotary rebuilt from the config
        layers = model.get_submodule(self.layout.layers_path)
        self._block_params: list[list[tuple[nn.Parameter, str]]] = [[] for _ in layers]
        self._keys: dict[int, str] = {}  # id(Parameter) -> tensor name in the source files
        self._materialized: set[int] = set()
        self.max_materialized = 0
        block_prefix = f"{self.layout.layers_path}."
        tied = bool(getattr(config, "tie_word_embeddings", False))
        for name, p in list(model.named_parameters()):
            if tied and name == "lm_head.weight":
                continue  # tied below
            if name.startswith(block_prefix) and p.dim() == 2:
                block = int(name[len(block_prefix) :].split(".", 1)[0])
                param = nn.Parameter(_placeholder(p.shape, dtype, self.device), requires_grad=False)
                self._block_params[block].append((param, name))
                self._keys[id(param)] = name
            else:
                param = nn.Parameter(self._read_name(name), requires_grad=False)
            _set(model, name, param)
        if tied:
            model.lm_head.weight = model.get_input_embeddings().weight
        self.model = model.to(self.device).eval()

    # ------------------------------------------------------------------------------------ reading
    def _read_name(self, name: str) -> torch.Tensor:
        key = name if name in self._files else name.removeprefix(self._strip)
        file = self._files.get(key)
        if file is None:
            raise StreamError(f"{self.folder}: the safetensors files have no tensor {name!r}")
        with safe_open(str(file), framework="pt", device=str(self.device)) as f:
            return f.get_tensor(key).to(self.dtype)

    def key_of(self, p: torch.Tensor) -> str | None:
        """The source tensor name a block-matrix Parameter stands for (None for any other tensor)."""
        return self._keys.get(id(p))

    def read(self, t: torch.Tensor) -> torch.Tensor:
        """`t`'s values: read from the source files for a block matrix, else `t` itself (contiguous)."""
        key = self.key_of(t)
        if key is not None and is_placeholder(t):
            return self._read_name(key)
        return t.detach().contiguous()

    def load(self, block: int) -> None:
        """Read block `block`'s matrices into its Parameters (nothing when already read)."""
        if block in self._materialized:
            return
        for p, name in self._block_params[block]:
            p.data = self._read_name(name)
        self._materialized.add(block)
        self.max_materialized = max(self.max_materialized, len(self._materialized))

    def drop(self, block: int) -> None:
        """Give block `block`'s matrices back (placeholders again)."""
        for p, _ in self._block_params[block]:
            p.data = _placeholder(p.shape, p.dtype, p.device)
        self._materialized.discard(block)

    @property
    def materialized_blocks(self) -> set[int]:
        """The blocks whose matrices are in memory now."""
        return set(self._materialized)

    @contextmanager
    def materialized(self, *blocks: int | None) -> Iterator[None]:
        """The given blocks in memory inside the ``with`` (None entries are ignored)."""
        wanted = sorted({b for b in blocks if b is not None} - self._materialized)
        try:
            for b in wanted:
                self.load(b)
            yield
        finally:
            for b in wanted:
                self.drop(b)

    # ------------------------------------------------------------------------------------ forward
    @contextmanager
    def forward(self, model: nn.Module, blocks: list[int] | None = None) -> Iterator[nn.Module]:
        """`model` (this source or a model whose layers share its Parameters) running block by block.

        Args:
            model: the source model, or a shared model built from it (``apply_plan``).
            blocks: the source block each decoder layer of `model` runs (a plan's slot blocks);
                None: layer i runs block i.

        Yields:
            `model`, with hooks that read a layer's block before it runs and drop it after.
        """
        layers = model.get_submodule(self.layout.layers_path)
        blocks = list(range(len(layers))) if blocks is None else list(blocks)
        handles = []
        try:
            for layer, block in zip(layers, blocks, strict=True):
                handles.append(layer.register_forward_pre_hook(lambda *_, b=block: self.load(b)))
                handles.append(layer.register_forward_hook(lambda *_, b=block: self.drop(b)))
            yield model
        finally:
            for h in handles:
                h.remove()
            for b in list(self._materialized):
                self.drop(b)


def _set(module: nn.Module, path: str, value: nn.Parameter) -> None:
    owner_path, _, leaf = path.rpartition(".")
    setattr(module.get_submodule(owner_path) if owner_path else module, leaf, value)


def _weight_map(folder: Path) -> dict[str, Path]:
    files = tensor_files(folder)
    if files is None:
        raise StreamError(
            f"{folder}: no {SOURCE_WEIGHTS} or {SOURCE_INDEX} (safetensors weights are required)"
        )
    return files
