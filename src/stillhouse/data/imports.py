"""Data from outside the pipeline, and datasets combined: the `import` and `mix` stages.

Both write rows a train stage reads (`prompt_ids`, `completion_ids`, `passed`), and both say
where their tokens came from: an import declares its `origin` (or is recorded as unknown), a
mix records how many target tokens each input dataset contributed (`signal.sources`), which
is what lineage weighs teacher shares by.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from ..errors import EmptyDatasetError, StillhouseError
from ..models import load_tokenizer
from ..lineage.signal import target_tokens
from ..records import read_jsonl, read_rows, write_rows
from ..teachers.hf import encode_prompt, render_chat
from ..fsutil import expand_user

PROMPT_KEYS = ("prompt", "question", "instruction")
COMPLETION_KEYS = ("completion", "response", "answer", "output")


def encode_pair(tok, question: str, completion: str, system_prompt: str | None) -> dict:
    """A prompt rendered with the tokenizer's chat template and a completion ending in EOS."""
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]
    prompt = render_chat(tok, msgs)
    return {"prompt": prompt, "prompt_ids": encode_prompt(tok, prompt),
            "completion_ids": tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]}


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise StillhouseError(f"cannot read Parquet {path}: {e}") from None
    return [obj for _, obj in read_jsonl(path)]


def _field(row: dict, keys: tuple[str, ...], path: Path, i: int) -> str:
    for k in keys:
        if isinstance(row.get(k), str):
            return row[k]
    raise StillhouseError(f"{path}: record {i} has none of the fields {', '.join(keys)}")


def run_import(ctx) -> None:
    c = ctx.config
    path = expand_user(c.path)
    raw = _read_file(path)
    if not raw:
        raise EmptyDatasetError(f"stage '{ctx.name}': {path} has no records")
    tok = load_tokenizer(ctx.runner.spec_of(c.tokenizer))
    origin = c.origin.model_dump() if c.origin else None
    author = (origin or {}).get("teacher") or (origin or {}).get("api") or "unknown"
    rows = []
    for i, r in enumerate(raw):
        q, a = _field(r, PROMPT_KEYS, path, i), _field(r, COMPLETION_KEYS, path, i)
        rows.append({"id": f"import/{i}", "question": q, "completion": a, **encode_pair(tok, q, a, c.system_prompt),
                     "passed": True, "teacher": author, "topk_ids": None, "topk_logprobs": None})
    write_rows(ctx.out.path / "data.parquet", rows)
    ctx.out.counts.update(records=len(rows), target_tokens=sum(len(r["completion_ids"]) for r in rows))
    ctx.out.extra["origin"] = origin or {"declared": False}
    ctx.out.extra["source_file"] = {"path": str(path.resolve()), "sha256": c.sha256}
    if origin is None:
        ctx.out.warnings.append("imported data declares no origin: lineage shows it as unknown")


def run_mix(ctx) -> None:
    c = ctx.config
    tok = load_tokenizer(ctx.runner.spec_of(c.tokenizer)) if c.tokenizer else None
    rows, sources = [], []
    for i, name in enumerate(c.datasets):
        art = ctx.inputs[f"datasets[{i}]"]
        part = read_rows(art.file("data.parquet"))
        if tok is not None:  # another vocabulary: re-encode the text, the cached top-k no longer applies
            part = [{**r, **encode_pair(tok, r["question"], r["completion"], c.system_prompt), "topk_ids": None, "topk_logprobs": None}
                    for r in part]
        part = [{**r, "id": f"{name}/{r['id']}", "source_dataset": art.id} for r in part]
        sources.append({"parent": art.id, "role": "data", "tokens": target_tokens([r for r in part if r.get("passed", True)], 1 << 30)})
        rows += part
    if not rows:
        raise EmptyDatasetError(f"stage '{ctx.name}': the mixed datasets have no records")
    keys = list(dict.fromkeys(k for r in rows for k in r))  # Arrow takes its columns from the first row
    rows = [{k: r.get(k) for k in keys} for r in rows]
    write_rows(ctx.out.path / "data.parquet", rows)
    ctx.out.counts.update(records=len(rows), target_tokens=sum(len(r["completion_ids"]) for r in rows))
    ctx.out.extra["signal"] = {"unit": "tokens", "sources": sources}
    task = next((a.manifest["task"] for a in ctx.inputs.values() if a.manifest.get("task")), None)
    if task:
        ctx.out.extra["task"] = task
