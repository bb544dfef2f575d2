"""The source of a ``prune.memory: per_block`` run: never in memory whole (see ``shared.engine.stream``)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from transformers import PreTrainedModel

from flexigpt.prune.depth.build import PruneError
from flexigpt.prune.depth.recipe import PruneRecipe
from flexigpt.prune.depth.steps import SourceModel, weights_dir
from flexigpt.shared.command import read_source_config
from flexigpt.shared.engine.apply import SOURCE_CLASSES
from flexigpt.shared.engine.layout import get_layout
from flexigpt.shared.engine.stream import StreamedSource, StreamError

# The shard size of the checkpoints a per-block run writes: one shard is in memory while it is written.
STREAM_SHARD_SIZE = "2GB"


class StreamedSourceModel(SourceModel):
    """``prune.memory: per_block``: the source with its block matrices read from safetensors on demand.

    The top modules and every block's norms are in memory; a forward reads one block at a time
    (``running``), an SVD init the two blocks it compares (``blocks``), a checkpoint one shard at a
    time (``read``). Nothing here ever holds the whole model.

    Raises:
        PruneError: model.source is not a local (or locally cached) checkpoint with safetensors files.
    """

    shard_size = STREAM_SHARD_SIZE

    def __init__(self, recipe: PruneRecipe, device: torch.device, dtype: torch.dtype, log: Callable) -> None:
        super().__init__(recipe, device, dtype, log)
        src = recipe.model.source
        folder = weights_dir(src, allow_download=False)
        try:
            if folder is None:
                raise StreamError(f"no local directory or locally cached snapshot of {src!r}")
            config = read_source_config(src, PruneError, "prune a plain model")
            config._attn_implementation = recipe.model.attn_implementation or "sdpa"
            layout = get_layout(config)
            self.stream = StreamedSource(folder, config, SOURCE_CLASSES[layout.model_type], dtype, device)
        except StreamError as e:
            raise PruneError(
                f"prune.memory='per_block' reads model.source block by block from its safetensors files: {e}; "
                "use a local checkpoint with safetensors weights, or prune.memory='whole'"
            ) from e
        self.streamed, self.read, self.blocks = True, self.stream.read, self.stream.materialized
        log(f"reading {src} block by block ({str(dtype).split('.')[-1]}, {device}) from {folder}")

    @property
    def loaded(self) -> bool:
        return False  # never whole

    def get(self) -> PreTrainedModel:
        return self.stream.model

    def free(self) -> None:
        gc.collect()

    def running(self, model: Any, blocks: list[int] | None = None) -> AbstractContextManager:
        """`model` (the source, or a variant built from it whose layer i runs ``blocks[i]``) running
        one block at a time."""
        return self.stream.forward(model, blocks)
