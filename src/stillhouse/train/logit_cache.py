"""A compact on-disk cache of the teacher's top-k log-probabilities, read back sparse.

Per scored token the cache keeps the teacher's most likely tokens (at most `top_k`) with
their probabilities, and the probability mass of everything else (`rest`):

- values: each entry's probability as a level: uniform steps of `sqrt_step` in sqrt(p),
  which spends precision where the mass is (a probability's share of any divergence), down
  to where such a step would exceed `max_log_step` nats of log-prob; below that, uniform
  steps of `max_log_step` in log p, so no stored log-prob is off by more than half of it;
- ids: exact. A shard's ids are renumbered by how often they occur in its top-k sets (the
  table, a few bytes per distinct id, sits in the shard's footer). Within a token, entries
  are ordered by (level, number): entries of one level are a set, stored as increments of
  their numbers, which are small because frequent ids have small numbers; levels are stored
  as increments too. Order among equal levels is the table's, not the teacher's (their
  stored probabilities are equal);
- rest: one uint8, -log(rest) in steps of `rest_step`; count: one uint8 per token: entries
  whose probability is below `min_prob` are left in the rest bucket, so a confident token
  stores a few entries and a flat one up to `top_k`.

Integers are stored as byte planes (all low bytes, then the next bytes when needed), so that
Parquet's zstd sees low-entropy streams. Records are rows of Parquet shards beside the
artifact's manifest; decoding returns [n, entries] arrays (padding has log-prob -inf) that
the sparse losses use directly. Nothing is ever expanded to a vocabulary-wide array.
`bench/logit_cache.py` measures bytes per token and the KL error against full logits;
docs/logit-cache.md has the figures.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..errors import StillhouseError
from .alignment import vocab_fingerprint

FORMAT = "stillhouse-topk-v2"
META = "logit_cache"  # the manifest key holding the cache's metadata


@dataclass(frozen=True)
class Codec:
    top_k: int = 128  # most entries per token (<= 256)
    min_prob: float = 0.0  # entries below this probability stay in the rest bucket (0: keep all k)
    sqrt_step: float = 0.0018  # quantisation step of sqrt(p)
    max_log_step: float = 0.5  # no level spans more log-prob than this (nats): every entry within half of it
    rest_step: float = 0.1  # -log(rest) quantisation (nats); covers rest down to ~1e-11

    def __post_init__(self):
        if not 1 <= self.top_k <= 256:
            raise ValueError("top_k must be between 1 and 256")
        if not 0 < self.sqrt_step < 1 or not self.max_log_step > 0:
            raise ValueError("sqrt_step must be in (0, 1) and max_log_step positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def _knee(self) -> tuple[float, float]:
        """sqrt(p) below which a sqrt_step would span more than max_log_step nats, and its level."""
        u = min(2 * self.sqrt_step / self.max_log_step, 1.0)
        return u, (1 - u) / self.sqrt_step

    @property
    def max_level(self) -> int:
        """The level of log-prob -200 (anything less likely is stored there)."""
        u, c = self._knee
        return int(math.ceil(c + 2 * (math.log(u) + 100) / self.max_log_step))

    def levels(self, p: np.ndarray) -> np.ndarray:
        """Probabilities to levels (0 = probability 1; larger = less likely)."""
        u_knee, c_knee = self._knee
        u = np.sqrt(np.asarray(p, np.float64))
        with np.errstate(divide="ignore"):
            c = np.where(u >= u_knee, (1 - u) / self.sqrt_step,
                         c_knee + 2 * np.log(u_knee / np.maximum(u, 1e-300)) / self.max_log_step)
        return np.clip(np.rint(c), 0, self.max_level).astype(np.int64)

    def level_probs(self, levels: np.ndarray) -> np.ndarray:
        """Levels back to probabilities (a level's mean over a uniform spread in sqrt(p))."""
        u_knee, c_knee = self._knee
        lv = np.asarray(levels, np.float64)
        sq = lv <= c_knee
        u = np.where(sq, 1 - lv * self.sqrt_step, u_knee * np.exp(-(lv - c_knee) * self.max_log_step / 2))
        return np.where(sq, u * u + self.sqrt_step**2 / 12, u * u)


def topk_signal(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted top-k log-probs and ids of [n, vocab] logits (T = 1), and the mass outside them."""
    lp = torch.log_softmax(logits.float(), -1)
    values, ids = lp.topk(min(k, lp.size(-1)), -1)
    rest = (-torch.expm1(values.logsumexp(-1))).clamp(min=0.0)  # 1 - sum, without cancellation
    return values, ids, rest


def _planes(x: np.ndarray) -> tuple[bytes, bytes | None]:
    """Non-negative integers as byte planes: every value's low byte, and (None unless some
    value needs them) every value's next byte, then the next... Parquet keeps the two in
    separate columns, so zstd sees each stream on its own."""
    x = np.asarray(x, np.int64).ravel()
    if x.size and x.min() < 0:
        raise ValueError("byte planes hold non-negative integers")
    width = max(1, (int(x.max()).bit_length() + 7) // 8) if x.size else 1
    planes = ((x[None, :] >> (8 * np.arange(width, dtype=np.int64))[:, None]) & 0xFF).astype(np.uint8)
    return planes[0].tobytes(), planes[1:].tobytes() if width > 1 else None


def _from_planes(low: bytes, high: bytes | None) -> np.ndarray:
    out = np.frombuffer(low, np.uint8).astype(np.int64)
    if high:
        for i, plane in enumerate(np.frombuffer(high, np.uint8).reshape(-1, len(out)).astype(np.int64)):
            out |= plane << (8 * (i + 1))
    return out


_ZSTD = pa.Codec("zstd", compression_level=19)


class IdTable:
    """A shard's token ids numbered by how often they occur in its top-k sets (0: the most frequent).

    Frequencies are coarse (half-octaves of the count; ties in id order), so the table costs
    the sorted ids' increments and one byte per distinct id, compressed.
    """

    KEY = b"stillhouse.id_table"  # the shard footer's key holding it

    def __init__(self, sorted_ids: np.ndarray, classes: np.ndarray):
        self.sorted_ids = np.asarray(sorted_ids, np.int64)
        self.classes = np.asarray(classes, np.uint8)
        order = np.lexsort((self.sorted_ids, -self.classes.astype(np.int64)))
        self.ids = self.sorted_ids[order]  # number -> id
        self._numbers = np.empty(len(order), np.int64)
        self._numbers[order] = np.arange(len(order))

    @classmethod
    def build(cls, ids: np.ndarray) -> "IdTable":
        uniq, counts = np.unique(np.asarray(ids, np.int64), return_counts=True)
        return cls(uniq, np.floor(2 * np.log2(counts)).astype(np.uint8))

    def __len__(self) -> int:
        return len(self.ids)

    def numbers(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        pos = np.searchsorted(self.sorted_ids, ids)
        if ids.size and (pos.max() >= len(self.sorted_ids) or (self.sorted_ids[pos] != ids).any()):
            raise ValueError("an id missing from the shard's id table")
        return self._numbers[pos]

    def to_bytes(self) -> bytes:
        """Distinct-id count (uint32), byte-plane count, the sorted ids' increments as byte
        planes, one class byte per id; zstd, after the uncompressed size (uint32)."""
        n = len(self.ids)
        low, high = _planes(np.diff(self.sorted_ids, prepend=0))
        high = high or b""
        payload = struct.pack("<IB", n, 1 + (len(high) // n if n else 0)) + low + high + self.classes.tobytes()
        return struct.pack("<I", len(payload)) + _ZSTD.compress(payload, asbytes=True)

    @classmethod
    def from_bytes(cls, b: bytes) -> "IdTable":
        (size,) = struct.unpack_from("<I", b)
        payload = _ZSTD.decompress(b[4:], decompressed_size=size, asbytes=True)
        n, width = struct.unpack_from("<IB", payload)
        end = 5 + width * n
        return cls(np.cumsum(_from_planes(payload[5 : 5 + n], payload[5 + n : end])), np.frombuffer(payload[end:], np.uint8))


def _prepare(codec: Codec, logprobs: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor) -> dict:
    """One record's kept entries (rank order, flat), their levels, counts and quantised rest."""
    lp = logprobs[:, : codec.top_k].double().numpy()
    top_ids = ids[:, : codec.top_k].numpy().astype(np.int64)
    p = np.exp(lp)
    keep = p >= codec.min_prob
    keep[:, :1] = True
    # ranks are sorted, so the kept entries are a prefix of each row
    counts = keep.sum(1)
    # mass of the dropped entries joins the rest bucket
    rest_all = rest.double().numpy() + np.where(keep, 0.0, p).sum(1)
    rest_q = np.clip(np.rint(-np.log(np.maximum(rest_all, 1e-300)) / codec.rest_step), 0, 255).astype(np.uint8)
    # compact while the shard waits for its id table: 8 bytes per entry
    return {"n": int(lp.shape[0]), "counts": counts, "rest": rest_q,
            "levels": codec.levels(p)[keep].astype(np.int32), "ids": top_ids[keep].astype(np.int32)}


def _pack_record(prep: dict, table: IdTable) -> dict:
    n, counts = prep["n"], prep["counts"]
    level = prep["levels"].astype(np.int64)
    number = table.numbers(prep["ids"])
    token = np.repeat(np.arange(n), counts)
    # within a token: by level, then by number (entries of a level are a set)
    o = np.lexsort((number, level, token))
    level, number = level[o], number[o]
    first = np.zeros(len(level), bool)
    first[np.cumsum(counts) - counts] = True
    new_level = first.copy()
    new_level[1:] |= level[1:] != level[:-1]
    prev_level = np.concatenate([[0], level[:-1]])
    prev_number = np.concatenate([[-1], number[:-1]])
    # a token's top level, then increments; a level's first number, then increments - 1
    top, top_hi = _planes(level[first])
    levels, levels_hi = _planes((level - prev_level)[~first])
    ids, ids_hi = _planes(np.where(new_level, number, number - prev_number - 1))
    return {"n": n, "counts": (counts - 1).astype(np.uint8).tobytes(), "rest": prep["rest"].tobytes(), "top": top,
            "top_hi": top_hi, "levels": levels, "levels_hi": levels_hi, "ids": ids, "ids_hi": ids_hi}


def encode(codec: Codec, logprobs: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor, table: IdTable) -> dict:
    """Pack one record's rows (sorted top-k log-probs [n, k], ids [n, k], rest [n]) to bytes;
    `table` must number every id (`IdTable.build` of the shard's ids)."""
    return _pack_record(_prepare(codec, logprobs, ids, rest), table)


def decode(codec: Codec, rec: dict, table: IdTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unpack a record: ids [n, m] int64, log-probs [n, m] float32 (-inf pads), rest [n] float32.

    Entries come most likely first; entries of equal stored probability in the table's order."""
    n = rec["n"]
    counts = np.frombuffer(rec["counts"], np.uint8).astype(np.int64) + 1
    width = int(counts.max()) if n else 0
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    first = np.zeros(total, bool)
    first[starts] = True
    steps = np.zeros(total, np.int64)
    steps[first] = _from_planes(rec["top"], rec["top_hi"])
    steps[~first] = _from_planes(rec["levels"], rec["levels_hi"])
    run = np.cumsum(steps)
    level = run - np.repeat(run[starts] - steps[starts], counts)  # per-token running sum
    new_level = first | (steps > 0)
    inc = _from_planes(rec["ids"], rec["ids_hi"]) + ~new_level
    run = np.cumsum(inc)
    groups = np.flatnonzero(new_level)
    number = run - np.repeat(run[groups] - inc[groups], np.diff(np.append(groups, total)))  # per-level running sum
    flat_ids = table.ids[number]
    rows = np.repeat(np.arange(n), counts)
    cols = np.arange(total) - np.repeat(starts, counts)
    ids = np.zeros((n, width), np.int64)
    ids[:] = flat_ids[starts][:, None]  # pads repeat the top id
    ids[rows, cols] = flat_ids
    probs = np.zeros((n, width))
    probs[rows, cols] = codec.level_probs(level)
    rest = np.exp(np.frombuffer(rec["rest"], np.uint8).astype(np.float64) * -codec.rest_step)
    # p_i = (1 - rest) * level_prob_i / sum_j level_prob_j
    with np.errstate(divide="ignore"):
        lp = np.log1p(-np.minimum(rest, 1 - 1e-7))[:, None] + np.log(probs) - np.log(probs.sum(1, keepdims=True))
    return ids, lp.astype(np.float32), rest.astype(np.float32)


_SCHEMA = pa.schema(
    [("id", pa.string()), ("n", pa.int32()), ("counts", pa.binary()), ("rest", pa.binary())]
    + [(name, pa.binary()) for stream in ("top", "levels", "ids") for name in (stream, f"{stream}_hi")]
)


def write_shard(path: Path, rows: list[dict], table: IdTable) -> None:
    """Records as a Parquet file (zstd); the id table in its footer. No column statistics: for
    binary columns they would copy values into page headers and the footer."""
    with pq.ParquetWriter(path, _SCHEMA, compression="zstd", compression_level=19, store_schema=False,
                          use_dictionary=False, write_statistics=False) as w:
        w.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA))
        w.add_key_value_metadata({IdTable.KEY: table.to_bytes(), b"stillhouse.format": FORMAT.encode()})


