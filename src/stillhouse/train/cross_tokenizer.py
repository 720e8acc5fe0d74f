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
the aligned positions; training then needs the student alone in memory. This module has its
own small loop because the shared loop (`loop.py`) scores one token sequence with both
models, which is exactly what different tokenizers rule out.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from ..progress import progress
from ..scoring import right_pad, selected_logits
from ..teachers.hf import encode_prompt, render_chat
from .losses import cross_entropy, sorted_probs, sorted_wasserstein


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


def prepare(student_tok, teacher_tok, teacher, records: list[tuple[list[dict], str]], cfg: CrossConfig):
    """Tokenise every (messages, completion text) record for both sides, align, score the teacher.

    Alignments are cut to what fits in max_length on both sides.
    """
    items = []
    for messages, text in records:
        s = encode_side(student_tok, messages, text, student_tok.eos_token_id)
        t = encode_side(teacher_tok, messages, text, teacher_tok.eos_token_id)
        al = [(i, j) for i, j in aligned_pairs(s, t)
              if len(s.prompt_ids) + i < cfg.max_length and len(t.prompt_ids) + j < cfg.max_length and
              len(s.prompt_ids) + i >= 1 and len(t.prompt_ids) + j >= 1]
        items.append((s, t, al))
    signal = teacher_signal(teacher, teacher_tok.pad_token_id, items, cfg) if cfg.uld_weight > 0 else [None] * len(items)
    return [(s, al, sig) for (s, _, al), sig in zip(items, signal)]


def _student_batch(batch, pad_id: int, max_length: int):
    seqs = [(s.prompt_ids + s.completion_ids)[:max_length] for s, _, _ in batch]
    ids, attn = right_pad(seqs, pad_id)
    predict = torch.zeros_like(ids, dtype=torch.bool)
    aligned = torch.zeros_like(ids, dtype=torch.bool)
    for r, ((s, al, _), seq) in enumerate(zip(batch, seqs)):
        first = max(len(s.prompt_ids), 1)
        predict[r, first - 1 : len(seq) - 1] = True
        for i, _ in al:
            aligned[r, len(s.prompt_ids) + i - 1] = True
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = torch.where(predict[:, :-1], ids[:, 1:], -100)
    return ids, attn, predict, targets[predict], aligned[predict]


def uld_distance(student, pad_id: int, prepared, cfg: CrossConfig) -> float:
    """Mean sorted-probability distance to the teacher at aligned positions (evaluation)."""
    with torch.no_grad():
        ids, attn, predict, _, aligned = _student_batch(prepared, pad_id, cfg.max_length)
        logits = selected_logits(student, ids, attn, predict)[aligned]
        top = torch.cat([sig[0] for _, _, sig in prepared])
        rest = torch.cat([sig[1] for _, _, sig in prepared])
        return sorted_wasserstein(logits, top, rest, cfg.temperature).item()


def train_cross(student, pad_id: int, prepared, cfg: CrossConfig, description: str = "Cross-tokenizer distillation") -> list[dict]:
    """SFT on the student's tokens of the teacher's text, plus ULD at aligned positions."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    total = max(1, int(round(math.ceil(len(prepared) / cfg.batch_size) * cfg.epochs)))
    student.train()
    history, order, tokens_seen, start = [], [], 0, time.perf_counter()
    with progress(description, total=total) as advance:
        for step in range(total):
            if not order:
                order = list(range(len(prepared)))
                rng.shuffle(order)
            batch = [prepared[i] for i in order[: cfg.batch_size]]
            order = order[cfg.batch_size :]
            ids, attn, predict, targets, aligned = _student_batch(batch, pad_id, cfg.max_length)
            logits = selected_logits(student, ids, attn, predict)
            sft = cross_entropy(logits, targets)
            loss = cfg.sft_weight * sft
            uld = torch.zeros(())
            if cfg.uld_weight > 0 and aligned.any():
                top = torch.cat([sig[0] for _, _, sig in batch])
                rest = torch.cat([sig[1] for _, _, sig in batch])
                uld = sorted_wasserstein(logits[aligned], top, rest, cfg.temperature)
                loss = loss + cfg.uld_weight * uld
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            tokens_seen += int(attn.sum())
            rec = {"step": step + 1, "loss": loss.item(), "sft": sft.item(), "uld": uld.item(),
                   "aligned_share": aligned.float().mean().item(), "tokens": tokens_seen,
                   "tokens_per_s": tokens_seen / max(time.perf_counter() - start, 1e-9)}
            history.append(rec)
            advance(1, info=f"sft {rec['sft']:.3f} uld {rec['uld']:.3f}")
    student.eval()
    return history
