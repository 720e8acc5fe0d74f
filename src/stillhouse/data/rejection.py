"""Rejection sampling: the teacher answers, a verifier checks, only correct traces are kept.

Sampling is adaptive: one greedy pass first, then `samples` draws only for problems the
greedy answer got wrong, so compute goes where the teacher is unsure instead of re-solving
problems it already gets right.

With a `teacher_prompt` (context distillation) the teacher answers a richer prompt (worked
examples, instructions) while each record keeps the plain prompt: the student is trained to
give, unprompted, the answers the teacher gives only when helped.
"""

from __future__ import annotations

from typing import Callable

from ..teachers.base import Completion, SamplingParams
from ..teachers.hf import encode_prompt, render_chat
from .prompts import fill, template_hash


def teacher_messages(question: str, system_prompt: str | None, teacher_prompt=None) -> list[dict]:
    """The chat the teacher answers: the plain prompt, or the `teacher_prompt`'s system
    prompt, worked (question, answer) turns and template around the question."""
    if teacher_prompt is None:
        return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]
    system = teacher_prompt.system_prompt
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in teacher_prompt.examples:
        msgs += [{"role": "user", "content": fill(teacher_prompt.template, question=q)}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": fill(teacher_prompt.template, question=question)}]


def teacher_prompt_hash(teacher, system_prompt: str | None, teacher_prompt=None) -> str:
    """template_hash of what the teacher saw: the plain prompt's, or one that also covers the
    generation-time prompt (so records made with and without it never share a hash)."""
    if teacher_prompt is None:
        return template_hash(teacher, system_prompt)
    return template_hash(teacher, system_prompt, teacher_prompt.model_dump_json())


def _row(rec, prompt_text, prompt_ids, c: Completion, idx, verdict, teacher_name, params, tpl_hash) -> dict:
    target = c.token_ids + ([c.stop_token] if c.stop_token is not None else [])
    return {
        "id": f"{rec['id']}/{idx}",
        "problem_id": rec["id"],
        "sample_index": idx,
        "question": rec["question"],
        "reference": rec["answer"],
        "prompt": prompt_text,
        "prompt_ids": prompt_ids,
        "completion": c.text,
        "completion_ids": target,
        "finish_reason": c.finish_reason,
        "passed": verdict.passed,
        "score": verdict.score,
        "extracted": verdict.extracted,
        "teacher": teacher_name,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": params.seed,
        "template_hash": tpl_hash,
        "topk_ids": c.topk_ids,
        "topk_logprobs": c.topk_logprobs,
    }


def rejection_sample(
    teacher,
    records: list[dict],
    verifier: Callable,
    *,
    samples: int = 4,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    greedy_first: bool = True,
    keep_per_problem: int = 4,
    top_k_logprobs: int = 0,
    seed: int = 0,
    system_prompt: str | None = None,
    keep_failed: bool = False,
    teacher_prompt=None,
) -> tuple[list[dict], dict]:
    """Verified rows (one per kept completion) and statistics (pass rates, coverage).

    With `keep_failed`, distinct failing completions are kept too (marked `passed=False`):
    still the teacher's distribution, usable for logit-only distillation, never as SFT targets.
    With `teacher_prompt` (data/config.TeacherPrompt) the teacher is asked through it, and the
    rows still hold the plain prompt (`prompt`, `prompt_ids`).
    """
    tok = teacher.tokenizer
    prompt_texts = [render_chat(tok, teacher_messages(r["question"], system_prompt)) for r in records]
    prompt_ids = [encode_prompt(tok, t) for t in prompt_texts]
    asked = prompt_texts if teacher_prompt is None else [
        render_chat(tok, teacher_messages(r["question"], system_prompt, teacher_prompt)) for r in records]
    tpl = teacher_prompt_hash(teacher, system_prompt, teacher_prompt)
    kept: dict[int, list[dict]] = {i: [] for i in range(len(records))}
    failed: dict[int, list[dict]] = {i: [] for i in range(len(records))}
    seen: dict[int, set] = {i: set() for i in range(len(records))}
    attempts = {i: 0 for i in range(len(records))}
    passes = {i: 0 for i in range(len(records))}

    def absorb(indices, outs, params, offset):
        for i, comps in zip(indices, outs):
            for j, c in enumerate(comps):
                v = verifier(records[i], c.text)
                attempts[i] += 1
                passes[i] += int(v.passed)
                key = tuple(c.token_ids)
                if key in seen[i]:
                    continue
                row = _row(records[i], prompt_texts[i], prompt_ids[i], c, offset + j, v, teacher.name, params, tpl)
                if v.passed and len(kept[i]) < keep_per_problem:
                    seen[i].add(key)
                    kept[i].append(row)
                elif not v.passed and keep_failed:
                    seen[i].add(key)
                    failed[i].append(row)

    todo = list(range(len(records)))
    greedy_passed = 0
    if greedy_first:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
        # greedy decoding is deterministic: a repeated prompt is decoded once
        unique = list(dict.fromkeys(asked[i] for i in todo))
        by_text = dict(zip(unique, teacher.generate_text(unique, params, "Teacher greedy pass", top_k_logprobs)))
        absorb(todo, [by_text[asked[i]] for i in todo], params, 0)
        greedy_passed = sum(1 for i in todo if kept[i])
        todo = [i for i in todo if not kept[i]]
    if samples > 0 and todo:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=samples, seed=seed)
        outs = teacher.generate_text([asked[i] for i in todo], params, f"Teacher sampling x{samples}", top_k_logprobs)
        absorb(todo, outs, params, 1)
    rows = [r for i in range(len(records)) for r in kept[i] + failed[i]]
    rates = {records[i]["id"]: passes[i] / max(1, attempts[i]) for i in range(len(records))}
    for r in rows:
        r["pass_rate"] = rates[r["problem_id"]]
    covered = sum(1 for i in kept if kept[i])
    stats = {
        "problems": len(records),
        "problems_covered": covered,
        "coverage": covered / max(1, len(records)),
        "greedy_pass_rate": greedy_passed / max(1, len(records)) if greedy_first else None,
        "sampled_problems": len(todo) if samples > 0 else 0,
        "completions": sum(attempts.values()),
        "passed_completions": sum(passes.values()),
        "records": len(rows),
        "passed_records": sum(len(k) for k in kept.values()),
        "teacher_generated_tokens": teacher.stats["generated_tokens"],
        "teacher_seconds": round(teacher.stats["seconds"], 2),
        "pass_rates": rates,  # per problem: passing / all verified completions
    }
    return rows, stats
