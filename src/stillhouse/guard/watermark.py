"""Two keyed watermarks and their detectors: the green list (Kirchenbauer et al., 2023) and the
distortion-free Gumbel-max scheme (Aaronson, 2022; docs/watermark.md compares them).

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
from dataclasses import asdict, dataclass
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
class Detection:
    """What every detector reports: `scored` distinct (context, token) pairs of `tokens` seen, the
    z-score and the one-sided p-value of the test on them."""

    tokens: int
    scored: int
    z: float
    p_value: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Score(Detection):
    """A green-list detection: `green` of the `scored` pairs are green (share `gamma` by chance)."""

    green: int = 0
    gamma: float = GAMMA


def binomial_test(green_count: int, n: int, gamma: float = GAMMA) -> tuple[float, float]:
    """(z, p): the z-score of `green_count` green among `n` and the exact one-sided binomial
    p-value P[Binomial(n, gamma) >= green_count] (the normal approximation is poor at the small
    counts of a short answer and in the far tail)."""
    from scipy.stats import binom

    if n == 0:
        return 0.0, 1.0
    z = (green_count - gamma * n) / math.sqrt(n * gamma * (1 - gamma))
    return z, float(binom.sf(green_count - 1, n, gamma))


def distinct_pairs(ctx, tok, contexts: set | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(ctx, tok, total): the distinct (context, token) pairs, in first-seen order, whose context is
    in `contexts` (all if None); `total` counts the pairs before filtering and de-duplication.
    The one place pairs are de-duplicated, for text detection under both schemes and for
    radioactivity: a repeated pair is not a new draw (Fernandez et al., 2023)."""
    seen: set = set()
    keep = [(a, b) for a, b in zip(ctx, tok)
            if (contexts is None or a in contexts) and not ((a, b) in seen or seen.add((a, b)))]
    return (np.fromiter((a for a, _ in keep), np.uint64, len(keep)), np.fromiter((b for _, b in keep), np.uint64, len(keep)),
            len(ctx))


def unique_pairs(sequences: list[list[int]], contexts: set | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """`distinct_pairs` of (previous token, token) over `sequences` (each sequence's first token
    has no known context and is skipped), whose previous token is in `contexts` (all if None)."""
    return distinct_pairs([a for s in sequences for a in s[:-1]], [b for s in sequences for b in s[1:]], contexts)


def score_pairs(seed: int, prev: np.ndarray, tok: np.ndarray, total: int, gamma: float = GAMMA) -> Score:
    g = int(green(seed, prev, tok, gamma).sum()) if len(prev) else 0
    z, p = binomial_test(g, len(prev), gamma)
    return Score(total, len(prev), z, p, green=g, gamma=gamma)


def score_ids(key: str, sequences: list[list[int]], gamma: float = GAMMA) -> Score:
    """Detection on token-id sequences (pairs de-duplicated over all of them)."""
    prev, tok, total = unique_pairs(sequences)
    return score_pairs(key_seed(key), prev, tok, total, gamma)


def detect(key: str, texts: list[str], tokenizer, gamma: float = GAMMA) -> Score:
    """Detection on texts, tokenised without special tokens by the watermarking model's tokenizer."""
    return score_ids(key, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], gamma)


