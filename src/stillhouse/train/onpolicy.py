"""On-policy distillation: the student samples, the teacher scores the student's own tokens.

It is an objective of the shared training loop (train/loop.py), so it has the loop's
checkpoints, `--resume`, schedule, gradient accumulation and accelerate. Each step's plan
entry (fixed up front from the seed, like the loop's other plans) is a set of prompts and
whether the step is on-policy; when the step comes, the student samples those prompts'
completions with the weights it has then (or, for GKD's off-policy share, the dataset's
teacher completions are used), and both models score those exact tokens at the completion
positions only. Then one of two kinds of step:

- `gkd` (Agarwal et al. 2024): a generalised JSD(beta) between the two distributions at every
  position, i.e. a distillation loss on the student's own text (lmbda = share of steps that
  are student samples; 0 is plain off-policy KD on the dataset).
- `reverse_kl` (on-policy distillation as reinforcement learning, as in tinker-cookbook): a
  policy-gradient step where each sampled token's advantage is -(log p_student - log p_teacher).
  Its expectation is the gradient of the reverse KL to the teacher. Any per-token advantage
  plugs into the same step (`advantages=`), so reward-based training needs no second trainer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..scoring import selected_logits
from ..teachers.base import SamplingParams
from ..teachers.hf import HFTeacher
from . import loop
from .config import OnPolicySettings
from .losses import divergence, policy_gradient


class OnPolicyConfig(OnPolicySettings):
    """On-policy training's settings (train/config.OnPolicySettings, shared with the stage) and
    what the stage works out before training."""

    vocab_size: int | None = None  # compare logits on the tokenizer's real vocabulary (padded heads)


@dataclass
class Prompt:
    text: str  # the rendered prompt (chat template applied), as the student sees it
    ids: list[int]
    completion_ids: list[int] | None = None  # a teacher completion, for GKD's off-policy share


def reverse_kl_advantages(student_lp: torch.Tensor, teacher_lp: torch.Tensor) -> torch.Tensor:
    """Per-token advantage of on-policy distillation: -(log p_student - log p_teacher) of the sampled token."""
    return -(student_lp - teacher_lp)


def sample_completions(student, tokenizer, prompts: list[Prompt], cfg: OnPolicySettings, seed: int) -> list[list[int]]:
    """The student's own completions (with the stop token that ended them), sampled at cfg's temperature."""
    sampler = HFTeacher(student, tokenizer, name="student", batch_size=len(prompts))
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature, seed=seed)
    was_training = student.training
    student.eval()
    outs = sampler.generate_text([p.text for p in prompts], params, "Student sampling")
    student.train(was_training)
    return [c[0].token_ids + ([c[0].stop_token] if c[0].stop_token is not None else []) for c in outs]


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)


# The loss each method's step takes, as named in the log.
_LOSS = {"gkd": "jsd", "reverse_kl": "policy_gradient"}


class OnPolicy:
    """The loop's objective for on-policy distillation, over `Prompt`s; normalised by the step's
    completion tokens, as every objective of the loop."""

    name = "onpolicy"
    uses_teacher = True

    def __init__(self, tokenizer, advantages: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = reverse_kl_advantages):
        self.tokenizer = tokenizer
        self.advantages = advantages
        # what the step being run sampled, for its log record (the loop logs after the step)
        self._step = {"on_policy": False, "completion_tokens": 0}

    def check(self, prompts: list, cfg: OnPolicyConfig, teacher) -> None:
        if teacher is None:
            raise ValueError("on-policy distillation needs a teacher model to score the student's tokens")
        if cfg.method == "gkd" and cfg.lmbda < 1 and any(p.completion_ids is None for p in prompts):
            raise ValueError("gkd with lmbda < 1 needs a teacher completion for every prompt")

    def items(self, prompts: list, cfg: OnPolicyConfig) -> list:
        return list(prompts)

    def prepare(self, student, items: list, pad_id: int, cfg: OnPolicyConfig, device) -> dict:
        return {}

    def plan(self, prompts: list, cfg: OnPolicyConfig) -> list[tuple[list[Prompt], bool]]:
        """Every step's distinct prompts and whether the student samples them, from the seed alone
        (so a resumed run takes the same steps)."""
        rng = random.Random(cfg.seed)
        plan = []
        for _ in range(cfg.steps):
            batch = rng.sample(prompts, min(cfg.batch_size, len(prompts)))
            plan.append((batch, cfg.method == "reverse_kl" or rng.random() < cfg.lmbda))
        return plan

    def batch(self, planned, step: int, student, teacher, pad_id: int, cfg: OnPolicyConfig, device) -> list:
        """The step's examples: its prompts with the student's fresh samples (or the teacher's text)."""
        prompts, on_policy = planned
        if on_policy:
            completions = sample_completions(student, self.tokenizer, prompts, cfg, seed=cfg.seed * 1_000_003 + step)
        else:
            completions = [p.completion_ids for p in prompts]
        examples = [loop.Example((p.ids + c)[: cfg.max_length], len(p.ids)) for p, c in zip(prompts, completions)]
        if cfg.method == "reverse_kl":
            self._score(examples, student, teacher, pad_id, cfg, device)
        self._step = {"on_policy": on_policy, "completion_tokens": self.units(examples)}
        return examples

    @torch.no_grad()
    def _score(self, examples: list, student, teacher, pad_id: int, cfg: OnPolicyConfig, device) -> None:
        """Each sampled token's advantage, fixed before the step, minus the whole step's mean (a
        constant baseline keeps the step unbiased and cuts its variance; taken over the step, not
        a micro-batch, so accumulation gives one big batch's step)."""
        ids, attn, predict, tokens, _ = loop.collate(examples, pad_id)
        ids, attn, predict, tokens = ids.to(device), attn.to(device), predict.to(device), tokens.to(device)
        s_lp = _token_logprobs(selected_logits(student, ids, attn, predict)[:, : cfg.vocab_size], tokens)
        t_lp = _token_logprobs(selected_logits(teacher, ids, attn, predict)[:, : cfg.vocab_size], tokens)
        adv = self.advantages(s_lp, t_lp).float()
        adv = adv - adv.mean()
        offset = 0
        for e in examples:  # collate's targets are row-major: each example's in turn
            n = loop.n_targets(e)
            e.advantages, e.teacher_logprobs = adv[offset : offset + n].tolist(), t_lp[offset : offset + n].tolist()
            offset += n

    def units(self, batch: list) -> int:
        """What a step's loss is normalised by: its completion tokens."""
        return sum(loop.n_targets(e) for e in batch)

    def terms(self, scorer, mb: list, state: dict, pad_id: int, cfg: OnPolicyConfig, device, teacher):
        ids, attn, predict, tokens, _ = loop.collate(mb, pad_id)
        ids, attn, predict, tokens = ids.to(device), attn.to(device), predict.to(device), tokens.to(device)
        s_logits = scorer(ids, attn, predict)[:, : cfg.vocab_size]
        s_lp = _token_logprobs(s_logits, tokens)
        if cfg.method == "gkd":
            with torch.no_grad():
                t_logits = selected_logits(teacher, ids, attn, predict)[:, : cfg.vocab_size]
            t_lp = _token_logprobs(t_logits, tokens)
            loss = divergence("jsd", s_logits, t_logits, beta=cfg.beta, reduction="sum")
        else:
            adv = torch.tensor([a for e in mb for a in e.advantages], device=device)
            t_lp = torch.tensor([t for e in mb for t in e.teacher_logprobs], device=device)
            loss = policy_gradient(s_lp, adv, reduction="sum")
        # reverse_kl: the Monte-Carlo estimate of KL(student || teacher) on the step's tokens
        parts = {_LOSS[cfg.method]: loss.detach(), "reverse_kl": (s_lp.detach() - t_lp).sum()}
        counts = {"rows": len(mb), "padded": ids.numel(), "positions": tokens.numel(), "tokens": int(attn.sum())}
        return loss, parts, counts

    def logged(self, totals: dict, cfg: OnPolicyConfig) -> tuple[float, dict]:
        return totals.get(_LOSS[cfg.method], 0.0), {"reverse_kl": totals.get("reverse_kl", 0.0), **self._step}


def train_onpolicy(
    student,
    teacher,
    tokenizer,
    prompts: list[Prompt],
    cfg: OnPolicyConfig,
    advantages: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = reverse_kl_advantages,
    description: str = "On-policy distillation",
    **loop_options,
) -> list[dict]:
    """Train `student` in place against `teacher` through the shared loop; returns the per-step
    history. `loop_options` are loop.train's (checkpoint_dir, resume, metrics_path, accelerator).

    `reverse_kl` in the history is the per-token Monte-Carlo estimate mean(log p_s - log p_t)
    on the step's tokens (exact in expectation on student samples).
    """
    return loop.train(student, prompts, cfg, tokenizer.pad_token_id, teacher=teacher, description=description,
                      objective=OnPolicy(tokenizer, advantages), **loop_options)
