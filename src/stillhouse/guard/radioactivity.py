"""Radioactivity: was a suspect model trained on my watermarked outputs? (Sander et al., 2024)

A student fine-tuned on watermarked text learns to prefer the green tokens of the contexts it
saw, so its own next-token choices lean green under the provider's key. Two modes:

- open weights: teacher-force the suspect on probe texts and take its top-1 prediction at every
  position; each (previous token, predicted token) pair is scored once (the same de-duplication
  as text detection, which is what keeps the null binomial: a model that never saw the key picks
  tokens independently of the keyed split). Teacher forcing is one forward pass per probe text,
  so many thousands of pairs cost seconds: power comes from scoring many pairs.
- API only: score the suspect's generations, pairs de-duplicated over all of them.

Sander et al.'s filter (`contexts`): a student only learns the green lists of the contexts it
saw in watermarked text, so scoring only the positions whose previous token occurs as a context
in the provider's own watermarked outputs keeps the signal and drops noise. The filter looks at
the previous token alone, never at the predicted one, so the null stays Binomial(pairs, gamma).

p-values are randomised tails of that binomial (`randomised_p`), not exact ones: the exact tail
P[X >= g] of a discrete count is conservative and step-shaped, which a Kolmogorov-Smirnov test
over many keys notices when a few hundred pairs are scored (KS p = 0.02 on the tiny control
students); the mid-p (half the step) still fails KS over 1000 keys at ~400 pairs. The randomised
tail P[X > g] + U P[X = g] is exactly uniform under the null. Its U is not a coin tossed at run
time but a keyed hash of the scored pairs, so the same suspect, probes and key always give the
same p; it always lies within one binomial step below the exact tail (`Score.z` and the green
count give the rest), and at the thousands of pairs a real vocabulary gives the two agree.
"""

from __future__ import annotations

import math

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


def randomised_p(green_count: int, n: int, u: float, gamma: float = wm.GAMMA) -> float:
    """P[X > g] + u P[X = g] for X ~ Binomial(n, gamma): uniform on [0, 1] under the null when u is
    uniform and independent of g (u = 1: the exact, conservative tail; u = 1/2: the mid-p)."""
    from scipy.stats import binom

    if n == 0:
        return 1.0
    return float(binom.sf(green_count, n, gamma) + u * binom.pmf(green_count, n, gamma))


def pairs_coin(seed: int, prev: np.ndarray, tok: np.ndarray) -> float:
    """A uniform number in [0, 1) from a hash of the key's seed and the scored pairs: reproducible,
    and under a random key independent of which pairs are green (a different hash domain)."""
    import hashlib

    h = hashlib.sha256(b"stillhouse-radioactivity-coin\0" + int(seed).to_bytes(8, "little"))
    h.update(np.ascontiguousarray(prev, np.uint64).tobytes())
    h.update(np.ascontiguousarray(tok, np.uint64).tobytes())
    return int.from_bytes(h.digest()[:8], "little") / 2.0**64


def score_unique(seed: int, prev: np.ndarray, tok: np.ndarray, total: int, gamma: float = wm.GAMMA) -> wm.Score:
    """The test on already de-duplicated pairs: green count, z and the randomised p-value."""
    n = len(prev)
    g = int(wm.green(seed, prev, tok, gamma).sum()) if n else 0
    z = (g - gamma * n) / math.sqrt(n * gamma * (1 - gamma)) if n else 0.0
    return wm.Score(total, n, z, randomised_p(g, n, pairs_coin(seed, prev, tok), gamma), green=g, gamma=gamma)


def null_pvalues(suspects: list[tuple[np.ndarray, np.ndarray, int]], keys_each: int, seed: int = 0,
                 gamma: float = wm.GAMMA) -> list[float]:
    """Calibration: p-values of suspects that never saw these keys, under `keys_each` random keys
    EACH, no key shared between suspects. Under a common key, suspects that score some of the
    same pairs (students of one teacher do) share those pairs' green bits, so their p-values move
    together and a pool of them is not the independent sample a KS test assumes, though each
    suspect's own p-values are uniform: the pooled, shared-key filtered real-model null "failed"
    KS that way (docs/provenance.md)."""
    rng = np.random.default_rng(seed)
    out = []
    for pairs in suspects:
        out += [score_unique(int(k), *pairs, gamma).p_value
                for k in rng.integers(0, 2**64, keys_each, dtype=np.uint64, endpoint=False)]
    return out


def watermark_contexts(sequences: list[list[int]]) -> set[int]:
    """The tokens that served as a watermark context in these (watermarked) token sequences."""
    return {t for s in sequences for t in s[:-1]}


