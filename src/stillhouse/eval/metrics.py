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
