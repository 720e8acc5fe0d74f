"""Model stages: a depth-pruned student, and distillation training of a student."""

from __future__ import annotations

import json
from dataclasses import fields, replace

from .. import models as model_specs
from ..records import read_rows
from ..errors import EmptyDatasetError, StillhouseError
from ..fsutil import write_text_atomic
from ..lineage import pending_card, record_training_signal
from ..progress import status
from . import students
from .loop import Example, TrainConfig, train
from .tracking import export_history


def _base_models_of(ctx, ref: str) -> list[dict]:
    """Weight lineage: a stage-made model passes on its own base models, an outside one is the base."""
    if ref in ctx.runner.results:
        art = ctx.runner.results[ref]
        return art.manifest.get("base_models", []) or [ctx.identity(ref).to_dict()]
    return [ctx.identity(ref).to_dict()]


def _save_model(ctx, model, tokenizer, base_models: list[dict]) -> None:
    out = ctx.out.path
    with status(f"Saving {ctx.name}"):
        model_specs.save(model, tokenizer, out)
    ctx.out.extra["base_models"] = base_models
    ctx.out.counts["params"] = model_specs.param_count(model)
    ctx.out.counts["layers"] = model.config.num_hidden_layers
    # the card is generated from what the manifest will say (teachers, metrics)
    manifest_view = {
        "id": ctx.out.id, "kind": "model", "stage": ctx.config.type, "name": ctx.name, "parents": [a.id for a in ctx.inputs.values()],
        "teachers": ctx.out.teachers, "metrics": ctx.out.metrics, "base_models": base_models, "signal": ctx.out.extra.get("signal"),
    }
    write_text_atomic(out / "README.md", pending_card(ctx.runner.store, manifest_view))


def run_prune(ctx) -> None:
    c = ctx.config
    lm = ctx.model(c.model)
    rows = read_rows(ctx.inputs["calibration"].file("data.parquet"))
    rows.sort(key=lambda r: not r.get("passed", True))  # verified text first
    rows = rows[: c.calibration_size]
    texts = [r["prompt"] + r["completion"] for r in rows]
    if not texts:
        raise EmptyDatasetError(f"stage '{ctx.name}': calibration dataset is empty")
    n = len(students.decoder_layers(lm.model))
    if c.layers > n:
        raise StillhouseError(f"stages.{ctx.name}.layers: {c.layers} is more than the model's {n} layers")
    with status(f"Measuring block importance ({c.method}) on {len(texts)} calibration texts"):
        if c.method == "cosine":
            scores = students.cosine_importance(lm.model, lm.tokenizer, texts)
        else:
            scores = students.loss_importance(lm.model, lm.tokenizer, texts, [len(r["prompt_ids"]) for r in rows])
    kept = students.choose_layers(scores, c.layers, tuple(c.protect))
    student = students.prune_depth(lm.model, kept)
    ctx.out.metrics.update(
        kept_layers=kept, dropped_layers=[i for i in range(n) if i not in kept],
        importance=[round(s, 5) for s in scores], method=c.method,
        params_before=model_specs.param_count(lm.model), params_after=model_specs.param_count(student),
    )
    _save_model(ctx, student, lm.tokenizer, _base_models_of(ctx, c.model))


def _examples(rows: list[dict], cached: bool) -> list[Example]:
    return [
        Example(
            r["prompt_ids"] + r["completion_ids"], len(r["prompt_ids"]),
            r.get("topk_ids") if cached else None, r.get("topk_logprobs") if cached else None,
        )
        for r in rows
    ]


def run_train(ctx) -> None:
    c = ctx.config
    data_art = ctx.inputs["data"]
    rows = read_rows(data_art.file("data.parquet"))
    verified = [r for r in rows if r.get("passed", True)]
    if not verified:
        raise EmptyDatasetError(f"stage '{ctx.name}': dataset '{c.data}' has no verified records to train on")
    cached = c.teacher_signal == "cached"
    if c.kd_weight > 0 and cached and any(r.get("topk_ids") is None for r in verified):
        raise StillhouseError(
            f"stages.{ctx.name}.teacher_signal: dataset '{c.data}' has no cached teacher log-probs "
            "(set top_k_logprobs on its rejection stage, or use teacher_signal: online)"
        )
    teacher_model = None
    kd_teacher_ident = None
    if c.kd_weight > 0 and not cached:
        if c.teacher is None:
            raise StillhouseError(f"stages.{ctx.name}.teacher: online KD needs a teacher")
        t = ctx.model(c.teacher)
        teacher_model, kd_teacher_ident = t.model, t.identity.to_dict()
    # The student is loaded fresh (not from the runner's cache): training changes it in place.
    student_lm = model_specs.load(ctx.runner.spec_of(c.student))
    tok = student_lm.tokenizer
    # every TrainConfig field has a same-named field on the stage
    cfg = TrainConfig(**{f.name: getattr(c, f.name) for f in fields(TrainConfig)})
    history = []
    if c.heal_epochs > 0:
        heal_cfg = replace(cfg, epochs=c.heal_epochs, lr=c.heal_lr, sft_weight=0.0, kd_weight=1.0)
        history += [{**h, "phase": "heal"} for h in train(student_lm.model, _examples(rows, cached), heal_cfg, tok.pad_token_id,
                                                          teacher=teacher_model, description="Healing (logit KD on all teacher text)")]
    history += [{**h, "phase": "task"} for h in train(student_lm.model, _examples(verified, cached), cfg, tok.pad_token_id,
                                                      teacher=teacher_model, description="Distilling (SFT + KD on verified data)")]
    # Lineage: tokens of training signal per input, and the original teachers' shares.
    record_training_signal(ctx, verified, rows, kd_teacher_ident)
    task_hist = [h for h in history if h["phase"] == "task"]
    ctx.out.metrics.update(
        steps=len(history), final_loss=_tail_mean(task_hist, "loss"), final_sft=_tail_mean(task_hist, "sft"),
        final_kl=_tail_mean(task_hist, "kl"), tokens_per_s=round(task_hist[-1]["tokens_per_s"], 1),
    )
    ctx.out.counts.update(train_records=len(verified), heal_records=len(rows) if c.heal_epochs > 0 else 0,
                          tokens_seen=sum(max((h["tokens"] for h in history if h["phase"] == p), default=0) for p in ("heal", "task")))
    with open(ctx.out.path / "metrics.jsonl", "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    export_history(history, ctx.out.path, c.log_to, ctx.name)
    _save_model(ctx, student_lm.model, tok, _base_models_of(ctx, c.student))


def _tail_mean(history: list[dict], key: str, n: int = 10) -> float | None:
    tail = [h[key] for h in history[-n:]]
    return round(sum(tail) / len(tail), 5) if tail else None
