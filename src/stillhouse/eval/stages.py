"""The eval stage: every listed model on the same held-out problems, teacher first."""

from __future__ import annotations

from pathlib import Path

from ..errors import EmptyDatasetError, StillhouseError
from ..records import read_rows
from ..verify.choose import verifier_for
from .compare import Candidate, evaluate_models, write_results
from .config import EvalSettings
from .suites import Suite, parse_suite


def run_eval(ctx) -> None:
    c = ctx.config
    tasks = ctx.inputs["tasks"]
    if c.split == "validation" and not tasks.file("validation.parquet").is_file():
        raise StillhouseError(f"stage '{ctx.name}': split: validation, but tasks stage '{c.tasks}' has no validation split")
    records = read_rows(tasks.file(f"{c.split}.parquet"))
    if not records:
        raise EmptyDatasetError(f"stage '{ctx.name}': {c.split} split is empty")
    task = tasks.manifest["task"]
    # the tasks stage's own verifier: a reasoning-gym scorer, or code run in the sandbox for HumanEval
    verifier = verifier_for("auto", tasks.manifest, records, ctx.name)
    suites = [Suite(task["name"], f"tasks:{c.tasks}", records, verifier, c.max_new_tokens)]
    suites += [parse_suite(spec) for spec in c.suites]
    settings = EvalSettings(batch_size=c.batch_size, speed_batches=tuple(sorted({1, c.speed_batch})), samples=c.samples,
                            ks=tuple(k for k in (1, 5, 10) if k <= c.samples), memory=c.memory,
                            system_prompt=c.system_prompt, perplexity_file=c.perplexity_text)

    runner = ctx.runner
    teacher_spec = runner.spec_of(c.teacher)
    labels = dict(c.models)
    teacher_label = next((k for k, v in labels.items() if runner.spec_of(v) == teacher_spec), "teacher")
    labels.pop(teacher_label, None)
    cands = []
    for label, ref in [(teacher_label, c.teacher)] + list(labels.items()):
        art = runner.results.get(ref)
        spec = runner.spec_of(ref)
        disk = art.path if art is not None else _local_dir(spec)
        cands.append(Candidate(label, spec, "teacher" if label == teacher_label else "student",
                               lambda ref=ref: runner.load_model(ref), art.id if art is not None else None, disk, {"ref": ref}))
    results, rows = evaluate_models(cands, suites, settings)
    results["task"] = task
    results["split"] = "test" if c.split == "eval" else "validation"  # which split every figure comes from
    write_results(ctx.out, results, rows)


def _local_dir(spec: str) -> Path | None:
    from ..models import resolve

    target = resolve(spec)[0]
    return target if isinstance(target, Path) else None
