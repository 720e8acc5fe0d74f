"""A keyed green-list watermark (Kirchenbauer et al., 2023) and its detector.

At each decoding step the vocabulary is split, by a keyed hash of the previous token, into a
"green" share `gamma` and the rest; `delta` is added to the green logits, so a watermarked text
holds more green tokens than chance. Without the key the split looks random; with it, a
one-sided binomial test on the green count says how unlikely that many green tokens are for
text written without the watermark.

The split is a pure function of (key, previous token, token): a 64-bit mix (splitmix64's
finaliser) of the key's hash and the two ids, so the generator and the detector need nothing
but the key, and a whole vocabulary row is one vectorised numpy expression. Detection counts
each distinct (previous token, token) pair once: repeated n-grams (a list, a copied phrase)
are not independent draws, and counting them again would inflate z for text that merely
repeats itself (Kirchenbauer et al. sec. 7; Fernandez et al., 2023). With that de-duplication
the green count of unwatermarked text under any key is exactly Binomial(pairs, gamma), which
is what the calibration in bench/provenance.py checks.

Keys are secrets: 32 to 128 hex characters (`new_key()` makes a 256-bit one). They never reach
logs or errors; `key_id` names a key (first 8 hex of its SHA-256) where one must be named.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import StillhouseError

KEY_RE = re.compile(r"^[0-9a-fA-F]{32,128}$")
GAMMA = 0.25  # green share of the vocabulary (the paper's default)
DELTA = 2.0  # logit bias on green tokens (the paper's default)

_C_PREV = np.uint64(0x9E3779B97F4A7C15)
_C_TOK = np.uint64(0xC2B2AE3D27D4EB4F)


def new_key() -> str:
    return secrets.token_hex(32)


def check_key(key: str) -> str:
    """The key, stripped, if it has the right format; else a one-line error (never echoing it)."""
    key = (key or "").strip()
    if not KEY_RE.match(key):
        raise StillhouseError(
            f"watermark key must be 32-128 hex characters (got {len(key)} characters); make one with `stillhouse guard keygen`"
        )
    return key.lower()


def key_id(key: str) -> str:
    return hashlib.sha256(check_key(key).encode()).hexdigest()[:8]


def key_seed(key: str) -> int:
    """The 64-bit secret the hash is keyed with (domain-separated from key_id)."""
    return int.from_bytes(hashlib.sha256(b"stillhouse-watermark\0" + check_key(key).encode()).digest()[:8], "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 whose output bits all depend on every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def green(seed: int, prev: np.ndarray, tok: np.ndarray, gamma: float = GAMMA) -> np.ndarray:
    """Whether each `tok` is green after `prev` under the keyed split (arrays broadcast)."""
    prev = np.asarray(prev, dtype=np.uint64)
    tok = np.asarray(tok, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(np.uint64(seed) ^ (prev * _C_PREV) ^ _mix(tok * _C_TOK))
    return (h >> np.uint64(11)).astype(np.float64) < gamma * float(1 << 53)


@lru_cache(maxsize=8)
def _vocab(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint64)


def green_mask(seed: int, prev: np.ndarray, vocab_size: int, gamma: float = GAMMA) -> np.ndarray:
    """Bool [len(prev), vocab_size]: the green list after each previous token."""
    return green(seed, np.asarray(prev, dtype=np.uint64)[:, None], _vocab(vocab_size)[None, :], gamma)


class WatermarkProcessor:
    """Adds `delta` to the green logits after the previous token. transformers' LogitsProcessor
    signature, `(input_ids [rows, seq], scores [rows, vocab]) -> scores`, so it plugs into
    `model.generate(logits_processor=[...])` as well as stillhouse's own decode loop."""

    def __init__(self, key: str, gamma: float = GAMMA, delta: float = DELTA, confident: float = 1.0):
        if not 0 < gamma < 1:
            raise StillhouseError(f"watermark gamma must be in (0, 1), got {gamma}")
        if not 0 < confident <= 1:
            raise StillhouseError(f"watermark confident must be in (0, 1], got {confident}")
        self.seed = key_seed(key)
        self.key_id = key_id(key)
        self.gamma, self.delta = gamma, delta
        # Steps where the model's top token already has probability > `confident` are left
        # alone (1.0: never): an answer's forced tokens (digits of a sum) keep their accuracy.
        # The detector needs no change: skipped steps are scored like unwatermarked text, which
        # lowers power but leaves the null exactly binomial.
        self.confident = confident

    def __call__(self, input_ids, scores):
        import torch

        prev = input_ids[:, -1].cpu().numpy()
        mask = torch.from_numpy(green_mask(self.seed, prev, scores.shape[-1], self.gamma)).to(scores.device)
        bias = self.delta * mask.to(scores.dtype)
        if self.confident < 1.0:
            sure = scores.float().softmax(-1).amax(-1) > self.confident
            bias = bias.masked_fill(sure[:, None], 0.0)
        return scores + bias

    def __repr__(self) -> str:  # never the key
        return f"WatermarkProcessor(key_id={self.key_id}, gamma={self.gamma}, delta={self.delta}, confident={self.confident})"