def read_shard(path: Path) -> tuple[IdTable, list[dict]]:
    """A shard's id table and records; a shard of another format is refused."""
    f = pq.ParquetFile(path)
    meta = f.metadata.metadata or {}
    if meta.get(b"stillhouse.format") != FORMAT.encode() or IdTable.KEY not in meta:
        fmt = meta.get(b"stillhouse.format", b"stillhouse-topk-v1 (no id table)").decode(errors="replace")
        raise StillhouseError(f"{path}: logit cache shard of format {fmt}, which this version does not read (it reads {FORMAT})")
    return IdTable.from_bytes(meta[IdTable.KEY]), f.read().to_pylist()


class CacheWriter:
    """Collects records and writes them as Parquet shards of at most `shard_records` records
    and about `shard_tokens` tokens (a shard's id table needs all of its records: they wait
    in memory, 8 bytes per entry, until their shard is written)."""

    def __init__(self, path: Path, codec: Codec, shard_records: int = 4096, shard_tokens: int = 65536):
        self.path = Path(path)
        self.codec = codec
        self.shard_records = shard_records
        self.shard_tokens = shard_tokens
        self._pending: list[tuple[str, dict]] = []
        self._pending_tokens = 0
        self.shards: list[str] = []
        self.tokens = 0
        self.entries = 0

    def add(self, record_id: str, logprobs: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor) -> None:
        prep = _prepare(self.codec, logprobs, ids, rest)
        self.tokens += prep["n"]
        self.entries += int(prep["counts"].sum())
        self._pending.append((record_id, prep))
        self._pending_tokens += prep["n"]
        if len(self._pending) >= self.shard_records or self._pending_tokens >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        table = IdTable.build(np.concatenate([prep["ids"] for _, prep in self._pending]))
        rows = [{"id": rid, **_pack_record(prep, table)} for rid, prep in self._pending]
        name = f"shard-{len(self.shards):05d}.parquet"
        tmp = self.path / f".{name}.tmp"
        write_shard(tmp, rows, table)
        tmp.replace(self.path / name)
        self.shards.append(name)
        self._pending, self._pending_tokens = [], 0

    def close(self) -> dict:
        """Write the last shard; return the payload's size figures (id tables included)."""
        self._flush()
        size = sum((self.path / s).stat().st_size for s in self.shards)
        return {"tokens": self.tokens, "bytes": size, "bytes_per_token": round(size / max(1, self.tokens), 2),
                "entries_per_token": round(self.entries / max(1, self.tokens), 2)}


