"""Stage `self_instruct`: the teacher writes new prompts in the style of seed prompts.

Each request shows `examples` seed prompts drawn with the request's own seed and asks for one
new task; `samples` proposals per request. Proposals are cleaned (list numbering, quotes and a
"Task:" label stripped; first paragraph only), length-checked, and then exact and near
duplicates (of the seeds and of each other) are dropped when the shards are merged. The output
is a prompt dataset: `question` (and `prompt`) hold the new task, ready for `complete`.
"""

from __future__ import annotations

import random
import re

from ..teachers.base import SamplingParams
from .output import finish_dataset, record_filter
from .prompts import fill, generate, load_prompts, messages, provenance, template_hash, teacher_tokens
from .shards import run_units, unit_seed, units_of

_LABEL = re.compile(r"^\s*(?:[-*•]|\d+[.):]|(?:new\s+)?(?:task|instruction|question|prompt)\s*\d*\s*:)\s*", re.I)


_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


def clean_proposal(text: str) -> str:
    """The proposed task alone: first paragraph (first item, if the model wrote a list),
    without list markers, labels or quotes."""
    para = text.strip().split("\n\n")[0].strip()
    lines = para.splitlines()
    if len(lines) > 1 and any(_ITEM.match(line) for line in lines[1:]):
        para = lines[0]  # a list of tasks: the first is the proposal
    for _ in range(2):  # "1. Task: ..." has two labels
        para = _LABEL.sub("", para, count=1)
    return para.strip().strip('"“”\'`').strip()


def run_self_instruct(ctx) -> None:
    c = ctx.config
    seeds = load_prompts(ctx)
    seed_texts = [s["prompt_source"] for s in seeds]
    teacher = ctx.teacher(c.teacher, batch_size=c.batch_size)
    tpl = template_hash(teacher, c.system_prompt, c.template)

    def work(u: int, unit) -> tuple[list[dict], dict]:
        params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                n=c.samples, seed=unit_seed(c.seed, u))
        shown = [random.Random(unit_seed(c.seed, k)).sample(range(len(seeds)), min(c.examples, len(seeds))) for k in unit]
        msgs = [messages(c.system_prompt, fill(c.template, examples="\n".join(f"- {seed_texts[i]}" for i in idx)))
                for idx in shown]
        before = teacher.stats["generated_tokens"]
        outs = generate(teacher, msgs, params, f"Proposing prompts (shard {u})")[2]
        rows, malformed = [], 0
        for k, idx, comps in zip(unit, shown, outs):
            for j, comp in enumerate(comps):
                task = clean_proposal(comp.text)
                if not c.min_chars <= len(task) <= c.max_chars:
                    malformed += 1
                    continue
                rows.append({"id": f"self-instruct-{k}/{j}", "request": k, "sample_index": j, "question": task,
                             "prompt": task, "examples": [seeds[i]["id"] for i in idx],
                             "finish_reason": comp.finish_reason, **provenance(ctx, c.teacher, teacher, params, tpl)})
        return rows, {"requests": len(unit), "dropped_malformed": malformed,
                      "teacher_generated_tokens": teacher.stats["generated_tokens"] - before}

    shards = run_units(ctx.name, ctx.out.path, units_of(list(range(c.requests)), c.shard_size), work, "Self-instruct")
    stats = shards.stats()
    filt = record_filter(ctx, key=lambda r: r["question"], prompt=lambda r: r["question"])
    filt.prime(seed_texts)  # a proposal that repeats a seed is a duplicate too
    finish_dataset(ctx, shards, filt, "new prompts")
    ctx.out.counts.update(seeds=len(seeds), dropped_malformed=sum(s["dropped_malformed"] for s in stats))
    ctx.out.metrics["teacher_generated_tokens"] = teacher_tokens(stats)
    ctx.out.teachers.append({**ctx.identity(c.teacher).to_dict(), "role": "data", "token_share": 1.0})
