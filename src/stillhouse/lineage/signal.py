"""What a train stage records about its training signal, for lineage.

A train stage counts the tokens each input contributed (`training_sources`: SFT target
tokens, tokens under a KD loss, the signal the student already carried); `record_training_signal`
writes them to the manifest as `signal` and replaces the manifest's `teachers` with the
original teachers and their propagated shares (marked `derived`). Nothing here reads a stage's
config: which input is the student, the teacher or a cache is the stage's to say.
"""

from __future__ import annotations

from .graph import load_lineage
from .shares import teacher_shares


def target_tokens(rows: list[dict], max_length: int) -> int:
    """Completion tokens that survive truncation to `max_length` (those are what a loss sees)."""
    return sum(max(0, min(len(r["prompt_ids"]) + len(r["completion_ids"]), max_length) - len(r["prompt_ids"])) for r in rows)


def training_sources(*, data_id: str, task_rows: list[dict], heal_rows: list[dict], epochs: float, heal_epochs: float,
                     max_length: int, sft_weight: float, kd_weight: float, cached: bool,
                     kd_parent: str | None = None, kd_teacher: dict | None = None,
                     student_id: str | None = None, student_tokens: int = 0) -> list[dict]:
    """Signal sources of one training run, in tokens (epochs included: two passes count twice)."""
    task_t = target_tokens(task_rows, max_length)
    srcs = []
    if sft_weight > 0:
        srcs.append({"parent": data_id, "role": "sft-targets", "tokens": round(epochs * task_t)})
    kd_t = (epochs * task_t if kd_weight > 0 else 0) + heal_epochs * target_tokens(heal_rows, max_length)
    if kd_t > 0:
        kd = {"parent": data_id} if cached else ({"parent": kd_parent} if kd_parent else {"teacher": kd_teacher})
        srcs.append({**kd, "role": "logit-kd", "tokens": round(kd_t)})
    if student_id and student_tokens > 0:  # what the student's weights had already learned
        srcs.append({"parent": student_id, "role": "student-weights", "tokens": int(student_tokens)})
    return srcs


def record_training_signal(ctx, srcs: list[dict]) -> None:
    """Write a training stage's signal `sources` (`training_sources`) to its manifest, and its
    teachers as the original teachers with their propagated shares."""
    ctx.out.extra["signal"] = {"unit": "tokens", "sources": srcs}
    pending = {"id": ctx.out.id, "kind": "model", "stage": ctx.config.type, "name": ctx.name,
               "parents": [a.id for a in ctx.inputs.values()], "signal": ctx.out.extra["signal"], "teachers": []}
    lin = load_lineage(ctx.store, pending=pending)
    ctx.out.teachers[:] = [
        {"spec": s.spec, "weights_sha256": s.node.identity.get("weights_sha256"), "license": s.node.license,
         "source": s.node.identity.get("source"), "token_share": round(s.share, 6), "derived": True,
         "via": sorted({" -> ".join(lin.nodes[k].label for k in p[1:-1]) for p, _ in s.paths})}
        for s in teacher_shares(lin)
    ]
