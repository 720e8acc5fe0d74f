"""White-box stages beyond plain training: scoring a dataset into a logit cache, on-policy distillation."""

from __future__ import annotations

import json

import torch

from ..errors import EmptyDatasetError, StillhouseError
from ..fsutil import write_text_atomic
from ..progress import console, progress
from ..records import read_rows
from ..scoring import selected_logits, right_pad
from . import alignment
from .logit_cache import FORMAT, META, CacheWriter, Codec, topk_signal


def _dataset_rows(ctx, field: str = "data") -> list[dict]:
    art = ctx.inputs[field]
    path = art.file("data.parquet")
    if not path.is_file():
        raise StillhouseError(f"stages.{ctx.name}.{field}: stage '{getattr(ctx.config, field)}' has no scored records "
                              "(name a rejection stage: records with prompt_ids and completion_ids)")
    rows = read_rows(path)
    if not rows:
        raise EmptyDatasetError(f"stage '{ctx.name}': dataset '{getattr(ctx.config, field)}' is empty")
    return rows


@torch.no_grad()
def score_records(model, rows: list[dict], k: int, vocab: int, pad_id: int, batch_size: int, max_length: int,
                  description: str = "Teacher scoring"):
    """Yield (record id, top-k log-probs, ids, rest) for each record's completion tokens.

    The teacher sees exactly the record's token ids (prompt + completion, as the student will),
    batched by length; logits exist only at the positions that predict completion tokens.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]) + len(rows[i]["completion_ids"]))
    with progress(description, total=len(rows)) as advance:
        for b in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[b : b + batch_size]]
            seqs = [(r["prompt_ids"] + r["completion_ids"])[:max_length] for r in batch]
            ids, attn = right_pad(seqs, pad_id)
            predict = torch.zeros_like(ids, dtype=torch.bool)
            spans = []
            for j, (r, s) in enumerate(zip(batch, seqs)):
                first = max(len(r["prompt_ids"]), 1)  # as the training loop's collate
                predict[j, first - 1 : len(s) - 1] = True
                spans.append(max(0, len(s) - first))
            logits = selected_logits(model, ids, attn, predict)[:, :vocab]
            values, top_ids, rest = topk_signal(logits, k)
            start = 0
            for r, n in zip(batch, spans):
                yield r["id"], values[start : start + n], top_ids[start : start + n], rest[start : start + n]
                start += n
            advance(len(batch))


def run_cache_logits(ctx) -> None:
    c = ctx.config
    rows = _dataset_rows(ctx)
    lm = ctx.model(c.teacher)
    tok = lm.tokenizer
    where = f"stages.{ctx.name}"
    alignment.check_scored_text(tok, rows, f"{where}.data")
    vocab, note = alignment.shared_vocab(tok, lm.model)
    if note:
        console.print(f"{ctx.name}: {note}")
        ctx.out.warnings.append(note)
    codec = Codec(top_k=c.top_k, min_prob=c.min_prob)
    writer = CacheWriter(ctx.out.path, codec)
    for rid, values, ids, rest in score_records(lm.model, rows, c.top_k, vocab, tok.pad_token_id, c.batch_size, c.max_length):
        writer.add(rid, values, ids, rest)
    sizes = writer.close()
    ident = lm.identity.to_dict()
    ctx.out.extra[META] = {
        "format": FORMAT, "codec": codec.to_dict(), "shards": writer.shards, "vocab_size": vocab,
        "tokenizer": alignment.tokenizer_identity(tok), "teacher": ident, "data_id": ctx.inputs["data"].id,
    }
    ctx.out.teachers.append({**ident, "role": "logits", "token_share": 1.0})
    ctx.out.counts.update(records=len(rows), tokens=sizes["tokens"], bytes=sizes["bytes"])
    ctx.out.metrics.update(bytes_per_token=sizes["bytes_per_token"], entries_per_token=sizes["entries_per_token"])


def run_onpolicy(ctx) -> None:
    from .. import models as model_specs
    from ..lineage import merge_teachers
    from .onpolicy import OnPolicyConfig, Prompt, train_onpolicy
    from .stages import _base_models_of, _save_model, checkpoint_root

    c = ctx.config
    rows = [r for r in _dataset_rows(ctx) if r.get("passed", True)]
    if not rows:
        raise EmptyDatasetError(f"stage '{ctx.name}': dataset '{c.data}' has no verified records")
    t = ctx.model(c.teacher)
    # the student is loaded fresh (not the runner's shared copy): training changes it in place
    student_lm = model_specs.load(ctx.runner.spec_of(c.student))
    tok = student_lm.tokenizer
    where = f"stages.{ctx.name}"
    alignment.check_token_level(tok, t.tokenizer, where, c.student, c.teacher)
    alignment.check_scored_text(tok, rows, f"{where}.data")
    vocab, note = alignment.shared_vocab(tok, student_lm.model, t.model)
    if note:
        console.print(f"{ctx.name}: {note}")
        ctx.out.warnings.append(note)
    cfg = OnPolicyConfig(**c.onpolicy_settings(), vocab_size=vocab)
    # one prompt per problem (a dataset keeps several completions of each)
    by_prompt = {r["prompt"]: Prompt(r["prompt"], r["prompt_ids"], r["completion_ids"]) for r in rows}
    ckpt_dir = checkpoint_root(ctx)
    try:
        history = train_onpolicy(student_lm.model, t.model, tok, list(by_prompt.values()), cfg, checkpoint_dir=ckpt_dir,
                                 resume=getattr(ctx.runner, "resume", False), metrics_path=ckpt_dir / "metrics.jsonl")
    except ValueError as e:
        raise StillhouseError(f"stage '{ctx.name}': {e}") from None
    off_share = 0.0 if c.method == "reverse_kl" else 1.0 - c.lmbda
    entries = [({**t.identity.to_dict(), "role": "onpolicy-logits"}, 1.0)]
    entries += [({**d, "role": "off-policy-text"}, off_share * d.get("token_share", 1.0))
                for d in ctx.inputs["data"].manifest.get("teachers", []) if off_share > 0]
    ctx.out.teachers.extend(merge_teachers(entries))
    tail = history[-10:]
    ctx.out.metrics.update(
        steps=len(history), method=c.method,
        first_reverse_kl=round(sum(h["reverse_kl"] for h in history[:10]) / max(1, len(history[:10])), 5),
        final_reverse_kl=round(sum(h["reverse_kl"] for h in tail) / max(1, len(tail)), 5),
        on_policy_steps=sum(h["on_policy"] for h in history),
    )
    ctx.out.counts.update(prompts=len(by_prompt), tokens_seen=history[-1]["tokens"] if history else 0)
    write_text_atomic(ctx.out.path / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    _save_model(ctx, student_lm.model, tok, _base_models_of(ctx, c.student))


def run_cross_tokenizer(ctx) -> None:
    import json
    from dataclasses import fields

    from .. import models as model_specs
    from ..lineage import merge_teachers
    from .cross_tokenizer import CrossConfig, prepare, train_cross, uld_distance
    from .stages import _base_models_of, _save_model, checkpoint_root

    c = ctx.config
    rows = [r for r in _dataset_rows(ctx) if r.get("passed", True)]
    if not rows:
        raise EmptyDatasetError(f"stage '{ctx.name}': dataset '{c.data}' has no verified records")
    t = ctx.model(c.teacher)
    student_lm = model_specs.load(ctx.runner.spec_of(c.student))
    tok = student_lm.tokenizer
    if alignment.same_tokenizer(tok, t.tokenizer):
        ctx.out.warnings.append("teacher and student share a tokenizer: a train stage with token-level KD is exact")
    cfg = CrossConfig(**{f.name: getattr(c, f.name) for f in fields(CrossConfig)})
    # each side wraps the question in its own chat template; the completion text is shared
    records = [([{"role": "user", "content": r["question"]}], r["completion"]) for r in rows]
    examples = prepare(tok, t.tokenizer, t.model, records, cfg)
    aligned = sum(len(e.sorted_rows or []) for e in examples)
    tokens = sum(len(e.input_ids) - e.n_prompt for e in examples)
    before = uld_distance(student_lm.model, tok.pad_token_id, examples, cfg) if cfg.uld_weight > 0 else None
    ckpt_dir = checkpoint_root(ctx)
    try:
        history = train_cross(student_lm.model, tok.pad_token_id, examples, cfg, checkpoint_dir=ckpt_dir,
                              resume=getattr(ctx.runner, "resume", False), metrics_path=ckpt_dir / "metrics.jsonl")
    except ValueError as e:
        raise StillhouseError(f"stage '{ctx.name}': {e}") from None
    after = uld_distance(student_lm.model, tok.pad_token_id, examples, cfg) if cfg.uld_weight > 0 else None
    entries = [({**d, "role": "sft-targets"}, c.sft_weight * d.get("token_share", 1.0))
               for d in ctx.inputs["data"].manifest.get("teachers", [])]
    if c.uld_weight > 0:
        entries.append(({**t.identity.to_dict(), "role": "uld-logits"}, c.uld_weight))
    ctx.out.teachers.extend(merge_teachers(entries))
    tail = history[-10:]
    ctx.out.metrics.update(
        steps=len(history), aligned_share=round(aligned / max(1, tokens), 4), uld_before=before, uld_after=after,
        final_sft=round(sum(h["sft"] for h in tail) / max(1, len(tail)), 5),
        tokens_per_s=round(history[-1]["tokens_per_s"], 1) if history else 0.0,
    )
    ctx.out.counts.update(train_records=len(rows), student_tokens=tokens, aligned_tokens=aligned)
    with open(ctx.out.path / "metrics.jsonl", "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    _save_model(ctx, student_lm.model, tok, _base_models_of(ctx, c.student))
