"""A compact on-disk cache of the teacher's top-k log-probabilities, read back sparse.

Per scored token the cache keeps the teacher's most likely tokens (at most `top_k`, rank
order) and the probability mass of everything else (`rest`), packed as:

- ids: uint16 (vocabularies up to 65,536) or uint16 + a uint8 high byte (up to 16.7M);
- values: one uint8 per entry after the first: the gap to the top entry's log-prob,
  quantised in steps of `step` nats and stored as the increment over the previous rank's
  (rank order makes the gaps monotone; the top entry itself needs no value: the
  probabilities follow from the gaps and the rest mass);
- rest: one uint8, -log(rest) in steps of `rest_step`; scale: one uint8, a per-token
  multiplier of `step` for the rare token whose gaps span more than 255 steps;
- count: one uint8 per token: entries whose probability is below `min_prob` are left in the
  rest bucket, so a confident token stores a few entries and a flat one up to `top_k`.

Records are rows of Parquet shards (zstd) beside the artifact's manifest; decoding returns
[n, entries] arrays (padding has log-prob -inf) that the sparse losses use directly. Nothing
is ever expanded to a vocabulary-wide array. `bench/logit_cache.py` measures bytes per token
and the KL error against full logits; docs/logit-cache.md has the figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..errors import StillhouseError
from .alignment import vocab_fingerprint

FORMAT = "stillhouse-topk-v1"
META = "logit_cache"  # the manifest key holding the cache's metadata


@dataclass(frozen=True)
class Codec:
    top_k: int = 128  # most entries per token (<= 256)
    min_prob: float = 0.0  # entries below this probability stay in the rest bucket (0: keep all k)
    step: float = 0.05  # log-prob gap quantisation (nats); 255 steps cover gaps up to 12.75
    rest_step: float = 0.1  # -log(rest) quantisation (nats); covers rest down to ~1e-11

    def __post_init__(self):
        if not 1 <= self.top_k <= 256:
            raise ValueError("top_k must be between 1 and 256")

    def to_dict(self) -> dict:
        return asdict(self)


def topk_signal(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted top-k log-probs and ids of [n, vocab] logits (T = 1), and the mass outside them."""
    lp = torch.log_softmax(logits.float(), -1)
    values, ids = lp.topk(min(k, lp.size(-1)), -1)
    rest = (-torch.expm1(values.logsumexp(-1))).clamp(min=0.0)  # 1 - sum, without cancellation
    return values, ids, rest


def encode(codec: Codec, logprobs: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor) -> dict:
    """Pack one record's rows (sorted top-k log-probs [n, k], ids [n, k], rest [n]) to bytes."""
    lp = logprobs[:, : codec.top_k].double().numpy()
    top_ids = ids[:, : codec.top_k].numpy().astype(np.int64)
    keep = np.exp(lp) >= codec.min_prob
    keep[:, 0] = True
    # ranks are sorted, so the kept entries are a prefix of each row
    counts = keep.sum(1)
    # mass of the dropped entries joins the rest bucket
    rest_all = rest.double().numpy() + np.where(keep, 0.0, np.exp(lp)).sum(1)
    # gaps to the top entry, quantised, then stored as rank-to-rank increments: ranks are sorted,
    # so increments are >= 0, mostly tiny, and compress far better than the gaps themselves
    # a token whose kept gaps exceed 255 steps gets a coarser step (a per-token multiplier)
    span = np.where(keep, lp[:, :1] - lp, 0.0).max(1)
    scale = np.clip(np.ceil(span / (255 * codec.step)), 1, 256).astype(np.int64)
    steps = np.clip(np.rint((lp[:, :1] - lp) / (codec.step * scale[:, None])), 0, 255).astype(np.int64)
    gaps = np.diff(steps, axis=1, prepend=0).astype(np.uint8)
    flat_ids = top_ids[keep]
    rest_q = np.clip(np.rint(-np.log(np.maximum(rest_all, 1e-300)) / codec.rest_step), 0, 255).astype(np.uint8)
    return {
        "n": int(lp.shape[0]),
        "counts": (counts - 1).astype(np.uint8).tobytes(),
        "rest": rest_q.tobytes(),
        "ids": (flat_ids & 0xFFFF).astype("<u2").tobytes(),
        "ids_hi": (flat_ids >> 16).astype(np.uint8).tobytes() if flat_ids.size and flat_ids.max() > 0xFFFF else None,
        "gaps": gaps[:, 1:][keep[:, 1:]].tobytes(),
        "scale": (scale - 1).astype(np.uint8).tobytes(),
    }


