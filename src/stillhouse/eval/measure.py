"""Measuring one model: answers to problems, decode speed, time to first token, likelihood of
held-out text, and closeness to a teacher. Suites (which problems) live in suites.py; running
several models side by side lives in compare.py."""

from __future__ import annotations

import time

import torch

from ..progress import progress
from ..scoring import right_pad, selected_logits
from ..teachers.base import SamplingParams
from ..teachers.hf import HFTeacher, encode_batch, encode_prompt
from .metrics import mean, per_token_kl


def messages_for(record: dict, system_prompt: str | None = None) -> list[dict]:
    system_prompt = record.get("system") or system_prompt
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": record["question"]}]


def answer(model, tokenizer, records, verifier, params: SamplingParams, *, batch_size=32, system_prompt=None, label="model") -> list[list[dict]]:
    """`params.n` completions per record, each verified: rows of {id, completion, completion_ids, passed, score, extracted}."""
    gen = HFTeacher(model, tokenizer, batch_size=batch_size)
    mode = "greedy" if params.temperature == 0 else f"{params.n} samples"
    outs = gen.generate([messages_for(r, system_prompt) for r in records], params, description=f"Evaluating {label} ({mode})")
    result = []
    for rec, comps in zip(records, outs):
        rows = []
        for c in comps:
            v = verifier(rec, c.text)
            rows.append({"id": rec["id"], "completion": c.text,
                         "completion_ids": c.token_ids + ([c.stop_token] if c.stop_token is not None else []),
                         "passed": bool(v.passed), "score": float(v.score), "extracted": str(v.extracted)})
        result.append(rows)
    return result


def greedy_accuracy(model, tokenizer, records, verifier, *, max_new_tokens=32, batch_size=32, system_prompt=None, label="model"):
    """Greedy pass@1 and the per-problem outputs."""
    rows = [r[0] for r in answer(model, tokenizer, records, verifier, SamplingParams(max_new_tokens=max_new_tokens),
                                 batch_size=batch_size, system_prompt=system_prompt, label=label)]
    return mean([r["passed"] for r in rows]), rows


@torch.inference_mode()
def decode_tokens_per_s(model, tokenizer, prompts: list[str], *, batch_size=16, new_tokens=32, repeats=2) -> float:
    """Decode throughput at a batch size: best of `repeats` runs forcing exactly `new_tokens` tokens.

    Fewer prompts than the batch size are repeated so the batch is always full."""
    prompts = (prompts * -(-batch_size // len(prompts)))[:batch_size]
    enc = encode_batch(tokenizer, prompts)
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
def time_to_first_token(model, tokenizer, prompt: str, *, repeats=3) -> float:
    """Seconds from a batch-1 prompt to its first generated token (prefill + one step), best of `repeats`."""
    enc = encode_batch(tokenizer, [prompt])
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                       temperature=None, top_p=None, top_k=None)
        times.append(time.perf_counter() - t0)
    return min(times[1:])  # the first run warms up


@torch.inference_mode()
def text_nll(model, tokenizer, texts: list[str], *, batch_size=8, max_length=1024, label="model") -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) of `texts` and the number of tokens scored."""
    seqs = [ids[:max_length] for ids in (encode_prompt(tokenizer, t) for t in texts) if len(ids) > 1]
    total, count = 0.0, 0
    with progress(f"Perplexity: {label}", total=len(seqs)) as advance:
        for b in range(0, len(seqs), batch_size):
            chunk = seqs[b : b + batch_size]
            ids, attn = right_pad(chunk, tokenizer.pad_token_id)
            positions = attn.bool().clone()
            positions[:, -1] = False
            for r, s in enumerate(chunk):
                positions[r, len(s) - 1] = False  # the last real token predicts nothing
            logits = selected_logits(model, ids, attn, positions)
            targets = ids[:, 1:][positions[:, :-1]]
            total += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
            count += targets.numel()
            advance(len(chunk))
    return total, count


def same_tokenizer(a, b) -> bool:
    """KL per token is only defined when both models split text into the same tokens."""
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens


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
