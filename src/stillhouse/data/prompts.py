"""What the generating stages share: where prompts come from, how they are rendered for a
teacher, and the provenance every record carries."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..errors import EmptyDatasetError, StillhouseError
from ..records import read_jsonl, read_rows
from ..teachers.base import Completion, SamplingParams
from ..teachers.hf import encode_prompt, render_chat


def short_hash(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def dataset_rows(artifact) -> list[dict]:
    """A dataset artifact's records: a tasks stage's training split, else its data."""
    name = "train.parquet" if artifact.manifest.get("stage") == "tasks" else "data.parquet"
    return read_rows(artifact.file(name))


def read_prompt_file(path: str | Path) -> list[dict]:
    """Records from a JSONL (one object a line) or Parquet file; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise StillhouseError(f"prompt file not found: {path}")
    if path.suffix == ".parquet":
        return read_rows(path)
    return [obj for _, obj in read_jsonl(path)]


def load_prompts(ctx, source: str = "prompts", file_key: str = "prompts_file") -> list[dict]:
    """The stage's prompt records `{id, prompt, ...source fields}` from a dataset stage or a file.

    Record ids are the source's own `id` when it has one, else the prompt's position and hash,
    so they are the same on every run.
    """
    c = ctx.config
    field = c.field
    if getattr(c, source) is not None:
        art = ctx.inputs[source]
        rows, where = dataset_rows(art), f"stage '{getattr(c, source)}'"
        # tasks and generated datasets keep the raw prompt in `question` (`prompt` is the rendered chat)
        field = field or ("question" if rows and "question" in rows[0] else "prompt")
    else:
        rows, where = read_prompt_file(getattr(c, file_key)), getattr(c, file_key)
        field = field or "prompt"
    if not rows:
        raise EmptyDatasetError(f"stage '{ctx.name}': {where} has no prompts")
    out = []
    for i, r in enumerate(rows):
        if field not in r:
            raise StillhouseError(f"stage '{ctx.name}': {where}: record {i + 1} has no field '{field}' (set `field:`)")
        text = r[field]
        if not isinstance(text, str) or not text.strip():
            raise StillhouseError(f"stage '{ctx.name}': {where}: record {i + 1}: field '{field}' is empty or not text")
        rid = str(r["id"]) if r.get("id") not in (None, "") else f"p{i}-{short_hash(text, 8)}"
        out.append({**r, "id": rid, "prompt_source": text})
    if c.limit is not None:
        out = out[: c.limit]
    return out


def fill(template: str, **values: str) -> str:
    """Fill `{name}` placeholders in one pass. Not str.format: prompts and responses often hold
    braces (code, JSON), and a value must never be re-scanned for placeholders."""
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)


def messages(system_prompt: str | None, user: str) -> list[dict]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": user}]


def template_hash(teacher, system_prompt: str | None, *templates: str) -> str:
    """Hash of everything between a prompt and the text the teacher sees."""
    chat = getattr(teacher.tokenizer, "chat_template", None) or ""
    return short_hash(json.dumps([chat, system_prompt or "", *templates]))


def context_length(teacher) -> int | None:
    """An in-process teacher's context window in tokens (None when unknown: an API teacher)."""
    return getattr(getattr(getattr(teacher, "model", None), "config", None), "max_position_embeddings", None)


def fit_context(teacher, msgs: list[dict], max_new_tokens: int, too_long: str = "refuse") -> list[dict]:
    """The messages, checked to fit the teacher's context with room for `max_new_tokens`.

    A longer prompt is never passed on silently (the model would see a prompt cut at an
    arbitrary place, or nonsense positions): "refuse" raises an error naming it, "truncate"
    cuts the end of its last message to fit and counts it in `teacher.stats["truncated_prompts"]`.
    """
    limit, tok = context_length(teacher), teacher.tokenizer
    if not limit:
        return msgs
    n = len(encode_prompt(tok, render_chat(tok, msgs)))
    if n + max_new_tokens <= limit:
        return msgs
    user = msgs[-1]["content"]
    ids = tok(user, add_special_tokens=False)["input_ids"]
    keep = len(ids) - (n + max_new_tokens - limit)
    while too_long == "truncate" and keep > 0:
        cut = [*msgs[:-1], {**msgs[-1], "content": tok.decode(ids[:keep])}]
        if len(encode_prompt(tok, render_chat(tok, cut))) + max_new_tokens <= limit:
            teacher.stats["truncated_prompts"] = teacher.stats.get("truncated_prompts", 0) + 1
            return cut
        keep -= 1  # decoding and encoding again need not give the same count
    what = "does not fit even when truncated" if too_long == "truncate" else "is too long"
    raise StillhouseError(
        f"prompt {user[:40]!r}... {what}: {n} tokens + max_new_tokens {max_new_tokens} exceed the teacher's context "
        f"of {limit} tokens (set `too_long: truncate` on a complete stage, shorten the prompt, or lower max_new_tokens)"
    )


def generate(teacher, msgs: list[list[dict]], params: SamplingParams, description: str, top_k_logprobs: int = 0,
             too_long: str = "refuse"):
    """(rendered prompt texts, prompt ids, completions per prompt) from any teacher backend.

    In-process teachers render the chat template here so the record keeps the exact prompt
    tokens (what training needs), after `fit_context`; API backends render on the server
    (and refuse an over-long prompt themselves).
    """
    tok = teacher.tokenizer
    if tok is not None:
        msgs = [fit_context(teacher, m, params.max_new_tokens, too_long) for m in msgs]
        texts = [render_chat(tok, m) for m in msgs]
        ids = [encode_prompt(tok, t) for t in texts]
        return texts, ids, teacher.generate_text(texts, params, description, top_k_logprobs)
    outs = teacher.generate(msgs, params)
    return [m[-1]["content"] for m in msgs], [[] for _ in msgs], outs


def provenance(ctx, teacher_ref: str, teacher, params: SamplingParams, tpl_hash: str) -> dict:
    """The columns that say where a record came from."""
    ident = ctx.identity(teacher_ref)
    return {
        "teacher": ident.spec,
        "teacher_sha256": ident.weights_sha256,
        "teacher_license": ident.license,
        "backend": teacher.backend,
        "sampling": json.dumps(params.to_dict(), sort_keys=True),
        "template_hash": tpl_hash,
    }


def completion_columns(c: Completion) -> dict:
    """A completion as record columns; the stop token is part of the training target."""
    return {
        "completion": c.text,
        "completion_ids": c.token_ids + ([c.stop_token] if c.stop_token is not None else []),
        "finish_reason": c.finish_reason,
        "topk_ids": c.topk_ids,
        "topk_logprobs": c.topk_logprobs,
    }


def teacher_tokens(shards_stats: list[dict]) -> int:
    return sum(s.get("teacher_generated_tokens", 0) for s in shards_stats)
