"""Radioactivity: was a suspect model trained on my watermarked outputs? (Sander et al., 2024)

A student fine-tuned on watermarked text learns to prefer the green tokens of the contexts it
saw, so its own next-token choices lean green under the provider's key. Two modes:

- open weights: teacher-force the suspect on probe texts and take its top-1 prediction at every
  position; each (previous token, predicted token) pair is scored once (the same de-duplication
  as text detection, which is what keeps the null exactly binomial: a model that never saw the
  key picks tokens independently of the keyed split).
- API only: score the suspect's generations, pairs de-duplicated over all of them.

Both return a `watermark.Score`; the p-value is the one-sided binomial tail.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import StillhouseError
from ..scoring import right_pad, selected_logits
from . import watermark as wm


def check_same_tokenizer(suspect_tok, key_tok, suspect: str) -> None:
    """Green lists are over token ids: the suspect must split text as the watermarking model does."""
    from ..eval.measure import same_tokenizer

    if not same_tokenizer(suspect_tok, key_tok):
        raise StillhouseError(
            f"suspect {suspect} has a different tokenizer from the watermarking model ({len(suspect_tok)} vs "
            f"{len(key_tok)} tokens): open-weights radioactivity needs the same tokenizer; use --mode api"
        )


@torch.inference_mode()
def predicted_pairs(model, sequences: list[list[int]], pad_id: int, batch_size: int = 16) -> tuple[list[int], list[int]]:
    """(context token, the model's top-1 next token) at every position of every sequence but the last."""
    prev, pred = [], []
    seqs = [s for s in sequences if len(s) > 1]
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b : b + batch_size]
        ids, attn = right_pad(chunk, pad_id)
        positions = attn.bool().clone()
        for r, s in enumerate(chunk):
            positions[r, len(s) - 1] = False  # the last token's prediction has no context to compare with here
        top = selected_logits(model, ids, attn, positions).argmax(-1).tolist()
        prev.extend(ids[positions].tolist())
        pred.extend(top)
    return prev, pred


def score_open_weights(key: str, model, sequences: list[list[int]], pad_id: int, gamma: float = wm.GAMMA,
                       batch_size: int = 16) -> wm.Score:
    """Teacher-forced radioactivity test of `model` on token-id `sequences` (prompt + text)."""
    prev, pred = predicted_pairs(model, sequences, pad_id, batch_size)
    seen: set = set()
    keep = [(a, b) for a, b in zip(prev, pred) if not ((a, b) in seen or seen.add((a, b)))]
    p = np.asarray([a for a, _ in keep], dtype=np.uint64)
    t = np.asarray([b for _, b in keep], dtype=np.uint64)
    return wm.score_pairs(wm.key_seed(key), p, t, len(prev), gamma)


def score_generations(key: str, completions: list[list[int]], gamma: float = wm.GAMMA) -> wm.Score:
    """API-only radioactivity: the suspect's generated token ids, pairs de-duplicated over all."""
    return wm.score_ids(key, completions, gamma)
