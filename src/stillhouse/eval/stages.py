"""The eval stage: every listed model on the same held-out problems, teacher first."""

from __future__ import annotations

import json

from ..records import read_rows, write_rows
from ..errors import EmptyDatasetError
from ..fsutil import dir_size, write_json_atomic
from ..verify.reasoning_gym import ReasoningGymVerifier
from .suites import evaluate


def run_eval(ctx) -> None:
    c = ctx.config
    tasks = ctx.inputs["tasks"]
    records = read_rows(tasks.file("eval.parquet"))
    if not records:
        raise EmptyDatasetError(f"stage '{ctx.name}': held-out split is empty")
    task = tasks.manifest["task"]
    verifier = ReasoningGymVerifier(task["name"], task["config"])
    teacher = ctx.model(c.teacher)
    common = dict(max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, speed_batch=c.speed_batch, system_prompt=c.system_prompt)

    labels = dict(c.models)
    teacher_spec = ctx.runner.spec_of(c.teacher)
    teacher_label = next((k for k, v in labels.items() if ctx.runner.spec_of(v) == teacher_spec), "teacher")
    labels.pop(teacher_label, None)

    results, all_rows = {}, []
    t_res = evaluate(teacher.model, teacher.tokenizer, records, verifier, label=teacher_label, **common)
    results[teacher_label] = {"ref": c.teacher, "role": "teacher", **t_res["metrics"]}
    all_rows += [{"model": teacher_label, **r} for r in t_res["rows"]]
    for label, ref in labels.items():
        lm = ctx.model(ref)
        res = evaluate(lm.model, lm.tokenizer, records, verifier, teacher=teacher.model,
                       teacher_rows=t_res["rows"], label=label, **common)
        results[label] = {"ref": ref, "role": "student", **res["metrics"]}
        all_rows += [{"model": label, **r} for r in res["rows"]]
    for label, ref in [(teacher_label, c.teacher)] + list(labels.items()):
        spec = ctx.runner.spec_of(ref)
        art = ctx.runner.results.get(ref)
        results[label]["artifact"] = art.id if art is not None else None
        results[label]["disk_bytes"] = dir_size(art.path) if art is not None else None
        results[label]["spec"] = spec
    t = results[teacher_label]
    for label, r in results.items():
        if r["role"] == "student":
            r["pass_at_1_vs_teacher"] = r["pass_at_1"] / t["pass_at_1"] if t["pass_at_1"] else None
            r["speedup_vs_teacher"] = r["decode_tok_per_s"] / t["decode_tok_per_s"]
            r["params_vs_teacher"] = r["params"] / t["params"]
    write_json_atomic(ctx.out.path / "results.json", {"task": task, "teacher": teacher_label, "models": results})
    write_rows(ctx.out.path / "outputs.parquet", all_rows)
    ctx.out.metrics.update({label: {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} for label, r in results.items()})
    ctx.out.counts.update(problems=len(records), models=len(results))


def load_results(artifact) -> dict:
    return json.loads(artifact.file("results.json").read_text())
