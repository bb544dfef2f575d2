"""A tiny GPTailor setting the tests build themselves on CPU in seconds: a base model that knows a
small grammar, two variants fine-tuned (decoder layers only) on different facts, and one local
multiple-choice task per variant that the matching variant is better at.

The grammar has two sentence templates, ``<det> <animal> colour <colour> .`` and ``<det> <animal>
home <home> .`` (the answer follows the animal closely, so a fine-tune of the decoder layers alone
learns it in a few steps). The base model sees them with random colours and homes (and copy sentences), so it knows which
words may follow but not which one; variant ``colour`` learns one fixed colour per animal, variant
``home`` one fixed home per animal. The task ``colour_facts`` asks for the colour, ``home_facts``
for the home; each is near chance for the base and for the other variant.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from flexigpt.shared.engine.tiny import tiny_model
from flexigpt.shared.evaluate.zeroshot import write_choice_task

from ... import kit

ANIMALS = ["cat", "dog", "bird", "fish", "cow", "fox", "owl", "bee", "ant", "frog", "wolf", "bear"]
COLOURS = ["red", "blue", "green", "black", "white", "brown"]
HOMES = ["tree", "river", "hill", "cave", "field", "lake"]
DETS = ["the", "a", "one"]
WORDS = DETS + ANIMALS + COLOURS + HOMES + ["colour", "home", "."]
COLOUR_OF = {a: COLOURS[i % len(COLOURS)] for i, a in enumerate(ANIMALS)}
HOME_OF = {a: HOMES[(i * 5 + 2) % len(HOMES)] for i, a in enumerate(ANIMALS)}
NUM_LAYERS = 8


def write_tokenizer(d: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (ids < 64: fits the tiny vocab)."""
    return PreTrainedTokenizerFast.from_pretrained(kit.write_tokenizer(d, WORDS))


def _colour(det: str, animal: str, colour: str) -> str:
    return f"{det} {animal} colour {colour} ."


def _home(det: str, animal: str, home: str) -> str:
    return f"{det} {animal} home {home} ."


def sentences(kind: str, n: int, rng: random.Random) -> list[str]:
    """`n` sentences: ``random`` (both templates, random attributes), ``colour`` or ``home`` facts."""
    out = []
    for _ in range(n):
        det, animal = rng.choice(DETS), rng.choice(ANIMALS)
        if kind == "random" and rng.random() < 0.3:
            # copy sentences keep every colour and home apart at the output (with random attributes
            # alone the base would learn to score them all alike, and no layer could tell them apart)
            word = rng.choice(COLOURS + HOMES)
            out.append(f"{det} {word} {word} .")
        elif kind == "colour" or (kind == "random" and rng.random() < 0.5):
            out.append(_colour(det, animal, COLOUR_OF[animal] if kind == "colour" else rng.choice(COLOURS)))
        else:
            out.append(_home(det, animal, HOME_OF[animal] if kind == "home" else rng.choice(HOMES)))
    return out


def _train(model, tok, kind: str, steps: int, lr: float, layers_only: bool, seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for n, p in model.named_parameters() if not layers_only or ".layers." in n]
    for n, p in model.named_parameters():
        p.requires_grad_(not layers_only or ".layers." in n)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = []
        for _ in range(16):
            # no BOS: lm-eval scores the task queries without one
            ids = tok(" ".join(sentences(kind, 3, rng)), add_special_tokens=False)["input_ids"][:24]
            rows.append(ids + [tok.pad_token_id] * (24 - len(ids)))
        ids = torch.tensor(rows)
        labels = ids.masked_fill(ids == tok.pad_token_id, -100)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)


def _task_docs(kind: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for det in DETS:
        for animal in ANIMALS:
            if kind == "colour":
                query, right, pool = f"{det} {animal} colour", COLOUR_OF[animal], COLOURS
            else:
                query, right, pool = f"{det} {animal} home", HOME_OF[animal], HOMES
            choices = [right, *rng.sample([w for w in pool if w != right], 3)]
            rng.shuffle(choices)
            docs.append({"query": query, "choices": choices, "label": choices.index(right)})
    rng.shuffle(docs)  # lm-eval's `limit` takes the first documents: spread them over the animals
    return docs


def build_setting(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the tokenizer, the base, both variants and both tasks under `root`.

    Returns:
        Paths: ``tok``, ``base``, ``colour``, ``home`` (model directories), ``tasks`` (include path),
        ``calib`` (a text file for Block Influence).
    """
    tok = write_tokenizer(root / "tok")
    base = tiny_model("llama2", seed=seed, num_layers=NUM_LAYERS, hidden=48, heads=4, vocab=64)
    _train(base, tok, "random", steps=150, lr=5e-3, layers_only=False, seed=seed)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for kind in ("colour", "home"):
        v = AutoModelForCausalLM.from_pretrained(root / "base")
        _train(v, tok, kind, steps=100, lr=5e-3, layers_only=True, seed=seed + 1)
        v.save_pretrained(root / kind)
        tok.save_pretrained(root / kind)
    for kind in ("colour", "home"):
        write_choice_task(root / "tasks", f"{kind}_facts", _task_docs(kind, seed), metrics=("acc",))
    calib = root / "calib.txt"
    calib.write_text("\n".join(" ".join(sentences("random", 6, random.Random(seed + i))) for i in range(32)))
    return {
        "tok": root / "tok",
        "base": root / "base",
        "colour": root / "colour",
        "home": root / "home",
        "tasks": root / "tasks",
        "calib": calib,
    }
