"""On-policy distillation: the student samples, the teacher scores the student's own tokens.

One loop serves every on-policy objective. Each step builds a batch of sequences (student
samples, or with GKD's lambda the dataset's teacher completions), scores them with student
and teacher at the completion positions only, and takes one of two kinds of step:

- `gkd` (Agarwal et al. 2024): a generalised JSD(beta) between the two distributions at every
  position, i.e. a distillation loss on the student's own text (lmbda = share of batches that
  are student samples; 0 is plain off-policy KD on the dataset).
- `reverse_kl` (on-policy distillation as reinforcement learning, as in tinker-cookbook): a
  policy-gradient step where each sampled token's advantage is -(log p_student - log p_teacher).
  Its expectation is the gradient of the reverse KL to the teacher. Any per-token advantage
  plugs into the same step (`advantages=`), so reward-based training needs no second trainer.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..progress import progress
from ..scoring import right_pad, selected_logits
from ..teachers.base import SamplingParams
from ..teachers.hf import HFTeacher
from .losses import divergence, policy_gradient


@dataclass
class OnPolicyConfig:
    method: str = "gkd"  # gkd | reverse_kl
    lmbda: float = 1.0  # gkd: probability that a batch is sampled from the student
    beta: float = 0.5  # gkd: JSD beta
    steps: int = 50
    batch_size: int = 8
    lr: float = 1e-4
    sample_temperature: float = 1.0
    max_new_tokens: int = 32
    grad_clip: float = 1.0
    seed: int = 0
    vocab_size: int | None = None


@dataclass
class Prompt:
    text: str  # the rendered prompt (chat template applied), as the student sees it
    ids: list[int]
    completion_ids: list[int] | None = None  # a teacher completion, for GKD's off-policy share


def reverse_kl_advantages(student_lp: torch.Tensor, teacher_lp: torch.Tensor) -> torch.Tensor:
    """Per-token advantage of on-policy distillation: -(log p_student - log p_teacher) of the sampled token."""
    return -(student_lp - teacher_lp)


def sample_completions(student, tokenizer, prompts: list[Prompt], cfg: OnPolicyConfig, seed: int) -> list[list[int]]:
    """The student's own completions (with the stop token that ended them), sampled at cfg's temperature."""
    sampler = HFTeacher(student, tokenizer, name="student", batch_size=len(prompts))
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature, seed=seed)
    was_training = student.training
    student.eval()
    outs = sampler.generate_text([p.text for p in prompts], params, "Student sampling")
    student.train(was_training)
    return [c[0].token_ids + ([c[0].stop_token] if c[0].stop_token is not None else []) for c in outs]


def _batch(prompts: list[Prompt], completions: list[list[int]], pad_id: int):
    seqs = [p.ids + c for p, c in zip(prompts, completions)]
    ids, attn = right_pad(seqs, pad_id)
    predict = torch.zeros_like(ids, dtype=torch.bool)
    targets = torch.full_like(ids, -100)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        n, first = len(p.ids) + len(c), max(len(p.ids), 1)
        predict[r, first - 1 : n - 1] = True
        targets[r, first - 1 : n - 1] = ids[r, first:n]
    return ids, attn, predict, targets[predict]


def train_onpolicy(
    student,
    teacher,
    tokenizer,
    prompts: list[Prompt],
    cfg: OnPolicyConfig,
    advantages: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = reverse_kl_advantages,
    description: str = "On-policy distillation",
) -> list[dict]:
    """Train `student` in place against `teacher`; returns the per-step history.

    `reverse_kl` in the history is the per-token Monte-Carlo estimate mean(log p_s - log p_t)
    on the batch's tokens (exact in expectation on student samples).
    """
    if cfg.method == "gkd" and cfg.lmbda < 1 and any(p.completion_ids is None for p in prompts):
        raise ValueError("gkd with lmbda < 1 needs a teacher completion for every prompt")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    teacher.eval()
    student.train()
    history, tokens_seen, start = [], 0, time.perf_counter()
    pad = tokenizer.pad_token_id
    with progress(description, total=cfg.steps) as advance:
        for step in range(cfg.steps):
            batch = rng.sample(prompts, min(cfg.batch_size, len(prompts)))
            on_policy = cfg.method == "reverse_kl" or rng.random() < cfg.lmbda
            if on_policy:
                completions = sample_completions(student, tokenizer, batch, cfg, seed=cfg.seed * 1_000_003 + step)
            else:
                completions = [p.completion_ids for p in batch]
            ids, attn, predict, tokens = _batch(batch, completions, pad)
            if tokens.numel() == 0:
                continue
            s_logits = selected_logits(student, ids, attn, predict)[:, : cfg.vocab_size]
            with torch.no_grad():
                t_logits = selected_logits(teacher, ids, attn, predict)[:, : cfg.vocab_size]
                t_lp = F.log_softmax(t_logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
            s_lp = F.log_softmax(s_logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
            if cfg.method == "gkd":
                loss = divergence("jsd", s_logits, t_logits, beta=cfg.beta)
            else:
                adv = advantages(s_lp.detach(), t_lp)
                # a constant baseline (the batch mean) keeps the step unbiased and cuts its variance
                loss = policy_gradient(s_lp, adv - adv.mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            tokens_seen += int(attn.sum())
            rec = {
                "step": step + 1, "loss": loss.item(), "on_policy": on_policy,
                "reverse_kl": (s_lp.detach() - t_lp).mean().item(), "completion_tokens": tokens.numel(),
                "tokens": tokens_seen, "tokens_per_s": tokens_seen / max(time.perf_counter() - start, 1e-9),
            }
            history.append(rec)
            advance(1, info=f"loss {rec['loss']:.3f} rkl {rec['reverse_kl']:.3f}")
    student.eval()
    return history
