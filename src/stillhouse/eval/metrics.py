"""Pure metric functions."""

from __future__ import annotations

from math import comb
from typing import Iterable

import torch
import torch.nn.functional as F


def mean(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al., 2021)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def per_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """KL(p_teacher || p_student) for each of N positions (T = 1), for evaluation."""
    out = []
    for start in range(0, student_logits.size(0), chunk):
        sl = slice(start, start + chunk)
        s = F.log_softmax(student_logits[sl].float(), dim=-1)
        t = F.log_softmax(teacher_logits[sl].float(), dim=-1)
        out.append((t.exp() * (t - s)).sum(-1))
    return torch.cat(out) if out else student_logits.new_zeros(0)


def bootstrap_ci(values: Iterable[float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem scores (seeded, so reports are stable)."""
    import numpy as np

    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return (float(lo), float(hi))


def mean_pass_at_k(samples: Iterable[tuple[int, int]], k: int) -> float:
    """pass@k over problems, each given as (n samples, c correct)."""
    return mean(pass_at_k(n, c, k) for n, c in samples)


def agreement(answers: dict[str, str], reference: dict[str, str]) -> float:
    """Share of the problems in `reference` on which `answers` gives the same extracted answer."""
    if not reference:
        return 0.0
    same = sum(1 for pid, ans in reference.items() if pid in answers and answers[pid].strip() == ans.strip())
    return same / len(reference)


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp of the mean per-token negative log-likelihood (nats)."""
    import math

    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(total_nll / n_tokens)


def fraction_of(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is zero."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference
