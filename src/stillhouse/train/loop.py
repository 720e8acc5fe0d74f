"""The training loop: SFT on teacher text plus token-level KD on the teacher's logits.

Read it top to bottom: batches are built by length (dynamic padding), the student's hidden
states are computed once, only the positions that predict response tokens go through the
LM head, the teacher (eval mode, no grad) scores exactly the same tokens, and the loss is
a weighted sum of cross-entropy and forward KL at a temperature.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

import torch

from ..progress import progress
from ..scoring import selected_logits
from .losses import LossTerm, TopK, mixture, needs_teacher, terms_from_weights


@dataclass
class TrainConfig:
    epochs: float = 3.0
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 16
    max_length: int = 256
    sft_weight: float = 0.5
    kd_weight: float = 0.5
    temperature: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    # The objective (losses.mixture): term dicts {name, weight, beta, alpha}; None means
    # sft_weight * SFT + kd_weight * forward KL.
    loss_terms: list | None = None
    vocab_size: int | None = None  # compare logits on the tokenizer's real vocabulary (padded heads)

    def terms(self) -> list[LossTerm]:
        if self.loss_terms is None:
            return terms_from_weights(self.sft_weight, self.kd_weight)
        return [LossTerm(**t) for t in self.loss_terms]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # tokens before the first target token; 0 trains on every token
    # Offline teacher signal: top-k ids / log-probs for each target token (len(input_ids) - n_prompt rows).
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    topk_rest: list[float] | None = None  # probability mass outside the top-k (a logit cache has it)


def collate(examples: list[Example], pad_id: int):
    """Right-pad to the longest example in the batch; mark positions that predict a target.

    Returns ids, attention mask, the boolean mask of predicting positions, their targets, and
    the cached teacher top-k rows for those positions (row-major, like `hidden[mask]`) or None.
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    predict = torch.zeros((len(examples), width), dtype=torch.bool)
    targets = torch.full((len(examples), width), -100, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        attn[r, :n] = 1
        first = max(e.n_prompt, 1)
        # position p predicts token p + 1
        predict[r, first - 1 : n - 1] = True
        targets[r, first - 1 : n - 1] = ids[r, first:n]
    cached = None
    if all(e.topk_ids is not None for e in examples):
        # row j of an example's cache scores token n_prompt + j; with n_prompt == 0 the
        # first token has no predicting position, so its row is skipped
        def rows(e, table):
            return table[max(e.n_prompt, 1) - e.n_prompt : len(e.input_ids) - e.n_prompt]

        def stack(table, dtype):
            return torch.cat([torch.as_tensor(rows(e, getattr(e, table))).to(dtype) for e in examples])

        rest = stack("topk_rest", torch.float32) if all(e.topk_rest is not None for e in examples) else None
        cached = TopK(stack("topk_ids", torch.long), stack("topk_logprobs", torch.float32), rest)
    return ids, attn, predict, targets[predict], cached


def length_batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Batches of similar length (little padding), in random order."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    # sort inside windows of 50 batches so batches stay random across epochs
    window = batch_size * 50
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: len(examples[i].input_ids))
        batches += [[examples[i] for i in chunk[b : b + batch_size]] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(total * cfg.warmup_ratio))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress_frac = (step - warm) / max(1, total - warm)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress_frac))


def train(student, examples: list[Example], cfg: TrainConfig, pad_id: int, teacher=None, description="Training"):
    """Train `student` in place. Returns the per-step history (loss, sft, kl, lr, tokens/s)."""
    terms = cfg.terms()
    if needs_teacher(terms) and teacher is None and any(e.topk_ids is None for e in examples):
        raise ValueError("a KD loss term needs a teacher model or a cached teacher signal on every example")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    examples = [
        Example(e.input_ids[: cfg.max_length], e.n_prompt, e.topk_ids, e.topk_logprobs, e.topk_rest) for e in examples
    ]
    examples = [e for e in examples if len(e.input_ids) > max(e.n_prompt, 1)]
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = max(1, int(round(per_epoch * cfg.epochs)))
    decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    if teacher is not None:
        teacher.eval()
    student.train()
    history = []
    batches: list[list[Example]] = []
    tokens_seen, start = 0, time.perf_counter()
    with progress(description, total=total) as advance:
        for step in range(total):
            if not batches:
                batches = length_batches(examples, cfg.batch_size, rng)
            batch = batches.pop()
            ids, attn, predict, targets, cached = collate(batch, pad_id)
            lr = lr_at(step, total, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            s_logits = selected_logits(student, ids, attn, predict)[:, : cfg.vocab_size]
            signal = None
            if needs_teacher(terms):
                if teacher is not None:  # online: the teacher scores exactly these tokens
                    with torch.no_grad():
                        signal = selected_logits(teacher, ids, attn, predict)[:, : cfg.vocab_size]
                else:  # offline: top-k log-probs cached with the data or in a logit cache
                    signal = cached
            loss, parts = mixture(terms, s_logits, targets, signal, temperature=cfg.temperature)
            kd_parts = [v for k, v in parts.items() if k != "sft"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            tokens_seen += int(attn.sum())
            elapsed = time.perf_counter() - start
            rec = {
                "step": step + 1,
                "loss": loss.item(),
                "sft": parts.get("sft", 0.0),
                "kl": sum(kd_parts),  # the KD terms, unweighted (each is also logged as loss/<name>)
                **{f"loss/{k}": v for k, v in parts.items()},
                "lr": lr,
                "tokens": tokens_seen,
                "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
            }
            history.append(rec)
            advance(1, info=f"loss {rec['loss']:.3f} kl {rec['kl']:.3f} {rec['tokens_per_s']:.0f} tok/s")
    student.eval()
    return history
