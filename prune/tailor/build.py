"""Candidates built in memory: one preallocated plain model whose tensors each plan overwrites.

A stitched model is a plain model of the source architecture with fewer layers, so a skeleton of
that depth is built once and every candidate is made by copying the plan's blocks into it: no disk
write and no new model per trial. The top modules (embeddings, final norm, lm_head) come from the
plan's ``top`` source and are copied only when it changes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from flexigpt.prune.tailor.sources import SourceSet
from flexigpt.prune.tailor.stitch import StitchError, StitchPlan


class Stitcher:
    """Builds any plan with a fixed number of kept positions into one reused model."""

    def __init__(
        self,
        sources: SourceSet,
        num_positions: int,
        *,
        device: str = "cpu",
        attn_implementation: str = "sdpa",
    ) -> None:
        """Allocate the skeleton.

        Args:
            sources: the base and its variants.
            num_positions: kept positions of every plan this stitcher builds.
            device: where the skeleton lives.
            attn_implementation: transformers attention kernel of the skeleton.

        Raises:
            StitchError: the architecture has per-layer config fields that differ between layers
                (e.g. Qwen2 with some sliding-window layers), which one skeleton cannot follow.
        """
        from transformers import AutoModelForCausalLM

        self.sources = sources
        self.num_positions = num_positions
        cfg = copy.deepcopy(sources.base.config)
        for f in sources.layout.per_layer_config:
            values = getattr(cfg, f, None)
            if values is not None and len(set(values)) > 1:
                raise StitchError(
                    f"config.{f} differs between layers ({sorted(set(values))}); stitching such models is not "
                    "supported yet"
                )
            if values is not None:
                setattr(cfg, f, list(values[:num_positions]))
        cfg.num_hidden_layers = num_positions
        self.model = AutoModelForCausalLM.from_config(
            cfg, dtype=sources.dtype, attn_implementation=attn_implementation
        )
        self.model.to(device).eval().requires_grad_(False)
        self.layers = self.model.get_submodule(sources.layout.layers_path)
        self._top: str | None = None
        self.plan: StitchPlan | None = None

    def _load_top(self, name: str) -> None:
        src = self.sources.base if name == "base" else self.sources.variants[name]
        if name != "base" and src.config.vocab_size != self.sources.base.config.vocab_size:
            raise StitchError(
                f"top={name!r}: its vocabulary ({src.config.vocab_size}) differs from the base's "
                f"({self.sources.base.config.vocab_size}); take the top modules from the base"
            )
        tensors = src.read(self.sources.top_names(src))
        params = dict(self.model.named_parameters())
        missing = [
            n for n in params if not n.startswith(f"{self.sources.layout.layers_path}.") and n not in tensors
        ]
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        missing = [n for n in missing if not (tied and n == "lm_head.weight")]
        if missing:
            raise StitchError(f"top={name!r}: tensors {missing} are missing from {src.path}")
        for n, t in tensors.items():
            if n in params:
                params[n].data.copy_(t.to(params[n].dtype))
        self._top = name

    @torch.no_grad()
    def build(self, plan: StitchPlan) -> Any:
        """Write `plan`'s tensors into the skeleton and return it (the same module every call).

        Raises:
            StitchError: a plan of another depth or base, or unknown sources.
        """
        if len(plan.positions) != self.num_positions:
            raise StitchError(
                f"plan keeps {len(plan.positions)} layers; this stitcher builds {self.num_positions}"
            )
        if plan.base_layers != self.sources.num_layers:
            raise StitchError(
                f"plan.base_layers={plan.base_layers}; the base has {self.sources.num_layers} layers"
            )
        plan.validate(self.sources.names())
        if plan.top != self._top:
            self._load_top(plan.top)
        layout = self.sources.layout
        for i, pos in enumerate(plan.positions):
            layer = self.layers[i]
            for name, t in self.sources.block(pos).items():
                layer.get_parameter(name).data.copy_(t)
            if pos.output_scale is not None and pos.output_scale != 1.0:
                # the block's residual update is o_proj(...) + down_proj(...): scaling both outputs scales it
                for path in (layout.attn_out, layout.mlp_out):
                    lin = layer.get_submodule(path)
                    lin.weight.mul_(pos.output_scale)
                    if lin.bias is not None:
                        lin.bias.mul_(pos.output_scale)
        self.plan = plan
        return self.model

    def export(self, out: str | Path, tokenizer: Any | None = None) -> Path:
        """Save the last built model as a plain model of the source architecture (and its stitch plan).

        Returns:
            The directory; ``AutoModelForCausalLM.from_pretrained`` loads it without this toolkit.
        """
        if self.plan is None:
            raise StitchError("export: nothing built yet")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        self.plan.save(out / "stitch_plan.yaml")
        return out
