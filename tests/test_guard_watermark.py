"""The guard's watermark: the keyed split, detection with pair de-duplication, calibration under
random keys, the decode-loop hook, and `stillhouse serve --watermark-key-env` end to end."""

from __future__ import annotations

import random

import httpx
import numpy as np
import pytest
import torch

from stillhouse.errors import StillhouseError
from stillhouse.guard import watermark as wm
from stillhouse.teachers.base import SamplingParams
from stillhouse.teachers.decode import decode
from stillhouse.teachers.hf import HFTeacher

KEY = "0123456789abcdef" * 4
OTHER = "fedcba9876543210" * 4
PROMPTS = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(12)]


def _generate(lm, key: str | None, max_new_tokens=64, seed=0):
    t = HFTeacher(lm.model, lm.tokenizer)
    t.logits_processor = wm.WatermarkProcessor(key) if key else None
    outs = t.generate(PROMPTS, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed))
    return [o[0] for o in outs]


def test_split_is_keyed_deterministic_and_gamma_sized():
    seed = wm.key_seed(KEY)
    a = wm.green_mask(seed, np.arange(50), 4000)
    assert np.array_equal(a, wm.green_mask(seed, np.arange(50), 4000))
    assert abs(a.mean() - wm.GAMMA) < 0.01  # 200k draws: the share is gamma
    b = wm.green_mask(wm.key_seed(OTHER), np.arange(50), 4000)
    assert abs((a == b).mean() - (wm.GAMMA**2 + (1 - wm.GAMMA) ** 2)) < 0.01  # another key: an independent split
    assert not np.array_equal(a[0], a[1])  # the split depends on the previous token


def test_watermarked_text_is_detected_and_plain_text_is_not(tiny):
    from stillhouse.models import prepare_tokenizer

    prepare_tokenizer(tiny.tokenizer)
    marked = _generate(tiny, KEY)
    plain = _generate(tiny, None)
    s = wm.score_ids(KEY, [c.token_ids for c in marked])
    assert s.p_value < 1e-6 and s.z > 5 and s.green / s.scored > 0.5
    assert wm.score_ids(KEY, [c.token_ids for c in plain]).p_value > 1e-3
    assert wm.score_ids(OTHER, [c.token_ids for c in marked]).p_value > 1e-3  # the wrong key sees nothing
    # From text alone (re-tokenised): the same verdict.
    assert wm.detect(KEY, [c.text for c in marked], tiny.tokenizer).p_value < 1e-6


def test_repeated_pairs_count_once():
    seq = [5, 6, 7, 8] * 50
    once = wm.score_ids(KEY, [[5, 6, 7, 8, 5]])
    many = wm.score_ids(KEY, [seq, seq])
    assert many.tokens == 2 * 199 and many.scored == once.scored == 4
    assert (many.green, many.p_value) == (once.green, once.p_value)


def test_binomial_test_matches_the_exact_tail():
    from math import comb

    z, p = wm.binomial_test(7, 10, 0.25)
    assert p == pytest.approx(sum(comb(10, k) * 0.25**k * 0.75 ** (10 - k) for k in range(7, 11)))
    assert z == pytest.approx((7 - 2.5) / (10 * 0.25 * 0.75) ** 0.5)
    assert wm.binomial_test(0, 0) == (0.0, 1.0)


def test_calibration_p_values_are_uniform_over_random_keys():
    """Unwatermarked text under 200 random keys: KS does not reject uniformity, FPR(0.01) <= 2%."""
    from scipy.stats import kstest

    rng = random.Random(7)
    text = [[rng.randrange(5000) for _ in range(400)] for _ in range(3)]  # fixed plain "text"
    ps = np.array([wm.score_ids("%064x" % rng.getrandbits(256), text).p_value for _ in range(200)])
    assert kstest(ps, "uniform").pvalue > 0.01
    assert (ps < 0.01).mean() <= 0.02


@pytest.mark.parametrize("bad", ["", "xyz", "0123", "g" * 64, "0" * 200])
def test_bad_keys_are_rejected_without_echoing_them(bad):
    with pytest.raises(StillhouseError, match="32-128 hex") as e:
        wm.WatermarkProcessor(bad)
    assert (bad not in str(e.value)) or not bad


def test_processor_repr_hides_the_key():
    p = wm.WatermarkProcessor(KEY)
    assert KEY not in repr(p) and p.key_id in repr(p)


def test_decode_hook_sees_each_rows_history(tiny):
    """The processor gets every live row's tokens so far; forcing a token forces the output."""
    seen = []

    def force(ids, logits):
        seen.append(ids.clone())
        out = torch.full_like(logits, -1e9)
        out[:, 7] = 0
        return out

    ids = torch.tensor([[1, 10, 11, 12], [13, 14, 15, 16]])
    rows = decode(tiny.model, ids, torch.ones_like(ids), max_new_tokens=4, stop_ids=[3], logits_processor=force)
    assert [r.token_ids for r in rows] == [[7, 7, 7, 7]] * 2
    assert [s.shape[1] for s in seen] == [4, 5, 6, 7]
    assert seen[-1][:, :4].tolist() == ids.tolist() and seen[-1][:, 4:].eq(7).all()


@pytest.mark.parametrize("scheme", wm.SCHEMES)
def test_serve_watermarks_answers(tiny_model_dir, monkeypatch, scheme):
    """Both schemes through `stillhouse serve`; a request for n = 3 gets three different answers
    (the Gumbel scheme keys sample j with its own stream), all detected."""
    from stillhouse import models
    from stillhouse.serve import ServerThread, build_app

    monkeypatch.setenv("WM_TEST_KEY", KEY)
    app = build_app(str(tiny_model_dir), watermark_key_env="WM_TEST_KEY", watermark_scheme=scheme)
    texts = []
    with ServerThread(app) as url:
        for i in range(6):
            r = httpx.post(f"{url}/chat/completions", timeout=60, json={
                "model": str(tiny_model_dir), "messages": [{"role": "user", "content": f"say {i}"}],
                "max_tokens": 48, "temperature": 1.0, "seed": i, "n": 3 if i == 0 else 1})
            assert r.status_code == 200, r.text
            choices = [c["message"]["content"] for c in r.json()["choices"]]
            if i == 0:
                assert len(set(choices)) == 3, choices
            texts += choices
    tok = models.load(str(tiny_model_dir)).tokenizer
    assert wm.detect_text(KEY, texts, tok, scheme, streams=3).p_value < 1e-6
    assert wm.detect_text(OTHER, texts, tok, scheme, streams=3).p_value > 1e-3


def test_serve_without_the_key_variable_is_one_line(tiny_model_dir, monkeypatch):
    from stillhouse.serve import build_app

    monkeypatch.delenv("WM_MISSING", raising=False)
    with pytest.raises(StillhouseError, match="WM_MISSING is not set"):
        build_app(str(tiny_model_dir), watermark_key_env="WM_MISSING")
    monkeypatch.setenv("WM_MISSING", "not-a-key")
    with pytest.raises(StillhouseError, match="32-128 hex"):
        build_app(str(tiny_model_dir), watermark_key_env="WM_MISSING")


def test_confident_steps_are_left_alone():
    p = wm.WatermarkProcessor(KEY, delta=2.0, confident=0.9)
    scores = torch.zeros(2, 50)
    scores[0, 3] = 20.0  # row 0: one token is near-certain; row 1: flat
    out = p(torch.tensor([[4], [4]]), scores)
    assert torch.equal(out[0], scores[0])
    green = torch.from_numpy(wm.green_mask(p.seed, np.array([4]), 50)[0])
    assert torch.equal(out[1], 2.0 * green.float())
