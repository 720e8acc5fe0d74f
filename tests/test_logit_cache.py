"""The logit cache codec: round trip, id tables, adaptive entries, shards, old-format refusal, error against full logits."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stillhouse.errors import StillhouseError
from stillhouse.train.logit_cache import (FORMAT, META, CacheWriter, Codec, IdTable, LogitCache, decode, encode, kl_error,
                                          read_shard, topk_signal)
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


def _by_id(ids, lp):
    """Each row's (id, log-prob) pairs as a dict: stored order among equal levels is the table's."""
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, lp)]


def test_levels_keep_sqrt_p_within_half_a_step_and_log_p_within_half_the_max_log_step():
    codec = Codec()
    p = np.exp(-np.concatenate([np.linspace(0, 12, 20_000), np.linspace(12, 180, 5_000)]))
    got = codec.level_probs(codec.levels(p))
    u_knee = 2 * codec.sqrt_step / codec.max_log_step
    sq = np.sqrt(p) >= u_knee
    # sqrt(p) within half a step (the level's value is its mean: sqrt_step^2 / 12 added to p)
    assert np.abs(np.sqrt(got[sq] - codec.sqrt_step**2 / 12) - np.sqrt(p[sq])).max() <= codec.sqrt_step / 2 + 1e-9
    # no log-prob off by more than half the max_log_step, from p = 1 down to e^-180
    assert np.abs(np.log(got) - np.log(p)).max() <= codec.max_log_step / 2 + 1e-3
    # fine where the mass is: a probable entry's log-prob to within a few thousandths
    assert np.abs(np.log(got) - np.log(p))[p > 0.1].max() < 0.01
    assert (np.diff(codec.levels(p)) >= 0).all() and codec.levels(np.array([0.0]))[0] == codec.max_level


def test_round_trip_keeps_ids_exactly_and_values_within_their_level():
    codec = Codec(top_k=32, min_prob=0.0)
    logits = _logits()
    values, ids, rest = topk_signal(logits, 32)
    table = IdTable.build(ids.numpy())
    rec = encode(codec, values, ids, rest, table)
    got_ids, got_lp, got_rest = decode(codec, rec, table)
    assert got_ids.dtype == np.int64 and got_ids.shape == (40, 32)
    # every token's ids exactly, each with its own value
    assert (np.sort(got_ids, 1) == np.sort(ids.numpy(), 1)).all()
    got = _by_id(got_ids, got_lp)
    for row, (i, v) in enumerate(zip(ids.numpy(), values.numpy())):
        stored = np.array([got[row][t] for t in i])
        assert np.abs(stored - v).max() <= codec.max_log_step / 2 + 0.01
        # most likely first, as in rank order
        assert (np.diff(got_lp[row]) <= 1e-6).all()
    # the rest mass to within half a step of its log
    assert np.abs(np.log(got_rest) - np.log(rest.numpy())).max() <= codec.rest_step / 2 + 1e-5
    # and the decoded signal is a distribution over the entries plus the rest bucket
    np.testing.assert_allclose(np.exp(got_lp).sum(1) + got_rest, 1.0, rtol=1e-5)
    # narrow: 1 count and 1 rest byte per token; ids as byte planes, a second one only because
    # the table numbers more than 256 ids; a level increment per entry after the first
    assert len(rec["counts"]) == 40 and len(rec["rest"]) == 40 and len(rec["ids"]) == 40 * 32
    assert len(table) > 256 and len(rec["ids_hi"]) == 40 * 32
    assert len(rec["levels"]) == 40 * 31 and len(rec["top"]) == 40


def test_id_table_numbers_frequent_ids_first_and_round_trips():
    ids = np.array([7, 7, 7, 7, 7, 7, 7, 7, 3, 3, 3, 3, 900_000, 5, 5, 11])
    table = IdTable.build(ids)
    assert list(table.ids[:2]) == [7, 3] and table.numbers(np.array([7, 3]))[0] == 0
    back = IdTable.from_bytes(table.to_bytes())
    assert (back.ids == table.ids).all() and (back.numbers(ids) == table.numbers(ids)).all()
    with pytest.raises(ValueError, match="missing from the shard's id table"):
        table.numbers(np.array([4]))


def test_large_vocabulary_ids_and_many_distinct_ids():
    codec = Codec(top_k=128, min_prob=0.0)
    values, ids, rest = topk_signal(_logits(n=5, vocab=128), 128)
    ids = ids + 151_000  # ids beyond uint16, as in a 152k vocabulary
    table = IdTable.build(ids.numpy())
    got_ids, _, _ = decode(codec, encode(codec, values, ids, rest, table), table)
    assert (np.sort(got_ids, 1) == np.sort(ids.numpy(), 1)).all()
    # more distinct ids than 16 bits number: the numbers take a second and third byte plane
    ids = torch.from_numpy(np.random.default_rng(1).permutation(600 * 128).reshape(600, 128) * 200 + 151_000)
    values, _, rest = topk_signal(_logits(n=600, vocab=128), 128)
    table = IdTable.build(ids.numpy())
    rec = encode(codec, values, ids, rest, table)
    assert len(table) > 65_536 and len(rec["ids_hi"]) == 2 * len(rec["ids"])
    got_ids, _, _ = decode(codec, rec, IdTable.from_bytes(table.to_bytes()))
    assert (np.sort(got_ids, 1) == np.sort(ids.numpy(), 1)).all()


def test_adaptive_entries_drop_only_improbable_tokens_into_rest():
    codec = Codec(top_k=64, min_prob=1e-3)
    logits = _logits(n=30, vocab=300, scale=6.0, seed=3)
    values, ids, rest = topk_signal(logits, 64)
    table = IdTable.build(ids.numpy())
    got_ids, got_lp, got_rest = decode(codec, encode(codec, values, ids, rest, table), table)
    counts = np.isfinite(got_lp).sum(1)
    expected = np.maximum((values.exp() >= 1e-3).sum(1).numpy(), 1)
    assert (counts == expected).all() and counts.max() < 64
    # the kept entries are the most likely ones
    for row in range(30):
        assert set(got_ids[row, : counts[row]].tolist()) == set(ids[row, : counts[row]].tolist())
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
    codec = Codec(top_k=16, min_prob=1e-4)
    logits = _logits(n=12, vocab=200, scale=3.0, seed=8)
    writer = CacheWriter(tmp_path, codec, shard_records=2)
    for r in range(3):
        values, ids, rest = topk_signal(logits[r * 4 : (r + 1) * 4], 16)
        writer.add(f"rec-{r}", values, ids, rest)
    sizes = writer.close()
    assert writer.shards == ["shard-00000.parquet", "shard-00001.parquet"]
    assert sizes["tokens"] == 12 and sizes["bytes"] == sum((tmp_path / s).stat().st_size for s in writer.shards)
    recs = {r["id"]: (r, table) for s in writer.shards for table, rs in [read_shard(tmp_path / s)] for r in rs}
    ids, lp, rest = (np.concatenate(a) for a in zip(*[_pad(decode(codec, *recs[f"rec-{r}"]), 16) for r in range(3)]))
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


def test_very_peaked_rows_keep_their_tail_within_half_the_max_log_step():
    codec = Codec(top_k=8, min_prob=0.0)
    logits = _logits(n=4, vocab=50, scale=1.0, seed=2)
    logits[:, 7] += 40.0  # top entry ~40 nats above the others
    values, ids, rest = topk_signal(logits, 8)
    table = IdTable.build(ids.numpy())
    got_ids, lp, _ = decode(codec, encode(codec, values, ids, rest, table), table)
    got = _by_id(got_ids, lp)
    for row, (i, v) in enumerate(zip(ids.numpy(), values.numpy())):
        assert np.abs(np.array([got[row][t] for t in i]) - v).max() <= codec.max_log_step / 2 + 0.01


def test_shards_follow_records_and_tokens_and_hold_their_id_table(tmp_path):
    codec = Codec(top_k=8)
    writer = CacheWriter(tmp_path, codec, shard_records=100, shard_tokens=10)
    logits = _logits(n=24, vocab=300)
    for r in range(4):  # 6 tokens each: a shard every second record
        values, ids, rest = topk_signal(logits[r * 6 : (r + 1) * 6], 8)
        writer.add(f"rec-{r}", values, ids, rest)
    sizes = writer.close()
    assert writer.shards == ["shard-00000.parquet", "shard-00001.parquet"] and sizes["tokens"] == 24
    table, recs = read_shard(tmp_path / "shard-00001.parquet")
    assert [r["id"] for r in recs] == ["rec-2", "rec-3"]
    # the table numbers exactly that shard's ids
    assert set(table.ids.tolist()) == set(topk_signal(logits[12:], 8)[1].flatten().tolist())


def _write_cache(root, codec, logits, lengths, fmt=FORMAT):
    writer = CacheWriter(root, codec)
    start = 0
    for r, m in enumerate(lengths):
        writer.add(f"rec-{r}", *topk_signal(logits[start : start + m], codec.top_k))
        start += m
    writer.close()
    meta = {"format": fmt, "codec": codec.to_dict(), "shards": writer.shards, "data_id": "d1",
            "teacher": {"spec": "t"}, "tokenizer": {"vocab": "v", "size": logits.size(1)}}
    (root / "manifest.json").write_text(json.dumps({"id": "c1", "kind": "logit_cache", "stage": "logit_cache", "name": "cache",
                                                             "config": {}, "parents": ["d1"], META: meta, "teachers": []}))


def test_logit_cache_reads_records_by_id(tmp_path):
    codec = Codec(top_k=16)
    logits = _logits(n=20, vocab=300)
    _write_cache(tmp_path, codec, logits, [5, 0, 15])
    cache = LogitCache.open(tmp_path)
    assert len(cache) == 3 and cache.data_id == "d1"
    ids, lp, rest = cache.rows("rec-2")
    values, exact_ids, _ = topk_signal(logits[5:], 16)
    assert (np.sort(ids, 1) == np.sort(exact_ids.numpy(), 1)).all() and lp.shape == (15, 16) and rest.shape == (15,)
    ids, lp, rest = cache.rows("rec-1")  # a record without completion tokens
    assert ids.shape == (0, 0) and lp.shape == (0, 0) and rest.shape == (0,)
    with pytest.raises(StillhouseError, match="has no rows for record 'nope'"):
        cache.rows("nope")


def test_a_cache_of_the_old_format_is_refused_with_one_line(tmp_path):
    _write_cache(tmp_path, Codec(top_k=4), _logits(n=4, vocab=50), [4], fmt="stillhouse-topk-v1")
    with pytest.raises(StillhouseError) as e:
        LogitCache.open(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "stillhouse-topk-v1" in msg and FORMAT in msg
    # a v1 shard (no id table in its footer) is refused by name too
    old = tmp_path / "old.parquet"
    pq.write_table(pa.table({"id": ["r"], "n": [1], "ids": [b"\x01\x00"]}), old)
    with pytest.raises(StillhouseError, match=r"old\.parquet: logit cache shard of format stillhouse-topk-v1"):
        read_shard(old)