@dataclass(frozen=True)
class Score:
    """A detection: `green` of `scored` distinct (previous, token) pairs; `tokens` before de-dup."""

    tokens: int
    scored: int
    green: int
    gamma: float
    z: float
    p_value: float

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "scored": self.scored, "green": self.green, "gamma": self.gamma,
                "z": self.z, "p_value": self.p_value}


def binomial_test(green_count: int, n: int, gamma: float = GAMMA) -> tuple[float, float]:
    """(z, p): the z-score of `green_count` green among `n` and the exact one-sided binomial
    p-value P[Binomial(n, gamma) >= green_count] (the normal approximation is poor at the small
    counts of a short answer and in the far tail)."""
    from scipy.stats import binom

    if n == 0:
        return 0.0, 1.0
    z = (green_count - gamma * n) / math.sqrt(n * gamma * (1 - gamma))
    return z, float(binom.sf(green_count - 1, n, gamma))


def unique_pairs(sequences: list[list[int]], seen: set | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(prev, tok, total) for the distinct (previous, token) pairs of `sequences` (each
    sequence's first token has no known context and is skipped); `seen` carries the de-dup
    across calls."""
    seen = set() if seen is None else seen
    prev, tok, total = [], [], 0
    for seq in sequences:
        for a, b in zip(seq[:-1], seq[1:]):
            total += 1
            if (a, b) not in seen:
                seen.add((a, b))
                prev.append(a)
                tok.append(b)
    return np.asarray(prev, dtype=np.uint64), np.asarray(tok, dtype=np.uint64), total


def score_pairs(seed: int, prev: np.ndarray, tok: np.ndarray, total: int, gamma: float = GAMMA) -> Score:
    g = int(green(seed, prev, tok, gamma).sum()) if len(prev) else 0
    z, p = binomial_test(g, len(prev), gamma)
    return Score(total, len(prev), g, gamma, z, p)


def score_ids(key: str, sequences: list[list[int]], gamma: float = GAMMA) -> Score:
    """Detection on token-id sequences (pairs de-duplicated over all of them)."""
    prev, tok, total = unique_pairs(sequences)
    return score_pairs(key_seed(key), prev, tok, total, gamma)


def detect(key: str, texts: list[str], tokenizer, gamma: float = GAMMA) -> Score:
    """Detection on texts, tokenised without special tokens by the watermarking model's tokenizer."""
    return score_ids(key, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], gamma)


def processor_from_env(var: str, gamma: float = GAMMA, delta: float = DELTA) -> WatermarkProcessor:
    """The serving-side processor, its key read from environment variable `var`."""
    import os

    key = os.environ.get(var)
    if not key:
        raise StillhouseError(f"watermark key variable {var} is not set (or empty)")
    return WatermarkProcessor(key, gamma, delta)
