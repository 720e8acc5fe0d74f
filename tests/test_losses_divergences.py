"""Every divergence, dense and sparse, against slow float64 references written from the definitions."""

from __future__ import annotations

import math

import pytest
import torch

from stillhouse.train.losses import (
    DIVERGENCES,
    LossTerm,
    TopK,
    cross_entropy,
    divergence,
    mixture,
    terms_from_weights,
)


def per_token(name: str, s, t) -> torch.Tensor:
    """The divergence at each position: `divergence` over a one-position mask."""
    with torch.no_grad():
        return torch.stack([divergence(name, s, t, torch.arange(len(s)) == i) for i in range(len(s))])


N, V = 9, 13
NAMES = list(DIVERGENCES)


def softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_div(name, p, q, beta=0.5, alpha=0.1):
    """p: teacher, q: student (lists of probabilities over one support)."""
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_forward_kl":
        return kl(p, [alpha * a + (1 - alpha) * b for a, b in zip(p, q)])
    if name == "skew_reverse_kl":
        return kl(q, [alpha * b + (1 - alpha) * a for a, b in zip(p, q)])
    if name == "tv":
        return 0.5 * sum(abs(a - b) for a, b in zip(p, q))
    raise KeyError(name)


def ref_dense(name, s, t, temperature=1.0, **kw):
    vals = [
        ref_div(name, softmax([x / temperature for x in t[i].tolist()]), softmax([x / temperature for x in s[i].tolist()]), **kw)
        for i in range(s.size(0))
    ]
    return sum(vals) / len(vals) * temperature**2


def ref_sparse(name, s, ids, lps, rest, temperature=1.0, **kw):
    """Buckets: the teacher's top-k tokens, then one bucket for all the others."""
    vals = []
    for i in range(s.size(0)):
        q_full = softmax([x / temperature for x in s[i].double().tolist()])
        top = ids[i].tolist()
        q = [q_full[j] for j in top] + [1.0 - sum(q_full[j] for j in top)]
        p = [math.exp(x) for x in lps[i].double().tolist()] + [float(rest[i])]
        p = [x ** (1 / temperature) for x in p]
        p = [x / sum(p) for x in p]
        vals.append(ref_div(name, p, q, **kw))
    return sum(vals) / len(vals) * temperature**2


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(99)
    return torch.randn(N, V, generator=g) * 2.0, torch.randn(N, V, generator=g) * 2.5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.6])
def test_dense_divergence_matches_reference(pair, name, temperature):
    s, t = pair
    got = divergence(name, s, t, temperature=temperature)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(ref_dense(name, s.double(), t.double(), temperature), rel=1e-4, abs=1e-6)
    assert got.item() > 0
    # identical distributions: zero
    assert divergence(name, s, s.clone(), temperature=temperature).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_and_limits(pair, beta):
    s, t = pair
    got = divergence("jsd", s, t, beta=beta).item()
    assert got == pytest.approx(ref_dense("jsd", s.double(), t.double(), beta=beta), rel=1e-4)
    # beta = 0 / 1 select forward / reverse KL (TRL's GKD convention)
    assert divergence("jsd", s, t, beta=0.0).item() == pytest.approx(divergence("forward_kl", s, t).item(), rel=1e-6)
    assert divergence("jsd", s, t, beta=1.0).item() == pytest.approx(divergence("reverse_kl", s, t).item(), rel=1e-6)
    # JSD is bounded by log 2 (natural log), the KLs are not
    assert got <= math.log(2) + 1e-6


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.8])
def test_skew_alpha(pair, alpha):
    s, t = pair
    for name in ("skew_forward_kl", "skew_reverse_kl"):
        got = divergence(name, s, t, alpha=alpha).item()
        assert got == pytest.approx(ref_dense(name, s.double(), t.double(), alpha=alpha), rel=1e-4)
    # alpha -> 0 recovers the plain KLs
    assert divergence("skew_forward_kl", s, t, alpha=0.0).item() == pytest.approx(divergence("forward_kl", s, t).item(), rel=1e-6)
    assert divergence("skew_reverse_kl", s, t, alpha=0.0).item() == pytest.approx(divergence("reverse_kl", s, t).item(), rel=1e-6)


def topk_with_rest(t, k):
    lp = torch.log_softmax(t, -1)
    v, i = lp.topk(k, -1)
    return TopK(i, v, (1 - v.exp().sum(-1)).clamp(min=0))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k,temperature", [(1, 1.0), (4, 1.0), (6, 2.0), (9, 0.7)])
def test_sparse_divergence_matches_bucket_reference(pair, name, k, temperature):
    s, t = pair
    sig = topk_with_rest(t, k)
    got = divergence(name, s, sig, temperature=temperature)
    ref = ref_sparse(name, s.double(), sig.ids, sig.logprobs, sig.rest.double(), temperature)
    assert got.item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_with_whole_vocabulary_equals_dense(pair, name):
    s, t = pair
    sig = topk_with_rest(t, V)
    assert divergence(name, s, sig).item() == pytest.approx(divergence(name, s, t).item(), rel=1e-4, abs=1e-6)


def test_bucketing_never_increases_forward_kl(pair):
    # coarsening both distributions to k + 1 buckets can only lose information
    s, t = pair
    dense = per_token("forward_kl", s, t)
    for k in (1, 3, 8):
        sparse = per_token("forward_kl", s, topk_with_rest(t, k))
        assert (sparse <= dense + 1e-5).all()


def test_reverse_kl_on_topk_without_rest_is_refused(pair):
    s, t = pair
    v, i = torch.log_softmax(t, -1).topk(4, -1)
    with pytest.raises(ValueError, match="remaining mass"):
        divergence("reverse_kl", s, TopK(i, v))


