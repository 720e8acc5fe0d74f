"""One row per request through the guard gateway: the schema the gateway writes and the
analysis reads, in SQLite (the embedded default, WAL mode) and as Arrow/Parquet (export,
partitioned by day, for DuckDB, Spark or Ray).

A prompt is kept as a SHA-256 (exact repeats) and a MinHash signature of its word 3-shingles
(near repeats and shared templates, comparable without the text); the full text only when the
guard file asks for it.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa

SIGNATURE_PERM = 64  # MinHash permutations: 256 bytes a row; LSH bands of 4 x 16 find ~0.8-Jaccard pairs
SIGNATURE_SEED = 1   # fixed so signatures from any gateway, any day, compare

# (column, Arrow type, SQLite type, meaning)
COLUMNS: list[tuple[str, pa.DataType, str, str]] = [
    ("ts", pa.float64(), "REAL NOT NULL", "arrival time, Unix seconds"),
    ("account", pa.string(), "TEXT", "account of the API key (null when no valid key)"),
    ("org", pa.string(), "TEXT", "organisation of the account"),
    ("key_id", pa.string(), "TEXT", "public id of the API key (never the key)"),
    ("route", pa.string(), "TEXT NOT NULL", "'chat' or 'completions' (or the path for others)"),
    ("model", pa.string(), "TEXT", "model the client asked for"),
    ("prompt_sha256", pa.string(), "TEXT", "SHA-256 of the normalised prompt text"),
    ("prompt_sig", pa.binary(), "BLOB", "MinHash signature of the prompt's word 3-shingles: 64 little-endian uint32"),
    ("prompt_chars", pa.int32(), "INTEGER", "characters in the prompt text (all messages)"),
    ("system_sha256", pa.string(), "TEXT", "SHA-256 of the system prompt, if any"),
    ("probe", pa.string(), "TEXT", "comma-separated extraction intents found in the prompt (intent.py), '' for none"),
    ("prompt_tokens", pa.int32(), "INTEGER", "prompt tokens as the upstream counted them"),
    ("completion_tokens", pa.int32(), "INTEGER", "completion tokens sent to the client"),
    ("withheld_tokens", pa.int32(), "INTEGER", "hidden reasoning tokens the gateway did not send"),
    ("n", pa.int16(), "INTEGER", "choices requested"),
    ("max_tokens", pa.int32(), "INTEGER", "max_tokens requested (null if unset)"),
    ("temperature", pa.float32(), "REAL", "temperature requested (null if unset)"),
    ("top_logprobs", pa.int16(), "INTEGER", "top log-probs requested per token (0 none; completions' logprobs=k counts as k)"),
    ("echo", pa.bool_(), "INTEGER", "echo requested"),
    ("stream", pa.bool_(), "INTEGER", "streamed response"),
    ("user_agent", pa.string(), "TEXT", "client User-Agent header"),
    ("param_shape", pa.string(), "TEXT", "sorted names of the request's top-level fields: a client fingerprint"),
    ("client_ip", pa.string(), "TEXT", "peer address"),
    ("status", pa.int16(), "INTEGER NOT NULL", "HTTP status returned"),
    ("outcome", pa.string(), "TEXT NOT NULL", "ok | unauthorized | rate_limited | quota_exceeded | bad_request | upstream_error | cancelled"),
    ("latency_ms", pa.float32(), "REAL", "time from arrival to the last byte sent"),
    ("prompt_text", pa.string(), "TEXT", "full prompt text, only when the guard file sets log_text"),
]

NAMES = [c[0] for c in COLUMNS]
ARROW_SCHEMA = pa.schema([pa.field(name, typ) for name, typ, _, _ in COLUMNS])
SQLITE_DDL = (
    "CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, "
    + ", ".join(f"{name} {sql}" for name, _, sql, _ in COLUMNS)
    + ")"
)

_WORD = re.compile(r"\w+", re.UNICODE)


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def prompt_sha256(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()


def shingles(text: str, k: int = 3) -> set[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) < k:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i : i + k]).encode() for i in range(len(words) - k + 1)}


_PERMUTATIONS = None  # the seeded MinHash permutations, made once: making them is 9/10 of a fresh MinHash's cost


def _reference():
    """A MinHash holding the seeded permutations, made once."""
    global _PERMUTATIONS
    from datasketch import MinHash

    if _PERMUTATIONS is None:
        _PERMUTATIONS = MinHash(num_perm=SIGNATURE_PERM, seed=SIGNATURE_SEED)
    return _PERMUTATIONS


def prompt_signature(text: str) -> bytes:
    """MinHash of the prompt's word 3-shingles (datasketch), as 256 bytes."""
    from datasketch import MinHash

    _reference()
    m = MinHash(num_perm=SIGNATURE_PERM, seed=SIGNATURE_SEED, permutations=_PERMUTATIONS.permutations, scheme=_PERMUTATIONS.scheme)
    m.update_batch(list(shingles(text)))
    return np.asarray(m.hashvalues, dtype="<u4").tobytes()


def prompt_signatures(texts: list[str]) -> list[bytes]:
    """prompt_signature for many prompts at once, byte for byte (a test checks it):
    datasketch's permutations, shingle hash and pre-mix (its default affine32 scheme), the
    min-hash done for many prompts in one numpy pass instead of one MinHash object each."""
    from datasketch.hashfunc import sha1_hash32
    from datasketch.minhash import _fmix

    distinct = list(dict.fromkeys(texts))  # prompts repeat (public sets, benchmarks): hash each once
    ref = _reference()
    if ref.scheme != "affine32":
        raise RuntimeError(f"datasketch's default MinHash scheme is now {ref.scheme!r}; update log_schema.prompt_signatures")
    a, b = ref.permutations
    top = np.iinfo(np.uint32).max
    sig = {}
    for lo in range(0, len(distinct), 20_000):
        chunk = distinct[lo : lo + 20_000]
        sh = [list(shingles(t)) for t in chunk]
        hv = _fmix(np.array([sha1_hash32(x) for s in sh for x in s], dtype=np.uint32), 32)
        sizes = np.array([len(s) for s in sh])
        with np.errstate(over="ignore"):
            phv = hv[:, None] * a + b
        out = np.full((len(chunk), SIGNATURE_PERM), top, dtype=np.uint32)
        nz = sizes > 0
        if nz.any():
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])[nz]
            out[nz] = np.minimum.reduceat(phv, starts, axis=0)
        for t, row in zip(chunk, out):
            sig[t] = row.astype("<u4").tobytes()
    return [sig[t] for t in texts]


def signature_array(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<u4")