def teacher_forced(model, sequences: list[list[int]], pad_id: int, batch_size: int = 16):
    """Yields (context token ids [positions], logits [positions, vocab]) batch by batch, at every
    position of every sequence but its last (whose prediction has nothing to compare with)."""
    seqs = [s for s in sequences if len(s) > 1]
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b : b + batch_size]
        ids, attn = right_pad(chunk, pad_id)
        positions = attn.bool().clone()
        for r, s in enumerate(chunk):
            positions[r, len(s) - 1] = False
        yield ids[positions], selected_logits(model, ids, attn, positions)


@torch.inference_mode()
def predicted_pairs(model, sequences: list[list[int]], pad_id: int, batch_size: int = 16) -> tuple[list[int], list[int]]:
    """(context token, the model's top-1 next token) at every position of every sequence but the last."""
    prev, pred = [], []
    for ctx, logits in teacher_forced(model, sequences, pad_id, batch_size):
        prev.extend(ctx.tolist())
        pred.extend(logits.argmax(-1).tolist())
    return prev, pred


def score_open_weights(key: str, model, sequences: list[list[int]], pad_id: int, gamma: float = wm.GAMMA,
                       batch_size: int = 16, contexts: set[int] | None = None) -> wm.Score:
    """Teacher-forced radioactivity test of `model` on token-id `sequences` (prompt + text).
    The probe texts must not carry the watermark (a model that predicts a watermarked text well
    would look green without having trained on it)."""
    prev, pred = predicted_pairs(model, sequences, pad_id, batch_size)
    return score_unique(wm.key_seed(key), *wm.distinct_pairs(prev, pred, contexts), gamma)


def score_generations(key: str, completions: list[list[int]], gamma: float = wm.GAMMA,
                      contexts: set[int] | None = None) -> wm.Score:
    """API-only radioactivity: the suspect's generated token ids, pairs de-duplicated over all."""
    return score_unique(wm.key_seed(key), *wm.unique_pairs(completions, contexts), gamma)


@torch.inference_mode()
def context_distributions(model, sequences: list[list[int]], pad_id: int, top_k: int = 32, batch_size: int = 16,
                          contexts: set[int] | None = None) -> dict[int, dict[int, float]]:
    """For each previous token a, the suspect's next-token distribution averaged over every
    teacher-forced position that follows a (its top-`top_k` entries per position)."""
    sums: dict[int, dict[int, float]] = {}
    counts: dict[int, int] = {}
    for ctx, logits in teacher_forced(model, sequences, pad_id, batch_size):
        top_p, top_i = logits.float().softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
        for a, ps, vs in zip(ctx.tolist(), top_p.tolist(), top_i.tolist()):
            if contexts is not None and a not in contexts:
                continue
            counts[a] = counts.get(a, 0) + 1
            row = sums.setdefault(a, {})
            for p, v in zip(ps, vs):
                row[v] = row.get(v, 0.0) + p
    return {a: {v: p / counts[a] for v, p in row.items()} for a, row in sums.items()}


def score_distribution(seed: int, dists: dict[int, dict[int, float]], gamma: float = wm.GAMMA) -> wm.Score:
    """Green probability mass: T = sum over contexts a and tokens v of q_a(v) * green(a, v).

    Uses the suspect's whole (top-k) distribution instead of its top-1 token, so a small
    vocabulary, where few distinct (context, top-1) pairs exist, still gives many scored terms.
    Under the null the green bits are independent Bernoulli(gamma) of weights that do not depend
    on the key: E[T] = gamma * W, Var[T] = gamma (1 - gamma) * sum of squared weights; the p-value
    is the normal tail of that z (checked against random keys in bench/provenance.py; the
    normal tail is an approximation, tight when no single weight dominates)."""
    from scipy.stats import norm

    prev = np.fromiter((a for a, row in dists.items() for _ in row), np.uint64)
    tok = np.fromiter((v for row in dists.values() for v in row), np.uint64)
    w = np.fromiter((p for row in dists.values() for p in row.values()), np.float64)
    if not len(w):
        return wm.Score(0, 0, 0.0, 1.0, green=0, gamma=gamma)
    g = wm.green(seed, prev, tok, gamma)
    z = float((w[g].sum() - gamma * w.sum()) / math.sqrt(gamma * (1 - gamma) * (w**2).sum()))
    return wm.Score(len(dists), len(w), z, float(norm.sf(z)), green=int(g.sum()), gamma=gamma)
