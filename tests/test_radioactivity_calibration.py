"""Calibration of the radioactivity p-values on a small fixed set: a suspect whose predictions do
not depend on the key gives uniform p-values over random keys (KS does not reject, FPR at 0.01
at most 2%), where the exact discrete tail visibly does not; the context filter and the
distribution score on known answers."""

from __future__ import annotations

import random

import numpy as np
from scipy.stats import binom, kstest

from stillhouse.guard import radioactivity as ra
from stillhouse.guard import watermark as wm

KEY = "00112233445566778899aabbccddeeff" * 2


def _keys(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["%064x" % rng.getrandbits(256) for _ in range(n)]


def _null_pairs(seed: int = 0, n: int = 400, vocab: int = 100):
    """A key-independent 'suspect': its (context, prediction) pairs drawn without the key."""
    rng = np.random.default_rng(seed)
    return wm.distinct_pairs(rng.integers(0, vocab, n).tolist(), rng.integers(0, vocab, n).tolist())


def test_randomised_p_is_uniform_over_random_keys_where_the_exact_tail_is_not():
    prev, tok, total = _null_pairs()
    scores = [ra.score_unique(wm.key_seed(k), prev, tok, total) for k in _keys(1000, 5)]
    ps = np.array([s.p_value for s in scores])
    exact = np.array([binom.sf(s.green - 1, s.scored, s.gamma) for s in scores])
    assert kstest(ps, "uniform").pvalue > 0.05 and (ps < 0.01).mean() <= 0.02
    assert kstest(exact, "uniform").pvalue < 1e-3  # step-shaped: why the exact tail was dropped
    # never above the exact tail, never below the next step down
    for s, p, e in zip(scores, ps, exact):
        assert binom.sf(s.green, s.scored, s.gamma) - 1e-12 <= p <= e + 1e-12


def test_randomised_p_is_reproducible_and_small_for_a_green_suspect():
    prev, tok, total = _null_pairs(1)
    seed = wm.key_seed(KEY)
    assert ra.score_unique(seed, prev, tok, total).p_value == ra.score_unique(seed, prev, tok, total).p_value
    green = wm.green(seed, prev, tok)
    biased = np.concatenate([np.flatnonzero(green), np.flatnonzero(~green)[: green.sum()]])  # half green
    s = ra.score_unique(seed, prev[biased], tok[biased], len(biased))
    assert s.p_value < 1e-10 and s.z > 6


def test_context_filter_keeps_only_pairs_after_a_watermark_context():
    prev, tok, total = wm.distinct_pairs([1, 2, 1, 3, 2], [5, 6, 5, 7, 9], contexts={1, 2})
    assert total == 5 and prev.tolist() == [1, 2, 2] and tok.tolist() == [5, 6, 9]
    assert ra.watermark_contexts([[1, 2, 3], [4]]) == {1, 2}


def test_null_pvalues_give_every_suspect_keys_of_its_own():
    """Students of one teacher share most of their scored pairs, so under a common key their
    p-values are nearly equal and a pool of them is not an independent sample (what made the
    filtered real-model null fail KS). Two identical suspects must get different keys."""
    pairs = _null_pairs(3)
    ps = ra.null_pvalues([pairs, pairs], 300, seed=2)
    assert len(ps) == 600 and not set(ps[:300]) & set(ps[300:])
    assert kstest(ps, "uniform").pvalue > 0.01 and (np.array(ps) < 0.01).mean() <= 0.02
    assert ra.null_pvalues([pairs], 5, seed=2) == ps[:5]  # seeded: reproducible


def test_distribution_score_null_and_signal():
    rng = np.random.default_rng(2)
    dists = {a: dict(zip(rng.choice(100, 8, replace=False).tolist(), rng.dirichlet(np.ones(8)).tolist())) for a in range(100)}
    ps = np.array([ra.score_distribution(wm.key_seed(k), dists).p_value for k in _keys(300, 9)])
    assert kstest(ps, "uniform").pvalue > 0.01 and (ps < 0.01).mean() <= 0.02
    seed = wm.key_seed(KEY)
    # a suspect that moved 20% of its mass onto the key's green tokens
    tilted = {a: {v: p * (1.2 if wm.green(seed, np.uint64(a), np.uint64(v)) else 0.8) for v, p in row.items()}
              for a, row in dists.items()}
    assert ra.score_distribution(seed, tilted).p_value < 1e-4
