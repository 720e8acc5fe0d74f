"""Evaluation metrics and reference verifiers against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from stillhouse.eval.metrics import (agreement, bootstrap_ci, fraction_of, mean_pass_at_k, pass_at_k, per_token_kl,
                                     perplexity)
from stillhouse.verify.reference import ExactMatch, NumericMatch, RougeL, reference_verifier
from stillhouse.errors import StillhouseError


def test_pass_at_k_hand_cases():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # fewer than k failures: some k-subset always passes
    assert mean_pass_at_k([(5, 2), (4, 4)], 2) == pytest.approx((0.7 + 1.0) / 2)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_pass_at_k_matches_enumeration():
    """The estimator equals the share of k-subsets of the n samples that contain a pass."""
    from itertools import combinations

    outcomes = [1, 0, 0, 1, 0, 0]
    for k in (1, 2, 3):
        subsets = list(combinations(outcomes, k))
        assert pass_at_k(len(outcomes), sum(outcomes), k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_bootstrap_ci():
    assert bootstrap_ci([1] * 20) == (1.0, 1.0)
    assert bootstrap_ci([0] * 20) == (0.0, 0.0)
    x = [0, 1] * 50  # mean 0.5, standard error 0.05: a 95% interval about 0.5 +- 0.098
    lo, hi = bootstrap_ci(x, seed=3)
    assert 0.38 < lo < 0.42 and 0.58 < hi < 0.62
    assert bootstrap_ci(x, seed=3) == (lo, hi)  # seeded: reports are reproducible
    lo90, hi90 = bootstrap_ci(x, seed=3, level=0.9)
    assert lo < lo90 < 0.5 < hi90 < hi
    assert bootstrap_ci([]) == (0.0, 0.0)


def test_agreement_perplexity_fraction():
    assert agreement({"a": "1", "b": "2"}, {"a": "1 ", "b": "3", "c": "4"}) == pytest.approx(1 / 3)
    assert agreement({}, {}) == 0.0
    assert perplexity(3 * math.log(4), 3) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
    assert fraction_of(2.0, 4.0) == 0.5
    assert fraction_of(1.0, 0.0) is None and fraction_of(None, 1.0) is None


def test_per_token_kl_hand_case():
    teacher = torch.tensor([[0.0, math.log(3)], [1.0, 1.0]])  # p = (1/4, 3/4) and (1/2, 1/2)
    student = torch.zeros(2, 2)  # q = (1/2, 1/2)
    kl = per_token_kl(student, teacher)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl.tolist() == pytest.approx([expected, 0.0], abs=1e-6)


def test_text_nll_matches_full_forward(tiny):
    """Perplexity bookkeeping (right padding, shifted targets) against a plain forward pass per text."""
    from stillhouse.eval.measure import text_nll
    from stillhouse.teachers.hf import encode_prompt

    texts = ["12 + 30 = 42", "a much longer text than the other one", "xy"]
    total, n = text_nll(tiny.model, tiny.tokenizer, texts, batch_size=2)
    ref_total, ref_n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([encode_prompt(tiny.tokenizer, t)])
            logits = tiny.model(input_ids=ids).logits[0, :-1]
            ref_total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            ref_n += ids.size(1) - 1
    assert n == ref_n
    assert total == pytest.approx(ref_total, rel=1e-4)


def test_reference_verifiers():
    rec = {"answer": "Paris"}
    assert ExactMatch()(rec, "The answer is paris.").passed
    assert not ExactMatch()(rec, "The answer is Lyon").passed
    num = {"answer": "1,234.5"}
    assert NumericMatch()(num, "so we get 1234.50 in total").passed
    assert not NumericMatch()(num, "1234.6").passed
    assert not NumericMatch()(num, "no digits here").passed
    v = RougeL(threshold=0.5)({"answer": "the cat sat on the mat"}, "the cat on mat")
    assert v.score == pytest.approx(0.8)  # LCS 4: precision 4/4, recall 4/6
    assert v.passed
    assert not RougeL(threshold=0.9)({"answer": "the cat sat on the mat"}, "the cat on mat").passed
    with pytest.raises(StillhouseError, match="unknown verifier 'fuzzy'"):
        reference_verifier("fuzzy")
