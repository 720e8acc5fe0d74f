"""Data-engine stages: problems from a task generator, verified teacher traces."""

from __future__ import annotations

import random

from ..errors import EmptyDatasetError, StillhouseError
from ..verify.reasoning_gym import problems
from .splits import disjoint_splits
from ..records import read_rows, write_rows


def _humaneval_splits(c) -> tuple[list[dict], list[dict], list[dict]]:
    """HumanEval's fixed problems: the held-out split drawn first (by its seed), then validation
    and train from the rest, so no two splits share a problem."""
    from ..verify.code import humaneval_problems

    pool = [
        {"id": p["task_id"], "task": "humaneval", "answer": p["canonical_solution"], **p,
         "question": f"Complete this Python function.\n\n```python\n{p['prompt']}```"}
        for p in humaneval_problems()
    ]
    random.Random(c.eval.seed).shuffle(pool)
    held_out, rest = pool[: c.eval.size], pool[c.eval.size :]
    validation = []
    if c.validation is not None:
        random.Random(c.validation.seed).shuffle(rest)
        validation, rest = rest[: c.validation.size], rest[c.validation.size :]
    random.Random(c.train.seed).shuffle(rest)
    return rest[: c.train.size], validation, held_out


def run_tasks(ctx) -> None:
    c = ctx.config
    if c.task == "humaneval":
        train, validation, held_out = _humaneval_splits(c)
        verifier = "code"
    else:
        held_out = problems(c.task, c.split_config("eval"), c.eval.size, c.eval.seed)
        validation = [] if c.validation is None else problems(c.task, c.split_config("validation"), c.validation.size, c.validation.seed)
        train = problems(c.task, c.split_config("train"), c.train.size, c.train.seed)
        verifier = f"reasoning_gym:{c.task}"
    # reasoning-gym problem spaces can be small (two 1-digit terms: 100 questions), so different
    # seeds still repeat questions: always make the splits disjoint by question text
    splits, removed = disjoint_splits(train, validation, held_out, dedup_train=c.dedup)
    if not splits["train"]:
        raise EmptyDatasetError(f"stage '{ctx.name}': no training problems left after removing held-out overlaps")
    if c.validation is not None and not splits["validation"]:
        raise EmptyDatasetError(f"stage '{ctx.name}': no validation problems left after removing test overlaps")
    write_rows(ctx.out.path / "train.parquet", splits["train"])
    write_rows(ctx.out.path / "eval.parquet", splits["eval"])
    if c.validation is not None:
        write_rows(ctx.out.path / "validation.parquet", splits["validation"])
    ctx.out.counts.update({name: len(rows) for name, rows in splits.items() if name != "validation" or c.validation is not None})
    ctx.out.counts.update(removed)
    if removed["removed_eval_overlap"]:
        ctx.out.warnings.append(f"removed {removed['removed_eval_overlap']} training problems that also appear in a held-out split")
    if removed["removed_validation_overlap"]:
        ctx.out.warnings.append(f"removed {removed['removed_validation_overlap']} validation problems that also appear in the test split")
    ctx.out.extra["task"] = {"name": c.task, "config": c.config, "verifier": verifier}


def run_rejection(ctx) -> None:
    """Rejection sampling in resumable shards of `shard_size` problems (see data/shards.py)."""
    from ..teachers.base import SamplingParams
    from .output import finish_dataset, record_filter
    from .prompts import provenance, teacher_tokens
    from .rejection import rejection_sample, teacher_prompt_hash
    from .shards import run_units, unit_seed, units_of
    from ..verify.choose import verifier_for

    c = ctx.config
    tasks = ctx.inputs["tasks"]
    records = read_rows(tasks.file("train.parquet"))
    verifier = verifier_for(c.verifier, tasks.manifest, records, ctx.name)
    teacher = ctx.teacher(c.teacher, batch_size=c.batch_size)
    if teacher.tokenizer is None:  # prompt and answer token ids are training data
        raise StillhouseError(
            f"stage '{ctx.name}': teacher '{c.teacher}' has no tokenizer; set `tokenizer:` (the served model's) in its teachers: entry"
        )
    tpl = teacher_prompt_hash(teacher, c.system_prompt, c.teacher_prompt)

    def work(u: int, unit) -> tuple[list[dict], dict]:
        before, secs = teacher.stats["generated_tokens"], teacher.stats["seconds"]
        seed = unit_seed(c.seed, u)
        rows, stats = rejection_sample(
            teacher, list(unit), verifier,
            samples=c.samples, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
            greedy_first=c.greedy_first, keep_per_problem=c.keep_per_problem, top_k_logprobs=c.top_k_logprobs,
            seed=seed, system_prompt=c.system_prompt, teacher_prompt=c.teacher_prompt,
        )
        params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p, n=c.samples, seed=seed)
        prov = provenance(ctx, c.teacher, teacher, params, tpl)
        prov.pop("template_hash")
        prov.pop("teacher")
        for r in rows:
            r.update(prov)
        stats["teacher_generated_tokens"] = teacher.stats["generated_tokens"] - before  # the teacher's counters are cumulative
        stats["teacher_seconds"] = round(teacher.stats["seconds"] - secs, 2)
        return rows, stats

    shards = run_units(ctx.name, ctx.out.path, units_of(records, c.shard_size), work, "Rejection sampling")
    stats = shards.stats()
    rates = {k: v for s in stats for k, v in s.pop("pass_rates").items()}
    write_rows(ctx.out.path / "pass_rates.parquet", [{"problem_id": k, "pass_rate": v} for k, v in rates.items()])
    filt = record_filter(ctx, key=lambda r: r["question"] + "\n" + r["completion"], prompt=lambda r: r["question"])
    if shards.records() == 0:
        raise EmptyDatasetError(
            f"stage '{ctx.name}': no teacher answer passed verification on {len(records)} problems "
            f"(try more samples, a higher temperature or an easier task)"
        )
    finish_dataset(ctx, shards, filt, "verified teacher answers")
    ctx.out.metrics.update(_sum_stats(stats, len(records)), teacher_generated_tokens=teacher_tokens(stats))
    ctx.out.teachers.append({**ctx.identity(c.teacher).to_dict(), "role": "data", "token_share": 1.0})
    ctx.out.extra["task"] = tasks.manifest["task"]
    if c.teacher_prompt is not None:  # lineage: these answers came from a prompt the records do not hold
        ctx.out.extra["context_distillation"] = {"teacher_prompt": c.teacher_prompt.model_dump(mode="json"), "template_hash": tpl}


def _sum_stats(stats: list[dict], n_problems: int) -> dict:
    """Per-shard rejection statistics as totals and rates over the whole stage."""
    total = lambda k: sum(s.get(k) or 0 for s in stats)  # noqa: E731
    greedy = [s["greedy_pass_rate"] * s["problems"] for s in stats if s.get("greedy_pass_rate") is not None]
    return {
        "problems": n_problems,
        "problems_covered": total("problems_covered"),
        "coverage": total("problems_covered") / max(1, n_problems),
        "greedy_pass_rate": sum(greedy) / max(1, n_problems) if greedy else None,
        "sampled_problems": total("sampled_problems"),
        "completions": total("completions"),
        "passed_completions": total("passed_completions"),
        "passed_records": total("passed_records"),
        "teacher_seconds": round(total("teacher_seconds"), 2),
    }
