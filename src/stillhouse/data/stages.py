"""Data-engine stages: problems from a task generator, verified teacher traces."""

from __future__ import annotations

from ..errors import EmptyDatasetError, StillhouseError
from ..verify.reasoning_gym import ReasoningGymVerifier, problems
from .dedup import drop_overlap, exact_dedup
from ..records import read_rows, write_rows


def run_tasks(ctx) -> None:
    c = ctx.config
    held_out = problems(c.task, c.config, c.eval.size, c.eval.seed)
    train = problems(c.task, c.config, c.train.size, c.train.seed)
    n_dup = 0
    if c.dedup:
        train, n_dup = exact_dedup(train, key="question")
    # reasoning-gym seeds item i with (seed + i): close seeds overlap, so decontaminate always
    train, n_overlap = drop_overlap(train, held_out, key="question")
    if not train:
        raise EmptyDatasetError(f"stage '{ctx.name}': no training problems left after removing held-out overlaps")
    write_rows(ctx.out.path / "train.parquet", train)
    write_rows(ctx.out.path / "eval.parquet", held_out)
    ctx.out.counts.update(train=len(train), eval=len(held_out), removed_duplicates=n_dup, removed_eval_overlap=n_overlap)
    if n_overlap:
        ctx.out.warnings.append(f"removed {n_overlap} training problems that also appear in the held-out split")
    ctx.out.extra["task"] = {"name": c.task, "config": c.config, "verifier": f"reasoning_gym:{c.task}"}


def run_rejection(ctx) -> None:
    from .rejection import rejection_sample

    c = ctx.config
    tasks = ctx.inputs["tasks"]
    records = read_rows(tasks.file("train.parquet"))
    task = tasks.manifest["task"]
    verifier = ReasoningGymVerifier(task["name"], task["config"])
    teacher = ctx.teacher(c.teacher, batch_size=c.batch_size)
    if getattr(teacher, "tokenizer", None) is None:  # prompt and answer token ids are training data
        raise StillhouseError(
            f"stage '{ctx.name}': teacher '{c.teacher}' has no tokenizer; set `tokenizer:` (the served model's) in its teachers: entry"
        )
    rows, stats = rejection_sample(
        teacher, records, verifier,
        samples=c.samples, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
        greedy_first=c.greedy_first, keep_per_problem=c.keep_per_problem, top_k_logprobs=c.top_k_logprobs,
        seed=c.seed, system_prompt=c.system_prompt,
    )
    if not rows:
        raise EmptyDatasetError(
            f"stage '{ctx.name}': no teacher answer passed verification on {len(records)} problems "
            f"(try more samples, a higher temperature or an easier task)"
        )
    write_rows(ctx.out.path / "data.parquet", rows)
    target_tokens = sum(len(r["completion_ids"]) for r in rows)
    ctx.out.counts.update(records=len(rows), target_tokens=target_tokens, prompt_tokens=sum(len(r["prompt_ids"]) for r in rows))
    ctx.out.metrics.update(stats)
    ident = ctx.identity(c.teacher).to_dict()
    ctx.out.teachers.append({**ident, "role": "data", "token_share": 1.0})
    ctx.out.extra["task"] = task
