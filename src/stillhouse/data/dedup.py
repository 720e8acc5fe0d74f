"""De-duplication (exact, MinHash near-duplicate) and decontamination against evaluation sets."""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np


def normalize(text: str) -> str:
    return " ".join(str(text).lower().split())


def exact_dedup(rows: list[dict], key: str) -> tuple[list[dict], int]:
    """Keep the first record of each normalised `key` value; return (kept, number removed)."""
    seen, out = set(), []
    for r in rows:
        k = normalize(r[key])
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out, len(rows) - len(out)


def drop_overlap(rows: list[dict], held_out: list[dict], key: str) -> tuple[list[dict], int]:
    """Remove records whose `key` also appears in the held-out set (exact, normalised)."""
    banned = {normalize(r[key]) for r in held_out}
    out = [r for r in rows if normalize(r[key]) not in banned]
    return out, len(rows) - len(out)


# -- near duplicates: MinHash signatures, banded LSH ---------------------------------------
# Written here with numpy (a few dozen lines) rather than adding a dependency. Hashes are
# crc32 and splitmix64, never Python's salted hash(), so the same data dedups the same way on every run.
_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: the unit of shingles and n-grams."""
    return _TOKEN.findall(str(text).lower())


def shingles(text: str, k: int = 3) -> set[int]:
    toks = tokens(text)
    if len(toks) < k:
        return {zlib.crc32(" ".join(toks).encode())}
    return {zlib.crc32(" ".join(toks[i : i + k]).encode()) for i in range(len(toks) - k + 1)}


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm whose S-curve midpoint (1/b)^(1/r) is nearest
    the Jaccard threshold."""
    best = min(
        ((b, num_perm // b) for b in range(1, num_perm + 1)),
        key=lambda br: abs((1 / br[0]) ** (1 / br[1]) - threshold),
    )
    return best


class MinHasher:
    """`num_perm` independent hash functions (splitmix64 of the shingle xor a per-function seed);
    the signature is each function's minimum over the shingles. A linear (a*x + b) mod p with
    small a is not enough here: its minimum favours small x and biases the estimate low."""

    def __init__(self, num_perm: int = 64, seed: int = 1):
        self.seeds = np.random.default_rng(seed).integers(0, np.iinfo(np.uint64).max, num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        x = np.fromiter(shingles(text), dtype=np.uint64)
        with np.errstate(over="ignore"):  # wrap-around multiplication is the point
            z = self.seeds[:, None] ^ x[None, :]
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
        return z.min(axis=1)


class NearDuplicates:
    """Streaming near-duplicate detector: `seen(text)` is True when an earlier text has
    estimated Jaccard similarity (over word 3-gram shingles) of at least `threshold`."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 64):
        self.threshold = threshold
        self.hasher = MinHasher(num_perm)
        self.bands, self.rows = lsh_bands(num_perm, threshold)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.sigs: list[np.ndarray] = []

    def seen(self, text: str, add: bool = True) -> bool:
        sig = self.hasher.signature(text)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {j for band, key in zip(self.buckets, keys) for j in band.get(key, ())}
        if any(float(np.mean(self.sigs[j] == sig)) >= self.threshold for j in candidates):
            return True
        if add:
            for band, key in zip(self.buckets, keys):
                band.setdefault(key, []).append(len(self.sigs))
            self.sigs.append(sig)
        return False


# -- decontamination: n-gram overlap with evaluation sets ----------------------------------
class Contamination:
    """Flags texts sharing an n-gram (of `tokens`) with any evaluation text. An evaluation text
    shorter than n tokens is matched whole, as a contiguous run of tokens."""

    def __init__(self, eval_texts: list[str], n: int = 8):
        self.n = n
        self.grams: dict[int, set[tuple[str, ...]]] = {}
        for t in eval_texts:
            toks = tokens(t)
            m = min(n, len(toks))
            if m == 0:
                continue
            self.grams.setdefault(m, set()).update(tuple(toks[i : i + m]) for i in range(len(toks) - m + 1))

    def __call__(self, text: str) -> bool:
        toks = tokens(text)
        return any(
            tuple(toks[i : i + m]) in grams for m, grams in self.grams.items() for i in range(len(toks) - m + 1)
        )


class RecordFilter:
    """The dedup and decontamination a dataset stage applies as its shards are merged.

    `key(row)` is the text compared for duplicates, `prompt(row)` the text checked against the
    evaluation sets; `counts` says how many records each step removed.
    """

    def __init__(self, *, dedup: str = "off", near_threshold: float = 0.8, eval_texts: list[str] | None = None,
                 ngram: int = 8, key=lambda r: r["prompt"], prompt=lambda r: r["prompt"]):
        self.dedup, self.key, self.prompt = dedup, key, prompt
        self.exact: set[bytes] = set()
        self.near = NearDuplicates(near_threshold) if dedup == "near" else None
        self.contaminated = Contamination(eval_texts, ngram) if eval_texts else None
        self.counts = {"removed_duplicates": 0, "removed_near_duplicates": 0, "removed_eval_overlap": 0}

    def prime(self, texts: list[str]) -> None:
        """Texts that count as already seen (seed prompts), without counting them as removed."""
        for text in texts:
            self.exact.add(hashlib.blake2b(normalize(text).encode(), digest_size=16).digest())
            if self.near is not None:
                self.near.seen(text)

    def __call__(self, row: dict) -> bool:
        if self.contaminated is not None and self.contaminated(self.prompt(row)):
            self.counts["removed_eval_overlap"] += 1
            return False
        if self.dedup == "off":
            return True
        text = self.key(row)
        digest = hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()
        if digest in self.exact:
            self.counts["removed_duplicates"] += 1
            return False
        self.exact.add(digest)
        if self.near is not None and self.near.seen(text):
            self.counts["removed_near_duplicates"] += 1
            return False
        return True
