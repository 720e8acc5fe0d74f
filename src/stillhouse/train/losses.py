"""Distillation losses as pure functions over already-selected positions.

Callers pass logits only for the positions that count (response tokens, not prompt or
padding), shaped [N, vocab]; the training loop selects those positions *before* the LM head
so full-vocabulary logits are never built for the whole batch. Each loss is computed in
chunks of rows so fp32 log-softmax buffers stay small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Mean token cross-entropy (SFT on teacher text) over N positions."""
    n = targets.numel()
    if n == 0:
        return student_logits.sum() * 0.0
    total = student_logits.new_zeros((), dtype=torch.float32)
    for sl in _chunks(n, chunk):
        total = total + F.cross_entropy(student_logits[sl].float(), targets[sl], reduction="sum")
    return total / n


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = 1024,
) -> torch.Tensor:
    """Mean over positions of KL(p_teacher || p_student) at temperature T, scaled by T^2.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    n = student_logits.size(0)
    if n == 0:
        return student_logits.sum() * 0.0
    total = student_logits.new_zeros((), dtype=torch.float32)
    for sl in _chunks(n, chunk):
        s = F.log_softmax(student_logits[sl].float() / temperature, dim=-1)
        t = F.log_softmax(teacher_logits[sl].float() / temperature, dim=-1)
        total = total + (t.exp() * (t - s)).sum()
    return total / n * temperature**2


def sparse_forward_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = 1024,
) -> torch.Tensor:
    """Forward KL against a cached top-k teacher signal, never expanded to the full vocabulary.

    The teacher distribution is its top-k log-probs renormalised at temperature T; the
    student's log-probs are over its full vocabulary, gathered at the teacher's ids, so the
    result is a true KL(p_teacher_topk || p_student) >= 0. Scaled by T^2 like `forward_kl`.
    """
    n = student_logits.size(0)
    if n == 0:
        return student_logits.sum() * 0.0
    total = student_logits.new_zeros((), dtype=torch.float32)
    for sl in _chunks(n, chunk):
        s = F.log_softmax(student_logits[sl].float() / temperature, dim=-1).gather(-1, topk_ids[sl])
        t = F.log_softmax(topk_logprobs[sl].float() / temperature, dim=-1)
        total = total + (t.exp() * (t - s)).sum()
    return total / n * temperature**2
