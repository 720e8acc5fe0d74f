"""Cross-tokenizer distillation: a teacher whose tokenizer differs from the student's.

Two signals, both defined without a shared vocabulary:

1. Sequence-level KD: the student trains (cross-entropy) on the teacher's completion *text*,
   re-tokenised with its own tokenizer and wrapped in its own chat template.
2. Token-level, at aligned positions: both tokenizers split the completion text; where a
   student token and a teacher token start at the same character, both models predict the
   next token from the same text prefix. At those positions the student's sorted
   probabilities are pulled towards the teacher's (Universal Logit Distillation's sorted
   L1 / Wasserstein distance, `losses.sorted_wasserstein`).

The teacher runs once, up front (no grad), and keeps only its top-k sorted probabilities at
the aligned positions; those ride on the student's training examples (`Example.sorted_*`),
so training holds the student alone and goes through the shared loop (`loop.train`, a
"uld" loss term): accumulation, data parallelism, checkpoints and resume included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..scoring import right_pad, selected_logits
from ..teachers.hf import encode_prompt, render_chat
from .loop import Example, TrainConfig, collate, collate_sorted, train
from .losses import sorted_probs, sorted_wasserstein


@dataclass
class CrossConfig:
    epochs: float = 2.0
    lr: float = 2e-4
    batch_size: int = 8
    sft_weight: float = 1.0
    uld_weight: float = 1.0
    top_k: int = 256  # teacher probabilities kept per aligned position
    temperature: float = 1.0
    max_length: int = 256
    seed: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 0
    checkpoint_every: int = 0

    def train_config(self) -> TrainConfig:
        """The shared loop's settings: SFT plus ULD, each summed over the step's target tokens."""
        terms = [{"name": "sft", "weight": self.sft_weight}, {"name": "uld", "weight": self.uld_weight}]
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, max_length=self.max_length,
                           temperature=self.temperature, grad_clip=self.grad_clip, seed=self.seed,
                           micro_batch_size=self.micro_batch_size, checkpoint_every=self.checkpoint_every,
                           loss_terms=terms)


@dataclass
class Side:
    """One model's view of a record: its prompt ids and its tokenisation of the completion."""

    prompt_ids: list[int]
    completion_ids: list[int]  # + the end-of-turn token
    starts: list[int]  # character offset where each completion token starts (end token: len(text))


def encode_side(tokenizer, messages: list[dict], completion: str, end_id: int) -> Side:
    prompt = render_chat(tokenizer, messages)
    enc = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    return Side(encode_prompt(tokenizer, prompt), list(enc["input_ids"]) + [end_id],
                [s for s, _ in enc["offset_mapping"]] + [len(completion)])


def aligned_pairs(student: Side, teacher: Side) -> list[tuple[int, int]]:
    """(student index, teacher index) of completion tokens that start at the same character.

    Both models then predict from the same text prefix, so their next-token distributions
    describe the same continuation.
    """
    t_at = {}
    for j, s in enumerate(teacher.starts):
        t_at.setdefault(s, j)
    pairs, seen = [], set()
    for i, s in enumerate(student.starts):
        if s in t_at and s not in seen:
            seen.add(s)
            pairs.append((i, t_at[s]))
    return pairs


@torch.no_grad()
def teacher_signal(teacher, pad_id: int, pairs: list[tuple[Side, Side, list]], cfg: CrossConfig, batch_size: int = 8):
    """For each record, the teacher's top-k sorted probabilities at its aligned positions."""
    out = []
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b : b + batch_size]
        seqs = [(t.prompt_ids + t.completion_ids)[: cfg.max_length] for _, t, _ in chunk]
        ids, attn = right_pad(seqs, pad_id)
        predict = torch.zeros_like(ids, dtype=torch.bool)
        for r, (_, t, al) in enumerate(chunk):
            for _, j in al:
                predict[r, len(t.prompt_ids) + j - 1] = True
        top, rest = sorted_probs(selected_logits(teacher, ids, attn, predict), cfg.top_k, cfg.temperature)
        start = 0
        for _, _, al in chunk:
            out.append((top[start : start + len(al)], rest[start : start + len(al)]))
            start += len(al)
    return out


def prepare(student_tok, teacher_tok, teacher, records: list[tuple[list[dict], str]], cfg: CrossConfig) -> list[Example]:
    """The student's training examples for (messages, completion text) records: its own
    tokens of the teacher's text, and (with uld_weight > 0) the teacher's sorted top-k
    probabilities at the aligned tokens. Alignments are cut to what fits in max_length on
    both sides."""
    items = []
    for messages, text in records:
        s = encode_side(student_tok, messages, text, student_tok.eos_token_id)
        t = encode_side(teacher_tok, messages, text, teacher_tok.eos_token_id)
        al = [(i, j) for i, j in aligned_pairs(s, t)
              if len(s.prompt_ids) + i < cfg.max_length and len(t.prompt_ids) + j < cfg.max_length and
              len(s.prompt_ids) + i >= 1 and len(t.prompt_ids) + j >= 1]
        items.append((s, t, al))
    signal = teacher_signal(teacher, teacher_tok.pad_token_id, items, cfg) if cfg.uld_weight > 0 else [None] * len(items)
    out = []
    for (s, _, al), sig in zip(items, signal):
        e = Example(s.prompt_ids + s.completion_ids, len(s.prompt_ids))
        if sig is not None:  # completion token i is target row i
            e.sorted_rows, e.sorted_top, e.sorted_rest = [i for i, _ in al], sig[0], sig[1]
        out.append(e)
    return out


@torch.no_grad()
def uld_distance(student, pad_id: int, examples: list[Example], cfg: CrossConfig, batch_size: int = 16) -> float:
    """Mean sorted-probability distance to the teacher at aligned positions (evaluation)."""
    total, rows = 0.0, 0
    for b in range(0, len(examples), batch_size):
        batch = [replace(e, input_ids=e.input_ids[: cfg.max_length]) for e in examples[b : b + batch_size]]
        ids, attn, predict, _, _ = collate(batch, pad_id)
        ranked = collate_sorted(batch)
        logits = selected_logits(student, ids, attn, predict)[ranked.rows]
        total += sorted_wasserstein(logits, ranked.top, ranked.rest, cfg.temperature, reduction="sum").item()
        rows += len(ranked.rows)
    return total / max(rows, 1)


def train_cross(student, pad_id: int, examples: list[Example], cfg: CrossConfig,
                description: str = "Cross-tokenizer distillation", checkpoint_dir: str | Path | None = None,
                resume: bool = False, metrics_path: str | Path | None = None) -> list[dict]:
    """SFT on the student's tokens of the teacher's text, plus ULD at aligned positions; the
    shared loop's per-step history (`sft`, `loss/uld`, ...)."""
    return train(student, examples, cfg.train_config(), pad_id, description=description,
                 checkpoint_dir=checkpoint_dir, resume=resume, metrics_path=metrics_path)
