"""Row bookkeeping of batched self-speculative decoding: masks, positions, acceptance, finished rows.

``shared/speculative.py`` runs one loop for every batch size. Its caches stay rectangular: every
row drafts the same ``k`` tokens, the full model verifies all rows in one forward, and every row
keeps the same number of tokens, ``m + 1``, where ``m`` is the smallest accepted prefix over the
rows still running. The helpers here hold what differs from row to row.

Why the truncation keeps the output exact, greedy: the full model's argmax at positions
0..m is what greedy decoding emits; for every row, positions 0..m-1 are accepted drafts (each row
accepted at least m), which equal that argmax, and position m is the argmax itself.

Sampling, for one row: the standard acceptance rule gives tokens Y_0, Y_1, ... (the accepted
drafts, then the residual draw at the first rejection, or the bonus draw after the last draft).
Two facts make any cut at m + 1 tokens exact. (1) Given every draw of every row at positions
before j, and that this row accepted its drafts before j, Y_j (the draft if accepted, else the
residual draw) is distributed as the full model's warped distribution p(. | prompt, Y_<j): the
single-step lemma of Leviathan et al. (2023), whatever happened in the other rows, whose draws are
independent of this row's. (2) Whether the batch stops after position j (m = j) is decided by the
acceptance draws at positions <= j of all rows, so m is a stopping time, and m never exceeds the
row's own accepted prefix, so every kept token is one the rule produced (where m stops at an
accepted draft, that draft is Y_m). A sequence whose every token follows p given all earlier
draws, stopped at a stopping time and continued from the kept prefix with p (the next round),
follows p from start to end: by induction over positions, every prefix y_<=j has probability
p(y_<=j), whether it is completed inside this round or after the cut. The single-row rule is
the case where the stopping time is the row's own accepted prefix; the batch's minimum is another.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import LogitsProcessorList


def check_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The left-padding mask to pass to the forwards, or None where no token is padding.

    Raises:
        ValueError: `attention_mask` has another shape than `input_ids`, values other than 0 and
            1, a row with no token, or padding anywhere but on the left.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        shape = (
            tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        )
        raise ValueError(
            f"attention_mask: shape {shape}; must be a tensor of input_ids' shape {tuple(input_ids.shape)}"
        )
    mask = attention_mask.to(device=input_ids.device)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask: values must be 0 (padding) and 1 (token)")
    mask = mask.long()
    if not bool(mask[:, -1].all()):
        raise ValueError(
            "attention_mask: a row ends with padding (right padding, or a row with no token); "
            "pad prompts on the left, as generate takes them (tokenizer.padding_side = 'left')"
        )
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "attention_mask: padding inside a row; only left padding (zeros before the tokens) is allowed"
        )
    return None if bool(mask.all()) else mask


def forward_inputs(ids: torch.Tensor, mask: torch.Tensor | None, seen: int) -> dict[str, torch.Tensor | None]:
    """input_ids of the tokens after the first `seen`, with the mask and positions over all of them.

    Positions follow the mask as ``generate`` computes them (cumulative sum - 1, padding at 1), so
    a left-padded row gets the logits it would get unpadded.
    """
    if mask is None:
        return {"input_ids": ids[:, seen:]}
    full = torch.cat([mask, mask.new_ones((mask.shape[0], ids.shape[1] - mask.shape[1]))], dim=1)
    positions = (full.cumsum(-1) - 1).masked_fill_(full == 0, 1)
    return {"input_ids": ids[:, seen:], "attention_mask": full, "position_ids": positions[:, seen:]}


def accept(
    logits: torch.Tensor,
    drafted: torch.Tensor,
    q_probs: torch.Tensor | None,
    warp: LogitsProcessorList | None,
    generator: torch.Generator | None,
    running: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each row's accepted prefix and the tokens every row keeps.

    Args:
        logits: (b, k + 1, vocab), the full model's at the positions that predict each draft
            token and the one after the last.
        drafted: (b, k) draft tokens; q_probs: (b, k, vocab) their draft distributions (sampling).
        warp: the sampling warpers, None for greedy.
        generator: random source of the acceptance and residual draws.
        running: (b,) rows that have not finished; the others' tokens are replaced later.

    Returns:
        (b, m + 1) kept tokens, the (b,) accepted prefix of every row (0 for finished rows) and
        m, the smallest accepted prefix over the running rows.

    Greedy: keep the drafts that equal the full model's argmax, then its argmax. Sampling, row by
    row: keep draft x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection draw
    from normalise(max(0, p_i - q_i)); if all are kept, draw from p_{k+1}. See the module
    docstring for why cutting every row at m + 1 tokens keeps the output exact.
    """
    b, k = drafted.shape
    if warp is None:
        target = logits.argmax(dim=-1)
        prefix = (target[:, :k] == drafted).int().cumprod(1).sum(1)
        prefix = prefix.masked_fill(~running, k)
        m = int(prefix.min())
        return target[:, : m + 1], prefix.masked_fill(~running, 0), m
    flat = logits.reshape(b * (k + 1), -1).float()
    p = torch.softmax(warp(drafted.reshape(1, -1), flat), dim=-1).view(b, k + 1, -1)
    rows: list[torch.Tensor | None] = []
    prefix = torch.zeros(b, dtype=torch.long)
    for r in range(b):
        if not running[r]:
            rows.append(None)
            continue
        rows.append(_accept_row(p[r], drafted[r], q_probs[r] if k else None, generator))
        prefix[r] = rows[-1].numel() - 1
    m = int(prefix[running.cpu()].min())
    pad = drafted.new_zeros(m + 1)
    return torch.stack([pad if t is None else t[: m + 1] for t in rows]), prefix.to(drafted.device), m


def _accept_row(
    p: torch.Tensor, drafted: torch.Tensor, q_probs: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One row's accepted drafts and its residual (or bonus) token, per the speculative-sampling rule."""
    k = drafted.numel()
    for i in range(k):
        x = drafted[i]
        ratio = p[i, x] / q_probs[i, x]
        if torch.rand((), generator=generator, device=ratio.device) >= ratio:
            residual = (p[i] - q_probs[i]).clamp_min(0)
            # p == q makes the ratio 1 and rejection impossible; the fallback only guards rounding.
            residual = residual if residual.sum() > 0 else p[i]
            tok = torch.multinomial(residual / residual.sum(), 1, generator=generator)
            return torch.cat([drafted[:i], tok])
    tok = torch.multinomial(p[k], 1, generator=generator)
    return torch.cat([drafted, tok])


def finish_rows(
    new: torch.Tensor, done: torch.Tensor, eos: torch.Tensor | None, pad: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad every token after a row's end-of-sequence token, mark those rows done, cut the round short
    where the last running row finished in it (as ``generate`` stops).

    Args:
        new: (b, n) tokens of this round; done: (b,) rows finished before it.
        eos: the end-of-sequence ids (None: never stop); pad: the token finished rows emit.

    Returns:
        The tokens to append and the rows finished after this round.
    """
    if eos is None:
        return new, done
    hit = torch.isin(new, eos) & ~done[:, None]
    after = (hit.int().cumsum(1) - hit.int()) > 0  # strictly after the row's first end token
    new = new.masked_fill(after | done[:, None], pad)
    ended = hit.any(1)
    now_done = done | ended
    if bool(now_done.all()) and bool(ended.any()):
        first = hit.int().argmax(1)  # first end token of the rows that ended in this round
        new = new[:, : int(first[ended].max()) + 1]
    return new, now_done