class LogitCache:
    """A written cache: metadata from the manifest, records decoded on demand by id."""

    def __init__(self, path: Path, meta: dict, teachers: list[dict]):
        self.path = Path(path)
        self.meta = meta
        self.codec = Codec(**meta["codec"])
        self.teachers = teachers
        self._records: dict[str, tuple[dict, IdTable]] = {}
        for shard in meta["shards"]:
            table, recs = read_shard(self.path / shard)
            for rec in recs:
                self._records[rec["id"]] = (rec, table)

    @classmethod
    def open(cls, path: str | Path) -> "LogitCache":
        from ..artifacts import Artifact

        art = Artifact.open(path)
        meta = art.manifest.get(META)
        if art.kind != "logit_cache" or not meta:
            raise StillhouseError(f"{path}: not a logit cache")
        if meta.get("format") != FORMAT:
            raise StillhouseError(f"{path}: logit cache of format {meta.get('format')}, which this version does not read "
                                  f"(it reads {FORMAT}); score the dataset again with a cache_logits stage")
        return cls(art.path, meta, art.manifest.get("teachers", []))

    @property
    def data_id(self) -> str:
        return self.meta["data_id"]

    @property
    def teacher(self) -> dict:
        return self.meta["teacher"]

    def __len__(self) -> int:
        return len(self._records)

    def rows(self, record_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        found = self._records.get(record_id)
        if found is None:
            raise StillhouseError(f"logit cache {self.path.name} has no rows for record '{record_id}'")
        return decode(self.codec, *found)

    def check_student(self, tokenizer, where: str) -> None:
        """The cache's token ids must be the student's: same vocabulary, same id for each token."""
        if vocab_fingerprint(tokenizer) != self.meta["tokenizer"]["vocab"]:
            raise StillhouseError(
                f"{where}: the cache was scored with another tokenizer ({self.meta['tokenizer']['size']} tokens, "
                f"teacher {self.teacher.get('spec')}) than the student's ({len(tokenizer)} tokens)"
            )


def kl_error(full_logprobs: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p || q) of a sparse signal against the full distribution p ([n, vocab] log-probs).

    q is the sparse signal as the losses see it, spread to a full distribution for this
    measurement only: its entries, and the rest mass shared evenly by the other tokens.
    """
    lp_full = full_logprobs.float()
    valid = torch.isfinite(logprobs)
    lq = logprobs.masked_fill(~valid, float("-inf"))
    z = lq.exp().sum(-1) + rest  # renormalise as the losses do
    lq = lq - z.log()[:, None]
    rq = (rest / z).clamp(min=1e-30)
    lp = lp_full.gather(-1, ids)
    p = lp.exp() * valid
    n_other = lp_full.size(-1) - valid.sum(-1)
    p_other = (1 - p.sum(-1)).clamp(min=0)
    inside = torch.where(valid, p * (lp - lq.clamp(min=-1e4)), torch.zeros_like(p)).sum(-1)
    other_plogp = (lp_full.exp() * lp_full).sum(-1) - torch.where(valid, p * lp, torch.zeros_like(p)).sum(-1)
    return inside + other_plogp - p_other * torch.log(rq / n_other.clamp(min=1))


def reference_bytes_per_token(k: int, exact: int, degree: int, vocab: int) -> float:
    """The published polynomial format's storage: ceil(log2 V)-bit ids, `exact` fp16 values,
    fp32 polynomial coefficients for the rest of the top-k (none when k <= exact)."""
    return k * math.ceil(math.log2(vocab)) / 8 + min(exact, k) * 2 + ((degree + 1) * 4 if k > exact else 0)
