"""Stage `preference`: N candidates per prompt -> one (chosen, rejected) pair.

Candidates are ranked by a verifier (pass beats fail) or by a judge model scoring each one
against a rubric. A judge answer without a parseable score is recorded in the manifest and
that candidate left out; a prompt left with fewer than two scored candidates, or whose best
and worst differ by less than `min_margin`, yields no pair. Every skip is counted.
"""

from __future__ import annotations

from ..teachers.base import SamplingParams
from .judge import parse_score
from .output import finish_dataset, record_filter
from .prompts import (
    completion_columns, fill, generate, load_prompts, messages, provenance, template_hash, teacher_tokens,
)
from .shards import run_units, unit_seed, units_of
from ..verify.choose import verifier_for

MAX_RECORDED_FAILURES = 50  # judge answers kept verbatim in the manifest (all are counted)


def _pair(prompt: dict, text: str, ids: list[int], chosen, rejected, scores: tuple, notes: tuple) -> dict:
    ch, rj = completion_columns(chosen), completion_columns(rejected)
    return {
        "id": f"{prompt['id']}/pair", "prompt_id": prompt["id"], "question": prompt["prompt_source"],
        "prompt": text, "prompt_ids": ids,
        "chosen": ch["completion"], "chosen_ids": ch["completion_ids"],
        "rejected": rj["completion"], "rejected_ids": rj["completion_ids"],
        "chosen_score": scores[0], "rejected_score": scores[1],
        "chosen_judgement": notes[0], "rejected_judgement": notes[1],
    }


def run_preference(ctx) -> None:
    c = ctx.config
    prompts = load_prompts(ctx)
    teacher = ctx.teacher(c.teacher, batch_size=c.batch_size)
    judge = ctx.teacher(c.judge, batch_size=c.batch_size) if c.judge else teacher
    verifier = None
    if c.method == "verifier":
        source = ctx.inputs["prompts"].manifest if c.prompts else None
        verifier = verifier_for(c.verifier, source, prompts, ctx.name)
    tpl = template_hash(teacher, c.system_prompt, c.judge_template, c.rubric)

    def work(u: int, unit) -> tuple[list[dict], dict]:
        seed = unit_seed(c.seed, u)
        params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                n=c.candidates, seed=seed)
        before = teacher.stats["generated_tokens"] + (judge.stats["generated_tokens"] if judge is not teacher else 0)
        texts, ids, outs = generate(teacher, [messages(c.system_prompt, p["prompt_source"]) for p in unit], params,
                                    f"Candidates (shard {u})")
        stats = {"prompts": len(unit), "pairs": 0, "skipped_unparsed": 0, "skipped_tie": 0, "judge_unparsed": 0,
                 "judge_failures": []}
        if verifier is not None:
            ranked = [[(float(v.passed), v.detail or v.extracted) for v in (verifier(p, comp.text) for comp in comps)]
                      for p, comps in zip(unit, outs)]
        else:
            judge_msgs = [messages(None, fill(c.judge_template, rubric=c.rubric, prompt=p["prompt_source"], response=comp.text))
                          for p, comps in zip(unit, outs) for comp in comps]
            judge_params = SamplingParams(max_new_tokens=c.judge_max_new_tokens, temperature=0.0, seed=seed)
            answers = iter(generate(judge, judge_msgs, judge_params, f"Judging (shard {u})")[2])
            ranked = []
            for p, comps in zip(unit, outs):
                scored = []
                for comp in comps:
                    answer = next(answers)[0].text
                    score = parse_score(answer)
                    if score is None:
                        stats["judge_unparsed"] += 1
                        stats["judge_failures"].append({"prompt_id": p["id"], "answer": answer[:300]})
                    scored.append((score, answer))
                ranked.append(scored)
        rows = []
        for p, text, pid, comps, scored in zip(unit, texts, ids, outs, ranked):
            usable = [(s, note, comp) for (s, note), comp in zip(scored, comps) if s is not None]
            if len(usable) < 2:
                stats["skipped_unparsed"] += 1
                continue
            best = max(usable, key=lambda x: x[0])  # first of equals: deterministic
            worst = min(usable, key=lambda x: x[0])
            if best[0] - worst[0] < max(c.min_margin, 1e-9) or best[2].text == worst[2].text:
                stats["skipped_tie"] += 1
                continue
            row = _pair(p, text, pid, best[2], worst[2], (best[0], worst[0]), (best[1], worst[1]))
            row.update(method=c.method, judge=ctx.identity(c.judge or c.teacher).spec if verifier is None else None,
                       **provenance(ctx, c.teacher, teacher, params, tpl))
            rows.append(row)
        stats["pairs"] = len(rows)
        after = teacher.stats["generated_tokens"] + (judge.stats["generated_tokens"] if judge is not teacher else 0)
        stats["teacher_generated_tokens"] = after - before
        return rows, stats

    shards = run_units(ctx.name, ctx.out.path, units_of(prompts, c.shard_size), work, "Preference pairs")
    stats = shards.stats()
    failures = [f for s in stats for f in s["judge_failures"]]
    total = lambda k: sum(s[k] for s in stats)  # noqa: E731
    filt = record_filter(ctx, key=lambda r: r["question"] + "\n" + r["chosen"], prompt=lambda r: r["question"])
    skipped = {"skipped_unparsed": total("skipped_unparsed"), "skipped_tie": total("skipped_tie"),
               "judge_unparsed": total("judge_unparsed")}
    # if nothing is left, the error shows what the judge said (the manifest that would list it is not written)
    example = {"first_unparsed_answer": repr(" ".join(failures[0]["answer"].split())[:100])} if failures else {}
    finish_dataset(ctx, shards, filt, "preference pairs", {**skipped, **example})
    ctx.out.counts.update(prompts=len(prompts), **skipped)
    ctx.out.metrics["teacher_generated_tokens"] = teacher_tokens(stats)
    if failures:
        ctx.out.warnings.append(f"{len(failures)} judge answers had no parseable score; their candidates were left out")
        ctx.out.extra["judge_failures"] = failures[:MAX_RECORDED_FAILURES]
    ctx.out.teachers.append({**ctx.identity(c.teacher).to_dict(), "role": "data", "token_share": 1.0})
    if c.judge and c.method == "judge":
        ctx.out.teachers.append({**ctx.identity(c.judge).to_dict(), "role": "judge", "token_share": 0.0})
