"""Builders for the evaluation tests: a character tokenizer that fits the tiny models' 128-token
vocabulary, shared-block plans over a tiny LLaMA, and the real LLaMA tokenizer when present.
Everything is made locally and seeded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flexigpt.shared.engine.apply import apply_plan
from flexigpt.shared.engine.plan import AdapterSpec, OutNormSpec, Plan, SlotSpec
from flexigpt.shared.engine.tiny import tiny_model

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3: the tiny models use pad 0, bos 1, eos 2
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # ids 4-99


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (and newline): 100 ids, below the tiny vocab of 128."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def llama_tokenizer(shared_data: Path, tmp: Path):
    """The real LLaMA-2 32k sentencepiece tokenizer, loaded the transformers 5 way."""
    d = tmp / "llama_tok"
    d.mkdir(exist_ok=True)
    shutil.copyfile(shared_data / "tokenizers" / "llama2-32k.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return AutoTokenizer.from_pretrained(str(d))


def pruned_plan(num_layers: int = 4, *, out_norm: bool = False, rank: int = 8) -> Plan:
    """Block 2 removed; its slot runs block 1 with SVD-initialised adapters (and an output norm)."""
    slots = []
    for i in range(num_layers):
        if i == 2:
            slots.append(
                SlotSpec(
                    block=1,
                    adapter=AdapterSpec(rank=rank, init="svd", svd_from=2),
                    out_norm=OutNormSpec(gamma=0.5) if out_norm else None,
                    own_norms=True,
                )
            )
        else:
            slots.append(SlotSpec(block=i))
    return Plan("llama", num_layers, tuple(slots))


def grown_plan(num_layers: int = 4) -> Plan:
    """Blocks 1 and 2 run twice (block-wise): 6 slots over 4 blocks, the copies with adapters."""
    order = [0, 1, 2, 1, 2, 3]
    seen: set[int] = set()
    slots = []
    for b in order:
        extra = b in seen
        seen.add(b)
        slots.append(
            SlotSpec(
                block=b,
                adapter=AdapterSpec(rank=4, init="lora") if extra else None,
                out_norm=OutNormSpec(gamma=0.1) if extra else None,
            )
        )
    return Plan("llama", num_layers, tuple(slots))


def shared_model(plan: Plan, seed: int = 0, **kw):
    """A tiny LLaMA-2 turned into the shared model of `plan`; LoRA B factors randomised so that
    adapters change the output (lora init leaves them zero)."""
    model = apply_plan(tiny_model("llama2", seed=seed, num_layers=plan.num_source_layers, **kw), plan)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def random_tokens(n: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    """A seeded stream of token ids (specials included: a model scores them like any other id)."""
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
