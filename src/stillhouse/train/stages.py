"""Model stages: a depth-pruned student, and distillation training of a student."""

from __future__ import annotations

import json
from pathlib import Path

from .. import models as model_specs
from ..records import read_rows
from ..crashpoints import crash_point
from ..errors import EmptyDatasetError, StillhouseError
from ..fsutil import write_text_atomic
from ..lineage import pending_card, record_training_signal
from ..lineage.shares import signal_tokens
from ..lineage.signal import training_sources
from ..progress import console, status
from . import alignment, lora, students
from .loop import Example, PreferencePair, TrainConfig, train
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
    student = lm.model
    if c.layers is not None:
        if c.layers > n:
            raise StillhouseError(f"stages.{ctx.name}.layers: {c.layers} is more than the model's {n} layers")
        with status(f"Measuring block importance ({c.method}) on {len(texts)} calibration texts"):
            if c.method == "cosine":
                scores = students.cosine_importance(lm.model, lm.tokenizer, texts)
            else:
                scores = students.loss_importance(lm.model, lm.tokenizer, texts, [len(r["prompt_ids"]) for r in rows])
        kept = students.choose_layers(scores, c.layers, tuple(c.protect))
        student = students.prune_depth(lm.model, kept)
        ctx.out.metrics.update(kept_layers=kept, dropped_layers=[i for i in range(n) if i not in kept],
                               importance=[round(s, 5) for s in scores], method=c.method)
    if c.mlp_channels is not None or c.kv_heads is not None:
        with status(f"Measuring channel and head importance on {len(texts)} calibration texts"):
            importance = students.width_importance(student, lm.tokenizer, texts)
        try:
            student = students.prune_width(student, importance, c.mlp_channels, c.kv_heads)
        except StillhouseError as e:
            raise StillhouseError(f"stages.{ctx.name}: {e}") from None
        ctx.out.metrics.update(mlp_channels=c.mlp_channels, kv_heads=c.kv_heads)
    ctx.out.metrics.update(params_before=model_specs.param_count(lm.model), params_after=model_specs.param_count(student))
    _save_model(ctx, student, lm.tokenizer, _base_models_of(ctx, c.model))


def run_scratch(ctx) -> None:
    c = ctx.config
    t = ctx.model(c.teacher)
    try:
        student = students.scratch(t.model.config, c.layers, c.hidden_size, c.heads, c.kv_heads, c.intermediate_size, c.seed)
    except StillhouseError as e:
        raise StillhouseError(f"stages.{ctx.name}: {e}") from None
    ctx.out.metrics.update(init="random", seed=c.seed)
    _save_model(ctx, student, t.tokenizer, [])


def _examples(rows: list[dict], cached: bool, cache=None, max_length: int = 1 << 30) -> list[Example]:
    """Training examples; with a logit cache, each carries its cached rows (sparse, by record id)."""
    out = []
    for r in rows:
        ids = r["prompt_ids"] + r["completion_ids"]
        if cache is not None:
            top_ids, lps, rest = cache.rows(r["id"])
            if not r["prompt_ids"]:  # cache rows start at token 1; Example rows at token 0 (never used)
                top_ids, lps, rest = (a[[0] + list(range(len(a)))] for a in (top_ids, lps, rest))
            if len(top_ids) < len(ids[:max_length]) - len(r["prompt_ids"]):
                raise StillhouseError(f"logit cache scored {len(top_ids)} tokens of record '{r['id']}', "
                                      "fewer than training uses (raise the cache_logits stage's max_length)")
            out.append(Example(ids, len(r["prompt_ids"]), top_ids, lps, rest))
        else:
            out.append(Example(ids, len(r["prompt_ids"]), r.get("topk_ids") if cached else None,
                               r.get("topk_logprobs") if cached else None))
    return out


def _pairs(rows: list[dict], tok) -> list[PreferencePair]:
    """Preference pairs from `prompt`/`chosen`/`rejected` rows: token ids when the data engine
    stored them (`prompt_ids`, `chosen_ids`, `rejected_ids`), else the texts encoded here."""
    def ids(r, key):
        if r.get(f"{key}_ids") is not None:
            return list(r[f"{key}_ids"])
        extra = [] if key == "prompt" else [tok.eos_token_id]
        return tok(r[key], add_special_tokens=False)["input_ids"] + extra

    return [PreferencePair(ids(r, "prompt"), ids(r, "chosen"), ids(r, "rejected")) for r in rows]


