"""Evaluating a model on held-out problems: accuracy, speed, size and closeness to the teacher."""

from __future__ import annotations

import time

import torch

from ..models import param_count
from ..progress import progress
from ..scoring import right_pad, selected_logits
from ..teachers.base import SamplingParams
from ..teachers.hf import HFTeacher, encode_batch, encode_prompt, render_chat
from .metrics import mean, per_token_kl


def messages_for(record: dict, system_prompt: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": record["question"]}]


def greedy_accuracy(model, tokenizer, records, verifier, *, max_new_tokens=32, batch_size=32, system_prompt=None, label="model"):
    """Greedy pass@1 and the per-problem outputs."""
    gen = HFTeacher(model, tokenizer, batch_size=batch_size)
    outs = gen.generate(
        [messages_for(r, system_prompt) for r in records],
        SamplingParams(max_new_tokens=max_new_tokens),
        description=f"Evaluating {label}",
    )
    rows = []
    for rec, comps in zip(records, outs):
        c = comps[0]
        v = verifier(rec, c.text)
        rows.append({"id": rec["id"], "completion": c.text, "completion_ids": c.token_ids + ([c.stop_token] if c.stop_token is not None else []), "passed": v.passed, "extracted": v.extracted})
    return mean([r["passed"] for r in rows]), rows


@torch.inference_mode()
def decode_tokens_per_s(model, tokenizer, prompts: list[str], *, batch_size=16, new_tokens=32, repeats=2) -> float:
    """Decode throughput at a batch size: best of `repeats` runs forcing exactly `new_tokens` tokens."""
    enc = encode_batch(tokenizer, prompts[:batch_size])
    n = enc["input_ids"].size(0)
    model.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(
            **enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
        )
        best = max(best, n * new_tokens / (time.perf_counter() - t0))
    return best


@torch.inference_mode()
def kl_to_teacher(model, teacher, tokenizer, prompt_texts: list[str], completions: list[list[int]], batch_size=16, label="model") -> float:
    """Mean per-token KL(teacher || model) over the completion tokens of held-out teacher outputs."""
    seqs, firsts = [], []
    for text, comp in zip(prompt_texts, completions):
        p = encode_prompt(tokenizer, text)
        if comp:
            seqs.append(p + comp)
            firsts.append(len(p))
    total, count = 0.0, 0
    with progress(f"KL to teacher: {label}", total=len(seqs)) as advance:
        for b in range(0, len(seqs), batch_size):
            chunk, starts = seqs[b : b + batch_size], firsts[b : b + batch_size]
            ids, attn = right_pad(chunk, tokenizer.pad_token_id)
            positions = torch.zeros_like(attn, dtype=torch.bool)
            for r, (s, f) in enumerate(zip(chunk, starts)):
                positions[r, f - 1 : len(s) - 1] = True
            kl = per_token_kl(selected_logits(model, ids, attn, positions), selected_logits(teacher, ids, attn, positions))
            total += float(kl.sum())
            count += kl.numel()
            advance(len(chunk))
    return total / max(count, 1)


def evaluate(model, tokenizer, records, verifier, *, teacher=None, teacher_rows=None, system_prompt=None,
             max_new_tokens=32, batch_size=32, speed_batch=16, label="model") -> dict:
    """All quickstart metrics for one model; `teacher_rows` are the teacher's own greedy outputs."""
    acc, rows = greedy_accuracy(model, tokenizer, records, verifier, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, system_prompt=system_prompt, label=label)
    prompts = [render_chat(tokenizer, messages_for(r, system_prompt)) for r in records]
    metrics = {
        "pass_at_1": acc,
        "n_problems": len(records),
        "params": param_count(model),
        "layers": getattr(model.config, "num_hidden_layers", None),
        "decode_tok_per_s": decode_tokens_per_s(model, tokenizer, prompts, batch_size=speed_batch),
    }
    if teacher is not None and teacher_rows is not None:
        metrics["kl_to_teacher"] = kl_to_teacher(
            model, teacher, tokenizer, prompts, [r["completion_ids"] for r in teacher_rows], label=label
        )
    return {"metrics": metrics, "rows": rows}
