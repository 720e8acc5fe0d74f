"""The distortion-free (Gumbel-max) watermark: it samples the model's own distribution, the key
holder detects it with an exact Gamma p-value, the null is uniform over random keys, and it
works through the decode loop and `guard detect` (`stillhouse serve` with both schemes: test_guard_watermark.py);
n samples of one prompt are keyed with n streams, so they differ and are still detected."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from stillhouse.errors import StillhouseError
from stillhouse.guard import watermark as wm
from stillhouse.teachers.base import SamplingParams
from stillhouse.teachers.decode import gumbel_sample
from stillhouse.teachers.hf import HFTeacher

KEY = "0123456789abcdef" * 4
OTHER = "fedcba9876543210" * 4
PROMPTS = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(12)]


def _generate(lm, processor, temperature=1.0, max_new_tokens=64, seed=0):
    from stillhouse.models import prepare_tokenizer

    prepare_tokenizer(lm.tokenizer)
    t = HFTeacher(lm.model, lm.tokenizer)
    t.logits_processor = processor
    outs = t.generate(PROMPTS, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))
    return [o[0] for o in outs]


def test_keyed_sampling_is_the_models_distribution():
    """Over many contexts the keyed choice follows softmax(logits / T) (chi-square), yet the chosen
    tokens carry large keyed u (the detector's score), which plain sampling does not."""
    from scipy.stats import chisquare

    wmk = wm.GumbelWatermark(KEY)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits.double() / 0.8, -1).numpy()
    n = 4000
    ctx = torch.arange(n * 4).reshape(n, 4) + 1000  # n distinct contexts, none repeated
    noise, keyed = wmk.gumbels(ctx, len(logits))
    assert keyed.all()
    picks = gumbel_sample(logits.expand(n, -1), 0.8, 1.0, torch.Generator().manual_seed(0), (noise, keyed))
    counts = np.bincount(picks.numpy(), minlength=len(logits))
    assert chisquare(counts, probs * n).pvalue > 1e-3
    u = wm.uniforms(wmk.seed, wm.context_hash(ctx.numpy()), picks.numpy())
    assert (-np.log1p(-u)).mean() > 1.3  # Exp(1) has mean 1; the chosen tokens' u are larger
    plain = gumbel_sample(logits.expand(n, -1), 0.8, 1.0, torch.Generator().manual_seed(0))
    assert abs((-np.log1p(-wm.uniforms(wmk.seed, wm.context_hash(ctx.numpy()), plain.numpy()))).mean() - 1) < 0.1


def test_repeated_context_draws_ordinary_noise():
    wmk = wm.GumbelWatermark(KEY, context=2)
    ids = torch.tensor([[5, 6, 7, 5, 6], [1, 2, 3, 4, 5]])  # row 0 ends in (5, 6), seen before
    noise, keyed = wmk.gumbels(ids, 10)
    assert keyed.tolist() == [False, True]
    # the same context gives the same noise (it is a pure function of key, context and token)
    again, _ = wmk.gumbels(torch.tensor([[9, 4, 5]]), 10)
    assert torch.equal(again[0], noise[1])
    assert wmk(ids, torch.zeros(2, 10)).eq(0).all()  # as a logits processor it changes nothing


def test_sampled_answers_are_detected_and_plain_ones_are_not(tiny):
    marked = _generate(tiny, wm.GumbelWatermark(KEY))
    plain = _generate(tiny, None)
    s = wm.gumbel_score_ids(KEY, [c.token_ids for c in marked])
    assert s.p_value < 1e-6 and s.score > 1.3 * s.scored
    assert wm.gumbel_score_ids(KEY, [c.token_ids for c in plain]).p_value > 1e-3
    assert wm.gumbel_score_ids(OTHER, [c.token_ids for c in marked]).p_value > 1e-3
    assert wm.detect_text(KEY, [c.text for c in marked], tiny.tokenizer, "gumbel").p_value < 1e-6
    # Greedy decoding has no randomness to key: the watermark leaves it exactly as it was.
    g_marked = _generate(tiny, wm.GumbelWatermark(KEY), temperature=0.0, max_new_tokens=16)
    g_plain = _generate(tiny, None, temperature=0.0, max_new_tokens=16)
    assert [c.token_ids for c in g_marked] == [c.token_ids for c in g_plain]


def test_steps_whose_context_reaches_into_the_prompt_are_not_keyed(tiny):
    """Such contexts end in the chat template's last tokens, the same for every request: keyed,
    they would give every answer under one key the same opening (the same prompt asked again
    would get the same answer every time). The detector never scores them anyway."""
    wmk = wm.GumbelWatermark(KEY)  # context 4
    ids = torch.arange(40).reshape(4, 10) + 100  # no repeated contexts
    _, keyed = wmk.gumbels(ids, 10, generated=[0, 3, 4, 9])
    assert keyed.tolist() == [False, False, True, True]
    from stillhouse.models import prepare_tokenizer

    prepare_tokenizer(tiny.tokenizer)
    t = HFTeacher(tiny.model, tiny.tokenizer)
    t.logits_processor = wmk
    again = [t.generate(PROMPTS[:1], SamplingParams(max_new_tokens=24, temperature=1.0, seed=s))[0][0].token_ids
             for s in range(6)]
    assert len({tuple(a) for a in again}) == 6
    assert wm.gumbel_score_ids(KEY, again).p_value < 1e-3  # still marked after the opening