SCHEMES = ("greenlist", "gumbel")


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise StillhouseError(f"unknown watermark scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    return scheme


def processor_from_env(var: str, gamma: float = GAMMA, delta: float = DELTA, scheme: str = "greenlist"):
    """The serving-side watermark (`scheme`: greenlist | gumbel), its key read from environment variable `var`."""
    import os

    check_scheme(scheme)
    key = os.environ.get(var)
    if not key:
        raise StillhouseError(f"watermark key variable {var} is not set (or empty)")
    return GumbelWatermark(key) if scheme == "gumbel" else WatermarkProcessor(key, gamma, delta)


# -- the distortion-free scheme --------------------------------------------------------------
# Gumbel-max sampling picks argmax(logits / T + g) with g_i = -log(-log u_i), u_i ~ U(0, 1): an
# exact sample from softmax(logits / T) (the decode loop already samples this way). Aaronson's
# watermark takes u_i from a keyed hash of (the last CONTEXT tokens, i) instead of a random
# generator. Each answer is still an exact sample of the model's distribution over the key's
# randomness, so sampled accuracy is unchanged in expectation and nothing is biased; but the
# chosen token tends to have a large u, which the key holder can test: under the null (text not
# made with this key) -log(1 - u) of each distinct (context, token) is Exp(1), so their sum over
# n distinct pairs is Gamma(n, 1) exactly. Greedy decoding (T = 0) has no randomness to replace
# and is left unmarked. A context seen before in the same sequence would reuse the same u (and
# push the text into a loop), so such steps draw ordinary noise (SynthID's repeated-context
# masking); the detector still scores them, which can only make its p-value larger.
CONTEXT = 4  # tokens hashed into the context (Kirchenbauer's h); more: fewer repeats, less robust to edits
_GUMBEL_DOMAIN = np.uint64(0x6A09E667F3BCC909)  # keeps one key's two schemes independent


def context_hash(ctx: np.ndarray) -> np.ndarray:
    """uint64 [rows]: a hash of each row of `ctx` [rows, CONTEXT] (the token ids before a step)."""
    ctx = np.asarray(ctx, dtype=np.uint64)
    h = np.zeros(ctx.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(ctx.shape[1]):
            h = _mix(h ^ (ctx[:, j] * _C_TOK) ^ np.uint64(j + 1))
    return h


def stream_seed(seed: int, stream: int) -> int:
    """The seed of sample `stream` among the n samples of one prompt. Aaronson's scheme is a
    deterministic function of (key, context), so n samples under one seed would be n copies of
    one answer; sample j > 0 draws from its own keyed stream instead (sample 0 keeps the key's
    seed, so n = 1 is unchanged), and detection scores the first few streams (`gumbel_score_ids`)."""
    if stream == 0:
        return seed
    with np.errstate(over="ignore"):
        return int(_mix(np.uint64(seed) ^ _mix(np.uint64(stream) * _C_PREV ^ _GUMBEL_DOMAIN)))


def _keyed_unit(seed: int, ctx: np.ndarray, tok_mixed: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = _mix((np.uint64(seed) ^ _GUMBEL_DOMAIN) ^ (ctx * _C_PREV) ^ tok_mixed)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def uniforms(seed: int, ctx: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """The keyed u in (0, 1) of each `tok` after each context hash `ctx` (arrays broadcast)."""
    with np.errstate(over="ignore"):
        tok_mixed = _mix(np.asarray(tok, dtype=np.uint64) * _C_TOK)
    return _keyed_unit(seed, np.asarray(ctx, dtype=np.uint64), tok_mixed)


@lru_cache(maxsize=4)
def _vocab_mixed(n: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix(_vocab(n) * _C_TOK)


def vocab_uniforms(seed: int, ctx: np.ndarray, vocab_size: int) -> np.ndarray:
    """[len(ctx), vocab_size]: `uniforms` of every token after each context hash (the token half
    of the hash is computed once per vocabulary: this runs at every sampled step)."""
    return _keyed_unit(seed, np.asarray(ctx, dtype=np.uint64)[:, None], _vocab_mixed(vocab_size)[None, :])


class GumbelWatermark:
    """The distortion-free watermark as a keyed noise source for the Gumbel-max sampler.

    As a logits processor it changes nothing (`__call__` returns the scores), so it can sit
    wherever a processor goes; samplers that know it (teachers/decode.py, serve/engine.py) ask
    `gumbels(ids, vocab)` for the noise to add to logits / T instead of drawing their own."""

    def __init__(self, key: str, context: int = CONTEXT):
        if context < 1:
            raise StillhouseError(f"watermark context must be at least 1 token, got {context}")
        self.seed = key_seed(key)
        self.key_id = key_id(key)
        self.context = context

    def __call__(self, input_ids, scores):
        return scores

    def gumbels(self, input_ids, vocab_size: int, streams=None, generated=None):
        """(noise [rows, vocab] float32, keyed [rows] bool) for the next step after `input_ids`
        [rows, seq] (left-padded histories); rows not keyed (a repeated or too short context) get
        ordinary noise from the sampler. `streams` [rows] (default all 0): each row's sample index
        among the n samples of its prompt, so that n samples of one prompt differ (`stream_seed`).

        `generated` [rows] (tokens each row has generated so far; None: the histories are answers
        only): a step whose context still reaches into the prompt is not keyed. Those contexts end
        in the chat template's last tokens, the same for every request, so keying them would give
        every answer under one key the same opening (measured: pass@1 -6.2 points on 2,400 gcd
        problems, docs/watermark.md), while the detector, which sees answers only, never scores them."""
        import torch

        ids = input_ids.cpu()
        h = self.context
        rows, seq = ids.shape
        if seq < h:
            return None, torch.zeros(rows, dtype=torch.bool)
        ctx = ids[:, -h:]
        if seq > h:  # has this context occurred earlier in the row?
            unkeyed = (ids.unfold(1, h, 1)[:, :-1] == ctx[:, None, :]).all(-1).any(-1)
        else:
            unkeyed = torch.zeros(rows, dtype=torch.bool)
        if generated is not None:
            unkeyed |= torch.as_tensor(generated).reshape(rows) < h
        hashes = context_hash(ctx.numpy())
        streams = np.zeros(rows, dtype=np.int64) if streams is None else np.asarray(streams, dtype=np.int64)
        u = np.empty((rows, vocab_size))
        for j in np.unique(streams):
            at = streams == j
            u[at] = vocab_uniforms(stream_seed(self.seed, int(j)), hashes[at], vocab_size)
        g = -np.log(-np.log(u))
        return torch.from_numpy(g.astype(np.float32)), ~unkeyed

    def __repr__(self) -> str:  # never the key
        return f"GumbelWatermark(key_id={self.key_id}, context={self.context})"


@dataclass(frozen=True)
class GumbelScore(Detection):
    """A Gumbel detection: `score`, the summed -log(1 - u) of the scored pairs (Gamma(scored, 1) by chance)."""

    score: float = 0.0
    streams: int = 1  # sample streams the test covered (the p-value is corrected for them)
    scheme: str = "gumbel"


def gumbel_test(score: float, n: int) -> tuple[float, float]:
    """(z, p): P[Gamma(n, 1) >= score], exact (the sum of n independent Exp(1) under the null)."""
    from scipy.stats import gamma

    if n == 0:
        return 0.0, 1.0
    return (score - n) / math.sqrt(n), float(gamma.sf(score, n))


def gumbel_score_ids(key: str, sequences: list[list[int]], context: int = CONTEXT, streams: int = 1) -> GumbelScore:
    """Detection of the Gumbel scheme on token-id sequences; each sequence's first `context`
    tokens have no known context and are skipped; (context, token) pairs count once overall.

    `streams` > 1 also covers the other samples of requests with n > 1 (sample j is keyed with
    stream j, `stream_seed`): the pairs are scored under each of the first `streams` streams and
    the best is reported with the Sidak correction 1 - (1 - p_min)^streams, exact because the
    streams' uniforms are independent under the null."""
    if streams < 1:
        raise StillhouseError(f"watermark streams must be at least 1, got {streams}")
    windows = [np.lib.stride_tricks.sliding_window_view(np.asarray(s, dtype=np.uint64), context)[:-1]
               for s in sequences if len(s) > context]
    toks = [t for s in sequences if len(s) > context for t in s[context:]]
    hashes = context_hash(np.concatenate(windows)).tolist() if windows else []
    ctx, tok, total = distinct_pairs(hashes, toks)
    if not len(tok):
        return GumbelScore(total, 0, 0.0, 1.0, streams=streams)
    seed = key_seed(key)
    sums = [float(-np.log1p(-uniforms(stream_seed(seed, j), ctx, tok)).sum()) for j in range(streams)]
    best = max(sums)
    z, p = gumbel_test(best, len(tok))
    return GumbelScore(total, len(tok), z, float(-np.expm1(streams * np.log1p(-p))) if p < 1 else 1.0,
                       score=best, streams=streams)


def detect_text(key: str, texts: list[str], tokenizer, scheme: str = "greenlist", gamma: float = GAMMA, streams: int = 1):
    """Detection on texts under either scheme (tokenised as the watermarking model does);
    `streams`: Gumbel only, how many sample streams to cover (`gumbel_score_ids`)."""
    if check_scheme(scheme) == "greenlist":
        return detect(key, texts, tokenizer, gamma)
    return gumbel_score_ids(key, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], streams=streams)
