"""Stage `critique_revise` (Constitutional-AI style): the teacher answers, critiques its answer
against a list of principles, and rewrites it. Each record is an SFT example (prompt ->
revision) and a preference pair (chosen = revision, rejected = original).

The first answer is sampled with the stage's settings; the critique and the revision are
greedy, so they are a function of the answer alone.
"""

from __future__ import annotations

from ..teachers.base import SamplingParams
from .output import finish_dataset, record_filter
from .prompts import completion_columns, fill, generate, load_prompts, messages, provenance, template_hash, teacher_tokens
from .dedup import normalize
from .shards import run_units, unit_seed, units_of


def run_critique_revise(ctx) -> None:
    c = ctx.config
    prompts = load_prompts(ctx)
    teacher = ctx.teacher(c.teacher, batch_size=c.batch_size)
    principles = "\n".join(f"{i}. {p}" for i, p in enumerate(c.principles, 1))
    tpl = template_hash(teacher, c.system_prompt, c.critique_template, c.revision_template, principles)

    def work(u: int, unit) -> tuple[list[dict], dict]:
        seed = unit_seed(c.seed, u)
        params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p, seed=seed)
        greedy = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=0.0, seed=seed)
        before = teacher.stats["generated_tokens"]
        texts, ids, outs = generate(teacher, [messages(c.system_prompt, p["prompt_source"]) for p in unit], params,
                                    f"Answers (shard {u})")
        originals = [o[0] for o in outs]
        crit_msgs = [messages(None, fill(c.critique_template, prompt=p["prompt_source"], response=o.text, principles=principles))
                     for p, o in zip(unit, originals)]
        critiques = [o[0] for o in generate(teacher, crit_msgs, greedy, f"Critiques (shard {u})")[2]]
        rev_msgs = [messages(None, fill(c.revision_template, prompt=p["prompt_source"], response=o.text, critique=k.text))
                    for p, o, k in zip(unit, originals, critiques)]
        revisions = [o[0] for o in generate(teacher, rev_msgs, greedy, f"Revisions (shard {u})")[2]]
        rows, unchanged = [], 0
        for p, text, pid, orig, crit, rev in zip(unit, texts, ids, originals, critiques, revisions):
            if not rev.text.strip() or normalize(rev.text) == normalize(orig.text):
                unchanged += 1  # nothing to learn from: no revision, or the same text
                continue
            r, o = completion_columns(rev), completion_columns(orig)
            rows.append({
                "id": f"{p['id']}/0", "prompt_id": p["id"], "question": p["prompt_source"],
                "prompt": text, "prompt_ids": pid, **r,  # completion = the revision (the SFT target)
                "original": orig.text, "critique": crit.text, "revision": rev.text,
                "chosen": rev.text, "chosen_ids": r["completion_ids"],
                "rejected": orig.text, "rejected_ids": o["completion_ids"],
                **provenance(ctx, c.teacher, teacher, params, tpl),
            })
        return rows, {"prompts": len(unit), "skipped_unchanged": unchanged,
                      "teacher_generated_tokens": teacher.stats["generated_tokens"] - before}

    shards = run_units(ctx.name, ctx.out.path, units_of(prompts, c.shard_size), work, "Critique and revise")
    stats = shards.stats()
    filt = record_filter(ctx, key=lambda r: r["question"] + "\n" + r["revision"], prompt=lambda r: r["question"])
    finish_dataset(ctx, shards, filt, "revised responses")
    ctx.out.counts.update(prompts=len(prompts), skipped_unchanged=sum(s["skipped_unchanged"] for s in stats))
    ctx.out.metrics["teacher_generated_tokens"] = teacher_tokens(stats)
    ctx.out.extra["principles"] = list(c.principles)
    ctx.out.teachers.append({**ctx.identity(c.teacher).to_dict(), "role": "data", "token_share": 1.0})
