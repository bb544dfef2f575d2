"""On a small trained model, pruned in rows and columns to 20% and 30%: Surgeon < K-OBD < magnitude.

The paper's ordering of perplexities, measured on a character-level LLaMA trained here for a few
hundred steps on the Python standard library's docstrings (local text, no download), pruned over
a 6-shot linear schedule with curvature re-estimated each shot.
"""

from __future__ import annotations

import copy

import torch

from flexigpt.corpus import extract_pieces, is_heldout, passages, source_files, stdlib_root
from flexigpt.prune.surgeon.shot import ShotOptions, prune_shot
from flexigpt.shared.engine.tiny import tiny_model
from flexigpt.shared.evaluate.perplexity import perplexity


def _stdlib_chars(max_files: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    root = stdlib_root()
    train, held = [], []
    for path in source_files(root)[:max_files]:
        pieces = extract_pieces(path.read_text(errors="ignore"))
        (held if is_heldout(str(path.relative_to(root)), 10) else train).extend(passages(pieces))

    def chars(texts: list[str]) -> torch.Tensor:
        data = "\n".join(texts).encode("utf-8", "ignore")
        return torch.tensor([b for b in data if 0 < b < 128], dtype=torch.long)

    return chars(train), chars(held)[:12_000]


def _trained(tokens: torch.Tensor, steps: int = 250, seq_len: int = 64, batch: int = 16) -> torch.nn.Module:
    model = tiny_model("llama2", num_layers=3, hidden=64, heads=4, intermediate=176, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([tokens[s : s + seq_len] for s in starts])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def test_surgeon_beats_k_obd_beats_magnitude_at_20_and_30_percent() -> None:
    torch.manual_seed(0)
    train, held = _stdlib_chars()
    model = _trained(train)
    gen = torch.Generator().manual_seed(1)
    samples = [train[s : s + 64][None] for s in torch.randint(0, len(train) - 64, (32,), generator=gen)]
    dense = perplexity(model, held, context_len=64, stride=64, progress=False).ppl
    ppl: dict[str, dict[int, float]] = {}
    for method in ("surgeon", "k_obd", "magnitude"):
        m = copy.deepcopy(model)
        ppl[method] = {}
        for shot in range(1, 7):
            res = prune_shot(m, samples, shot * 0.05, ShotOptions(method=method), log=lambda *a, **k: None)
            assert res.zeroed <= int(shot * 0.05 * res.total)
            if shot in (4, 6):
                ppl[method][shot * 5] = perplexity(m, held, context_len=64, stride=64, progress=False).ppl
    print(f"dense {dense:.3f}; " + "; ".join(f"{k}: {v}" for k, v in ppl.items()))
    for sparsity in (20, 30):
        assert dense < ppl["surgeon"][sparsity] < ppl["k_obd"][sparsity] < ppl["magnitude"][sparsity]