def decode(codec: Codec, rec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unpack a record: ids [n, m] int64, log-probs [n, m] float32 (-inf pads), rest [n] float32."""
    n = rec["n"]
    counts = np.frombuffer(rec["counts"], np.uint8).astype(np.int64) + 1
    width = int(counts.max()) if n else 0
    flat_ids = np.frombuffer(rec["ids"], "<u2").astype(np.int64)
    if rec.get("ids_hi") is not None:
        flat_ids |= np.frombuffer(rec["ids_hi"], np.uint8).astype(np.int64) << 16
    rows = np.repeat(np.arange(n), counts)
    cols = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    ids = np.zeros((n, width), np.int64)
    ids[:] = flat_ids[np.cumsum(counts) - counts][:, None]  # pads repeat the top id
    ids[rows, cols] = flat_ids
    steps = np.zeros((n, width), np.int64)
    tail = cols > 0
    steps[rows[tail], cols[tail]] = np.frombuffer(rec["gaps"], np.uint8)
    scale = np.frombuffer(rec["scale"], np.uint8).astype(np.float64) + 1
    gap = np.cumsum(steps, axis=1) * (codec.step * scale[:, None])
    gap[np.arange(width)[None, :] >= counts[:, None]] = np.inf
    rest = np.exp(np.frombuffer(rec["rest"], np.uint8).astype(np.float64) * -codec.rest_step)
    # p_i = (1 - rest) * exp(-gap_i) / sum_j exp(-gap_j)
    log_z = np.log(np.exp(-gap).sum(1, keepdims=True))
    lp = np.log1p(-np.minimum(rest, 1 - 1e-7))[:, None] - gap - log_z
    return ids, lp.astype(np.float32), rest.astype(np.float32)


_SCHEMA = pa.schema([
    ("id", pa.string()), ("n", pa.int32()), ("counts", pa.binary()), ("rest", pa.binary()),
    ("ids", pa.binary()), ("ids_hi", pa.binary()), ("gaps", pa.binary()), ("scale", pa.binary()),
])


class CacheWriter:
    """Appends encoded records and writes them as Parquet shards of `shard_records` rows."""

    def __init__(self, path: Path, codec: Codec, shard_records: int = 4096):
        self.path = Path(path)
        self.codec = codec
        self.shard_records = shard_records
        self._rows: list[dict] = []
        self.shards: list[str] = []
        self.tokens = 0
        self.entries = 0

    def add(self, record_id: str, logprobs: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor) -> None:
        rec = encode(self.codec, logprobs, ids, rest)
        self.tokens += rec["n"]
        self.entries += int(np.frombuffer(rec["counts"], np.uint8).sum()) + rec["n"]
        self._rows.append({"id": record_id, **rec})
        if len(self._rows) >= self.shard_records:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        name = f"shard-{len(self.shards):05d}.parquet"
        tmp = self.path / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(self._rows, schema=_SCHEMA), tmp, compression="zstd", compression_level=19)
        tmp.replace(self.path / name)
        self.shards.append(name)
        self._rows = []

    def close(self) -> dict:
        """Write the last shard; return the payload's size figures."""
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
        self._records: dict[str, dict] = {}
        for shard in meta["shards"]:
            for rec in pq.read_table(self.path / shard).to_pylist():
                self._records[rec["id"]] = rec

    @classmethod
    def open(cls, path: str | Path) -> "LogitCache":
        from ..artifacts import Artifact

        art = Artifact.open(path)
        meta = art.manifest.get(META)
        if art.kind != "logit_cache" or not meta or meta.get("format") != FORMAT:
            raise StillhouseError(f"{path}: not a logit cache of format {FORMAT}")
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
        rec = self._records.get(record_id)
        if rec is None:
            raise StillhouseError(f"logit cache {self.path.name} has no rows for record '{record_id}'")
        return decode(self.codec, rec)

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


def codec_bytes_per_token(codec: Codec, n_entries: float, vocab: int) -> float:
    """Payload bytes per token before Parquet's own compression (id, gap, count, rest)."""
    id_bytes = 2 if vocab <= 65536 else 3
    return n_entries * id_bytes + (n_entries - 1) + 3


def reference_bytes_per_token(k: int, exact: int, degree: int, vocab: int) -> float:
    """The published polynomial format's storage: ceil(log2 V)-bit ids, `exact` fp16 values,
    fp32 polynomial coefficients for the rest of the top-k (none when k <= exact)."""
    return k * math.ceil(math.log2(vocab)) / 8 + min(exact, k) * 2 + ((degree + 1) * 4 if k > exact else 0)
