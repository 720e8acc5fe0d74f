"""The logit cache codec: round trip, narrow types, adaptive entries, error against full logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stillhouse.train.logit_cache import CacheWriter, Codec, decode, encode, kl_error, topk_signal
from stillhouse.train.losses import TopK, divergence


def _logits(n=40, vocab=500, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * scale


def ref_kl_error(full_lp, ids, lq, rest):
    """Explicit loops: q = stored entries (renormalised with rest), rest shared by the others."""
    out = []
    for i in range(full_lp.size(0)):
        p = full_lp[i].double().exp()
        valid = [j for j in range(ids.size(1)) if math.isfinite(lq[i, j])]
        stored = {int(ids[i, j]): math.exp(lq[i, j]) for j in valid}
        z = sum(stored.values()) + float(rest[i])
        other = float(rest[i]) / z / (p.numel() - len(stored))
        total = 0.0
        for v in range(p.numel()):
            q = stored[v] / z if v in stored else other
            total += float(p[v]) * (math.log(float(p[v])) - math.log(q))
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_topk_signal_sorted_with_rest():
    logits = _logits()
    values, ids, rest = topk_signal(logits, 16)
    assert (values[:, :-1] >= values[:, 1:]).all()
    full = torch.log_softmax(logits, -1)
    torch.testing.assert_close(values, full.gather(-1, ids))
    torch.testing.assert_close(rest, 1 - values.exp().sum(-1), atol=1e-6, rtol=1e-5)


def test_round_trip_keeps_ids_exactly_and_values_within_half_a_step():
    codec = Codec(top_k=32, min_prob=0.0)
    logits = _logits()
    values, ids, rest = topk_signal(logits, 32)
    rec = encode(codec, values, ids, rest)
    got_ids, got_lp, got_rest = decode(codec, rec)
    assert got_ids.dtype == np.int64 and got_ids.shape == (40, 32)
    assert (got_ids == ids.numpy()).all()
    # the gaps to the top entry survive to within half a quantisation step
    gaps = (values[:, :1] - values).numpy()
    got_gaps = got_lp[:, :1] - got_lp
    assert np.abs(got_gaps - gaps).max() <= codec.step / 2 + 1e-5
    # the rest mass to within half a step of its log
    assert np.abs(np.log(got_rest) - np.log(rest.numpy())).max() <= codec.rest_step / 2 + 1e-5
    # and the decoded signal is a distribution over the entries plus the rest bucket
    np.testing.assert_allclose(np.exp(got_lp).sum(1) + got_rest, 1.0, rtol=1e-5)
    # narrow types: 2 bytes per id, 1 per gap, 1 count and 1 rest byte per token
    assert len(rec["ids"]) == 2 * 40 * 32 and len(rec["gaps"]) == 40 * 31
    assert len(rec["counts"]) == 40 and len(rec["rest"]) == 40 and rec["ids_hi"] is None


def test_large_vocabulary_ids_use_a_high_byte():
    codec = Codec(top_k=8, min_prob=0.0)
    values, ids, rest = topk_signal(_logits(n=5, vocab=8), 8)
    ids = ids + 151_000  # ids beyond uint16, as in a 152k vocabulary
    rec = encode(codec, values, ids, rest)
    assert rec["ids_hi"] is not None and len(rec["ids_hi"]) == 5 * 8
    got_ids, _, _ = decode(codec, rec)
    assert (got_ids == ids.numpy()).all()


def test_adaptive_entries_drop_only_improbable_tokens_into_rest():
    codec = Codec(top_k=64, min_prob=1e-3)
    logits = _logits(n=30, vocab=300, scale=6.0, seed=3)
    values, ids, rest = topk_signal(logits, 64)
    rec = encode(codec, values, ids, rest)
    got_ids, got_lp, got_rest = decode(codec, rec)
    counts = np.isfinite(got_lp).sum(1)
    expected = np.maximum((values.exp() >= 1e-3).sum(1).numpy(), 1)
    assert (counts == expected).all() and counts.max() < 64
    # padding repeats a kept id, with -inf log-prob
    pads = ~np.isfinite(got_lp)
    assert (got_ids[pads] == np.repeat(got_ids[:, :1], got_lp.shape[1], 1)[pads]).all()
    # the dropped mass moved to the rest bucket
    dropped = (values.exp() * (values.exp() < 1e-3)).sum(1).numpy() + rest.numpy()
    np.testing.assert_allclose(got_rest, dropped, rtol=codec.rest_step)


def test_kl_error_matches_explicit_reference_and_shrinks_with_k():
    logits = _logits(n=6, vocab=60, scale=2.0, seed=5)
    full = torch.log_softmax(logits, -1)
    errors = []
    for k in (2, 8, 30):
        values, ids, rest = topk_signal(logits, k)
        got = kl_error(full, ids, values, rest)
        torch.testing.assert_close(got.double(), ref_kl_error(full, ids, values, rest), rtol=1e-4, atol=1e-6)
        errors.append(got.mean().item())
    assert errors[0] > errors[1] > errors[2] >= 0
    values, ids, rest = topk_signal(logits, 60)
    assert kl_error(full, ids, values, rest).abs().max() < 1e-5  # the whole vocabulary: no error


def test_decoded_cache_feeds_the_sparse_losses(tmp_path):
    import pyarrow.parquet as pq

    codec = Codec(top_k=16, min_prob=1e-4)
    logits = _logits(n=12, vocab=200, scale=3.0, seed=8)
    writer = CacheWriter(tmp_path, codec, shard_records=2)
    for r in range(3):
        values, ids, rest = topk_signal(logits[r * 4 : (r + 1) * 4], 16)
        writer.add(f"rec-{r}", values, ids, rest)
    sizes = writer.close()
    assert writer.shards == ["shard-00000.parquet", "shard-00001.parquet"]
    assert sizes["tokens"] == 12 and sizes["bytes"] == sum((tmp_path / s).stat().st_size for s in writer.shards)
    recs = {r["id"]: r for s in writer.shards for r in pq.read_table(tmp_path / s).to_pylist()}
    ids, lp, rest = (np.concatenate(a) for a in zip(*[_pad(decode(codec, recs[f"rec-{r}"]), 16) for r in range(3)]))
    sig = TopK(torch.from_numpy(ids), torch.from_numpy(lp), torch.from_numpy(rest))
    student = _logits(n=12, vocab=200, scale=3.0, seed=9)
    exact = TopK(*topk_signal(logits, 16)[1::-1], topk_signal(logits, 16)[2])
    for name in ("forward_kl", "reverse_kl", "jsd", "tv"):
        cached = divergence(name, student, sig).item()
        assert cached == pytest.approx(divergence(name, student, exact).item(), rel=0.05, abs=1e-3)


def _pad(decoded, width):
    ids, lp, rest = decoded
    n, m = ids.shape
    out_ids = np.repeat(ids[:, :1], width, 1)
    out_lp = np.full((n, width), -np.inf, np.float32)
    out_ids[:, :m], out_lp[:, :m] = ids, lp
    return out_ids, out_lp, rest


def test_very_peaked_rows_get_a_coarser_step_instead_of_saturating():
    codec = Codec(top_k=8, min_prob=0.0)
    logits = _logits(n=4, vocab=50, scale=1.0, seed=2)
    logits[:, 7] += 40.0  # top entry ~40 nats above the others: gaps beyond 255 * step
    values, ids, rest = topk_signal(logits, 8)
    rec = encode(codec, values, ids, rest)
    assert np.frombuffer(rec["scale"], np.uint8).min() > 0
    _, lp, _ = decode(codec, rec)
    span = (values[:, :1] - values).max().item()
    tolerance = codec.step * math.ceil(span / (255 * codec.step)) / 2
    assert np.abs(lp - values.numpy()).max() <= tolerance + 1e-4