@pytest.mark.parametrize("name", NAMES)
def test_mask_and_padding_equal_selecting_rows(name):
    g = torch.Generator().manual_seed(5)
    B, L = 3, 6
    s = torch.randn(B, L, V, generator=g)
    t = torch.randn(B, L, V, generator=g)
    lengths = [6, 2, 4]
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, 1:n] = True  # the first token is the prompt, the rest after n is padding
    t[~mask] = 1e6  # garbage in masked positions must not leak
    got = divergence(name, s, t, mask, temperature=1.5, chunk=4)
    ref = ref_dense(name, s[mask].double(), t[mask].double(), 1.5)
    assert got.item() == pytest.approx(ref, rel=1e-4)
    total = divergence(name, s, t, mask, temperature=1.5, reduction="sum")
    assert total.item() == pytest.approx(ref * int(mask.sum()), rel=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_checkpointed_gradient_equals_one_chunk(pair, name):
    s, t = pair
    sig = topk_with_rest(t, 5)
    for teacher in (t, sig):
        grads = []
        for chunk in (2, N):
            x = s.clone().requires_grad_(True)
            divergence(name, x, teacher, temperature=1.3, chunk=chunk).backward()
            assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
            grads.append(x.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_reverse_kl_gradient_matches_autograd_of_reference_formula(pair):
    s, t = pair
    x = s.double().clone().requires_grad_(True)
    q = torch.softmax(x, -1)
    ref = (q * (torch.log_softmax(x, -1) - torch.log_softmax(t.double(), -1))).sum(-1).mean()
    ref.backward()
    y = s.clone().requires_grad_(True)
    divergence("reverse_kl", y, t).backward()
    torch.testing.assert_close(y.grad.double(), x.grad, rtol=1e-4, atol=1e-6)


def test_cross_entropy_ignores_masked_targets():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, V, generator=g)
    y = torch.randint(0, V, (2, 5), generator=g)
    y[0, :2] = -100
    y[1, 4] = -100
    keep = y != -100
    got = cross_entropy(s, y, chunk=3)
    assert got.item() == pytest.approx(torch.nn.functional.cross_entropy(s[keep], y[keep]).item(), rel=1e-6)


def test_mixture_is_weighted_sum_and_logs_each_term(pair):
    s, t = pair
    targets = t.argmax(-1)
    terms = [LossTerm("sft", 0.3), LossTerm("jsd", 0.5, beta=0.2), LossTerm("tv", 0.2), LossTerm("reverse_kl", 0.0)]
    total, parts = mixture(terms, s, targets, t, temperature=1.0)
    assert set(parts) == {"sft", "jsd", "tv"}  # zero-weight terms are not computed
    assert parts["jsd"] == pytest.approx(divergence("jsd", s, t, beta=0.2).item(), rel=1e-6)
    assert total.item() == pytest.approx(0.3 * parts["sft"] + 0.5 * parts["jsd"] + 0.2 * parts["tv"], rel=1e-6)
    # the legacy knobs are SFT + forward KL
    total, parts = mixture(terms_from_weights(0.5, 0.5), s, targets, t)
    assert total.item() == pytest.approx(0.5 * cross_entropy(s, targets).item() + 0.5 * divergence("forward_kl", s, t).item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs a teacher"):
        mixture([LossTerm("forward_kl")], s, targets, None)


@pytest.mark.parametrize("name", NAMES)
def test_padded_topk_rows_equal_shorter_rows(pair, name):
    # a row with fewer entries, padded with -inf log-probs and a repeated id, is that shorter row
    s, t = pair
    sig = topk_with_rest(t, 6)
    short = topk_with_rest(t[:1], 3)
    ids = sig.ids.clone()
    lps = sig.logprobs.clone()
    rest = sig.rest.clone()
    ids[0, 3:] = ids[0, 0]
    lps[0, 3:] = float("-inf")
    rest[0] = short.rest[0]
    padded = per_token(name, s, TopK(ids, lps, rest))
    assert padded[0].item() == pytest.approx(per_token(name, s[:1], short)[0].item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(padded[1:], per_token(name, s[1:], sig[1:]))
    x = s.clone().requires_grad_(True)
    divergence(name, x, TopK(ids, lps, rest)).backward()
    assert torch.isfinite(x.grad).all()


def test_sorted_wasserstein_matches_reference_across_vocabularies():
    from stillhouse.train.losses import sorted_probs, sorted_wasserstein

    g = torch.Generator().manual_seed(11)
    s = torch.randn(5, 13, generator=g).requires_grad_(True)  # student vocabulary 13
    t = torch.randn(5, 21, generator=g) * 2  # teacher vocabulary 21
    for k, temperature in ((21, 1.0), (6, 1.0), (4, 2.0)):
        top, rest = sorted_probs(t, k, temperature)
        got = sorted_wasserstein(s, top, rest, temperature, chunk=2)
        ref = 0.0
        for i in range(5):
            ps = sorted(softmax([x / temperature for x in s[i].tolist()]), reverse=True)
            pt = sorted(softmax([x / temperature for x in t[i].tolist()]), reverse=True)
            ps += [0.0] * (21 - 13)
            ref += sum(abs(a - b) for a, b in zip(ps[:k], pt[:k])) + abs(sum(ps[k:]) - sum(pt[k:]))
        assert got.item() == pytest.approx(ref / 5, rel=1e-5, abs=1e-6)
    got.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # identical sorted distributions (a permuted vocabulary) are at distance zero
    perm = t[:, torch.randperm(21, generator=g)]
    assert sorted_wasserstein(perm, *sorted_probs(t, 21)).item() == pytest.approx(0.0, abs=1e-6)