def run_train(ctx) -> None:
    c = ctx.config
    data_art = ctx.inputs["data"]
    rows = read_rows(data_art.file("data.parquet"))
    dpo = c.objective == "dpo"
    if dpo and rows and not {"chosen", "rejected"} <= set(rows[0]):
        raise StillhouseError(f"stages.{ctx.name}.objective: dpo needs a dataset with chosen and rejected columns; '{c.data}' has {sorted(rows[0])}")
    verified = rows if dpo else [r for r in rows if r.get("passed", True)]
    if not verified:
        raise EmptyDatasetError(f"stage '{ctx.name}': dataset '{c.data}' has no verified records to train on")
    use_kd = c.uses_teacher and not dpo
    if c.heal_epochs > 0 and c.loss is not None and not use_kd:
        raise StillhouseError(f"stages.{ctx.name}.heal_epochs: healing is logit KD; the loss has no KD term")
    cached = c.teacher_signal == "cached"
    cache = _open_cache(ctx) if cached and use_kd and c.logit_cache else None
    if use_kd and cached and cache is None and any(r.get("topk_ids") is None for r in verified):
        raise StillhouseError(
            f"stages.{ctx.name}.teacher_signal: dataset '{c.data}' has no cached teacher log-probs "
            "(set top_k_logprobs on its rejection stage, or use teacher_signal: online)"
        )
    teacher_model = None
    kd_teacher_ident = None
    if use_kd and not cached:
        if c.teacher is None:
            raise StillhouseError(f"stages.{ctx.name}.teacher: online KD needs a teacher")
        t = ctx.model(c.teacher)
        teacher_model, kd_teacher_ident = t.model, t.identity.to_dict()
    # The student is loaded fresh (not from the runner's cache): training changes it in place.
    quantize = c.lora.quantize if c.lora is not None else None
    student_lm = model_specs.load(ctx.runner.spec_of(c.student), quantize=quantize)
    tok = student_lm.tokenizer
    if not dpo:  # the student trains on the dataset's token ids: they must be its tokenizer's
        alignment.check_scored_text(tok, rows, f"stages.{ctx.name}.data")
    cfg = TrainConfig(**c.loop_settings(), loss_terms=c.loss_terms)
    if teacher_model is not None:
        alignment.check_token_level(tok, t.tokenizer, f"stages.{ctx.name}", c.student, c.teacher)
        vocab, note = alignment.shared_vocab(tok, student_lm.model, teacher_model)
        cfg = cfg.model_copy(update={"vocab_size": vocab})
        if note:
            console.print(f"{ctx.name}: {note}")
            ctx.out.warnings.append(note)
    if cache is not None:
        cache.check_student(tok, f"stages.{ctx.name}.logit_cache")
    model = student_lm.model
    if c.lora is not None:
        model = lora.add_lora(model, c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.target_modules, seed=c.seed)
        ctx.out.metrics["lora_trainable_share"] = round(lora.trainable_share(model), 5)
    ckpt_root = checkpoint_root(ctx)
    resume = getattr(ctx.runner, "resume", False)

    def phase(name, examples, phase_cfg, description):
        try:
            h = train(model, examples, phase_cfg, tok.pad_token_id, teacher=teacher_model, description=description,
                      checkpoint_dir=ckpt_root / name, resume=resume, metrics_path=ckpt_root / name / "metrics.jsonl")
        except ValueError as e:
            raise StillhouseError(f"stage '{ctx.name}': {e}") from None
        return [{**r, "phase": name} for r in h]

    history = []
    if c.heal_epochs > 0 and not dpo:
        kd_terms = [t for t in cfg.terms() if t.name != "sft"]
        heal_cfg = cfg.model_copy(update=dict(epochs=c.heal_epochs, lr=c.heal_lr, sft_weight=0.0, kd_weight=1.0,
                                              loss_terms=[vars(t) for t in kd_terms] if c.loss else None))
        history += phase("heal", _examples(rows, cached, cache, c.max_length), heal_cfg, "Healing (logit KD on all teacher text)")
    if dpo:
        pairs = _pairs(verified, tok)
        history += phase("task", pairs, cfg, "DPO on preference pairs")
    else:
        history += phase("task", _examples(verified, cached, cache, c.max_length), cfg, "Distilling (SFT + KD on verified data)")
    # Lineage: tokens of training signal per input, and the original teachers' shares.
    if dpo:  # a pair's signal is both of its responses
        signal_rows = [{"prompt_ids": p.prompt_ids, "completion_ids": p.chosen_ids + p.rejected_ids} for p in pairs]
        record_training_signal(ctx, _signal_sources(ctx, signal_rows, [], None))
    else:
        record_training_signal(ctx, _signal_sources(ctx, verified, rows, kd_teacher_ident))
    task_hist = [h for h in history if h["phase"] == "task"]
    terms = ("dpo", "reward_acc", "margin") if dpo else ("sft", "kl")
    ctx.out.metrics.update(
        steps=len(history), final_loss=_tail_mean(task_hist, "loss"),
        **{f"final_{k}": _tail_mean(task_hist, k) for k in terms},
        tokens_per_s=round(task_hist[-1]["tokens_per_s"], 1), objective=c.objective,
    )
    ctx.out.counts.update(train_records=len(verified), heal_records=len(rows) if c.heal_epochs > 0 and not dpo else 0,
                          tokens_seen=sum(max((h["tokens"] for h in history if h["phase"] == p), default=0) for p in ("heal", "task")))
    write_text_atomic(ctx.out.path / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    export_history(history, ctx.out.path, c.log_to, ctx.name)
    if c.lora is not None:
        full = (lambda: model_specs.load(ctx.runner.spec_of(c.student)).model) if quantize else None
        model = lora.finish_lora(model, c.lora.merge, full)
    _save_model(ctx, model, tok, _base_models_of(ctx, c.student))
    crash_point("model-saved")
    # the checkpoints are removed by the runner only after the model is renamed into place
    # (workspace.tidy): a kill before the rename resumes from them instead of starting over


def _signal_sources(ctx, task_rows: list[dict], heal_rows: list[dict], kd_teacher_ident: dict | None) -> list[dict]:
    """Tokens of training signal per input of this train stage (lineage/signal.training_sources)."""
    c = ctx.config
    results = ctx.runner.results
    student = results.get(c.student)
    kd_parent = results[c.teacher].id if c.teacher in results and c.teacher_signal == "online" else None
    cached = c.teacher_signal == "cached"
    if cached and ctx.inputs.get("logit_cache") is not None:  # the KD signal came from a separate cache
        kd_parent, cached = ctx.inputs["logit_cache"].id, False
    # the objective as weights: a `loss:` mixture, or sft_weight / kd_weight
    terms = getattr(c, "loss_terms", None) or [{"name": "sft", "weight": c.sft_weight}, {"name": "forward_kl", "weight": c.kd_weight}]
    sft_w = sum(t["weight"] for t in terms if t["name"] == "sft")
    kd_w = sum(t["weight"] for t in terms if t["name"] != "sft")
    if kd_teacher_ident and not kd_parent:
        kd_teacher_ident = {k: kd_teacher_ident.get(k) for k in ("spec", "weights_sha256", "license", "source")}
    return training_sources(
        data_id=ctx.inputs["data"].id, task_rows=task_rows, heal_rows=heal_rows if c.heal_epochs > 0 else [],
        epochs=c.epochs, heal_epochs=c.heal_epochs, max_length=c.max_length, sft_weight=sft_w,
        kd_weight=kd_w, cached=cached, kd_parent=kd_parent, kd_teacher=kd_teacher_ident,
        student_id=student.id if student else None, student_tokens=signal_tokens(student.manifest if student else None),
    )


def checkpoint_root(ctx) -> Path:
    """Where a training stage keeps its checkpoints: outside the artifact (which is only renamed
    into place when complete), under the artifact's id, so a resumed run with the same inputs
    and config finds them."""
    return ctx.runner.workspace / "checkpoints" / f"{ctx.name}-{ctx.out.id}"


def _open_cache(ctx):
    """The logit cache a train stage names, checked against the stage's dataset and teacher."""
    from .logit_cache import LogitCache

    c = ctx.config
    cache = LogitCache.open(ctx.inputs["logit_cache"].path)
    data_id = ctx.inputs["data"].id
    if cache.data_id != data_id:
        raise StillhouseError(
            f"stages.{ctx.name}.logit_cache: cache '{c.logit_cache}' scores dataset {cache.data_id}, not '{c.data}' ({data_id})"
        )
    if c.teacher is not None:
        ident = ctx.identity(c.teacher)
        if cache.teacher.get("weights_sha256") != ident.weights_sha256:
            raise StillhouseError(
                f"stages.{ctx.name}.logit_cache: cache '{c.logit_cache}' was made by teacher "
                f"{cache.teacher.get('spec')}, not by '{c.teacher}' ({ident.spec})"
            )
    return cache


def _tail_mean(history: list[dict], key: str, n: int = 10) -> float | None:
    tail = [h[key] for h in history[-n:]]
    return round(sum(tail) / len(tail), 5) if tail else None
