"""The preference objective (DPO) as pure functions over selected positions.

DPO (Rafailov et al., 2023) needs, per pair, the summed log-probability of the chosen and of
the rejected response under the policy and under a frozen reference. The training loop
computes the reference values once before training (the reference is the student as it
starts), so no second model is held in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log p(target) at each of N selected positions, [N]; fp32 log-softmax in row chunks."""
    out = [-F.cross_entropy(logits[s : s + chunk].float(), targets[s : s + chunk], reduction="none")
           for s in range(0, targets.numel(), chunk)]
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Sum of target log-probs per row of a [B, L] `positions` mask (row-major like the logits), [B]."""
    rows = positions.nonzero()[:, 0]
    lp = token_logprobs(logits, targets)
    return torch.zeros(positions.size(0), dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """Per-pair DPO loss -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), and the
    implicit reward margins beta * (...) (positive when the policy prefers the chosen answer)."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin
