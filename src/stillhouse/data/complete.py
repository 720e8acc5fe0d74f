"""Stage `complete`: prompts -> teacher responses, resumable, with provenance on every record."""

from __future__ import annotations

from ..teachers.base import SamplingParams
from .output import finish_dataset, record_filter
from .prompts import completion_columns, generate, load_prompts, messages, provenance, template_hash, teacher_tokens
from .shards import run_units, unit_seed, units_of


def run_complete(ctx) -> None:
    c = ctx.config
    prompts = load_prompts(ctx)
    teacher = ctx.teacher(c.teacher, batch_size=c.batch_size)
    tpl = template_hash(teacher, c.system_prompt)

    def work(u: int, unit) -> tuple[list[dict], dict]:
        params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                n=c.samples, seed=unit_seed(c.seed, u))
        before, cut = teacher.stats["generated_tokens"], teacher.stats.get("truncated_prompts", 0)
        texts, ids, outs = generate(teacher, [messages(c.system_prompt, p["prompt_source"]) for p in unit], params,
                                    f"Teacher completions (shard {u})", c.top_k_logprobs, c.too_long)
        prov = provenance(ctx, c.teacher, teacher, params, tpl)
        rows = [
            {"id": f"{p['id']}/{j}", "prompt_id": p["id"], "sample_index": j, "question": p["prompt_source"],
             "prompt": text, "prompt_ids": pid, **completion_columns(comp), **prov}
            for p, text, pid, comps in zip(unit, texts, ids, outs) for j, comp in enumerate(comps)
        ]
        return rows, {"prompts": len(unit), "teacher_generated_tokens": teacher.stats["generated_tokens"] - before,
                      "truncated_prompts": teacher.stats.get("truncated_prompts", 0) - cut}

    shards = run_units(ctx.name, ctx.out.path, units_of(prompts, c.shard_size), work, "Completing prompts")
    stats = shards.stats()
    filt = record_filter(ctx, key=lambda r: r["question"] + "\n" + r["completion"], prompt=lambda r: r["question"])
    finish_dataset(ctx, shards, filt)
    ctx.out.counts["prompts"] = len(prompts)
    truncated = sum(s.get("truncated_prompts", 0) for s in stats)
    if truncated:
        ctx.out.counts["truncated_prompts"] = truncated
        ctx.out.warnings.append(f"{truncated} prompts were longer than the teacher's context and were truncated (too_long: truncate)")
    ctx.out.metrics["teacher_generated_tokens"] = teacher_tokens(stats)
    ctx.out.teachers.append({**ctx.identity(c.teacher).to_dict(), "role": "data", "token_share": 1.0})