@pytest.mark.parametrize("streams", [1, 4])
def test_gumbel_calibration_over_random_keys(streams):
    """Unwatermarked text under 200 random keys: KS does not reject uniformity; FPR(0.01) <= 2%;
    with 4 streams too (the Sidak-corrected best of 4, for requests with n > 1)."""
    from scipy.stats import kstest

    rng = random.Random(11)
    text = [[rng.randrange(5000) for _ in range(300)] for _ in range(3)]
    ps = np.array([wm.gumbel_score_ids("%064x" % rng.getrandbits(256), text, streams=streams).p_value for _ in range(200)])
    assert kstest(ps, "uniform").pvalue > 0.01
    assert (ps < 0.01).mean() <= 0.02


def test_gumbel_test_is_the_gamma_tail_and_pairs_count_once():
    from math import exp

    z, p = wm.gumbel_test(3.0, 1)
    assert p == pytest.approx(exp(-3.0)) and z == pytest.approx(2.0)
    assert wm.gumbel_test(0.0, 0) == (0.0, 1.0)
    once = wm.gumbel_score_ids(KEY, [[1, 2, 3, 4, 5, 6, 7]])
    many = wm.gumbel_score_ids(KEY, [[1, 2, 3, 4, 5, 6, 7]] * 5)
    assert (once.scored, many.scored, many.tokens) == (3, 3, 15) and many.p_value == once.p_value
    with pytest.raises(StillhouseError, match="streams must be at least 1"):
        wm.gumbel_score_ids(KEY, [[1, 2, 3, 4, 5, 6, 7]], streams=0)


def test_n_samples_of_one_prompt_differ_and_are_still_detected(tiny):
    from stillhouse.models import prepare_tokenizer

    prepare_tokenizer(tiny.tokenizer)
    t = HFTeacher(tiny.model, tiny.tokenizer)
    t.logits_processor = wm.GumbelWatermark(KEY)
    outs = t.generate(PROMPTS[:6], SamplingParams(max_new_tokens=64, temperature=1.0, seed=0, n=4))
    assert all(len({tuple(c.token_ids) for c in o}) == 4 for o in outs)  # one stream each: no copies
    later = [o[j].token_ids for o in outs for j in (1, 2, 3)]
    assert wm.gumbel_score_ids(KEY, later, streams=4).p_value < 1e-6
    assert wm.gumbel_score_ids(KEY, later, streams=1).p_value > 1e-3  # keyed on streams 1-3, not on the key's own
    assert wm.gumbel_score_ids(KEY, [o[0].token_ids for o in outs]).p_value < 1e-6  # sample 0: stream 0, as n = 1
    assert wm.gumbel_score_ids(OTHER, [c.token_ids for o in outs for c in o], streams=4).p_value > 1e-3


def test_unknown_scheme_is_one_line(monkeypatch):
    monkeypatch.setenv("WMK", KEY)
    with pytest.raises(StillhouseError, match="unknown watermark scheme 'kgw'"):
        wm.processor_from_env("WMK", scheme="kgw")
    assert isinstance(wm.processor_from_env("WMK", scheme="gumbel"), wm.GumbelWatermark)
    assert KEY not in repr(wm.GumbelWatermark(KEY))


def test_cli_detect_gumbel_and_bad_inputs(tiny, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import json

    from stillhouse.cli import main

    def run(args):
        capsys.readouterr()
        try:
            main(["guard", "detect", *args])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    marked = _generate(tiny, wm.GumbelWatermark(KEY))
    f = tmp_path / "answers.jsonl"
    f.write_text("".join(json.dumps({"text": c.text}) + "\n" for c in marked))
    monkeypatch.setenv("WMK", KEY)
    code, out, err = run(["--file", str(f), "--key-env", "WMK", "--tokenizer", str(tiny_model_dir), "--scheme", "gumbel", "--json"])
    assert code == 0, err
    assert json.loads(out)["p_value"] < 1e-6 and json.loads(out)["scheme"] == "gumbel"
    code, out, err = run(["--file", str(f), "--key", "12345", "--scheme", "gumbel"])
    assert code == 2 and "32-128 hex" in err and len(err.strip().splitlines()) == 1 and "12345" not in err
    code, out, err = run(["--file", str(f), "--key-env", "WMK", "--scheme", "aaronson"])
    assert code == 2 and "unknown watermark scheme 'aaronson'" in err and len(err.strip().splitlines()) == 1
