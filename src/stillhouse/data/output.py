"""The end of every generating dataset stage: filters, the merged `data.parquet`, manifest facts."""

from __future__ import annotations

from typing import Callable

from ..crashpoints import crash_point
from ..errors import EmptyDatasetError
from ..records import read_rows
from .dedup import RecordFilter
from .prompts import dataset_rows, read_prompt_file
from .shards import Shards


def eval_texts(ctx) -> list[str]:
    """The prompts of every evaluation set named in `decontaminate`."""
    texts: list[str] = []
    for i, name in enumerate(ctx.config.decontaminate):
        if name == "humaneval":
            from ..verify.code import humaneval_problems

            texts += [p["prompt"] for p in humaneval_problems()]
        elif name.endswith((".jsonl", ".parquet")):
            texts += [str(r.get("prompt", r.get("question", ""))) for r in read_prompt_file(name)]
        else:
            art = ctx.inputs[f"decontaminate[{i}]"]
            # a tasks stage is decontaminated against its held-out split; another dataset as a whole
            rows = read_rows(art.file("eval.parquet")) if art.manifest.get("stage") == "tasks" else dataset_rows(art)
            texts += [str(r.get("question", r.get("prompt_source", r.get("prompt", "")))) for r in rows]
    return texts


def record_filter(ctx, key: Callable[[dict], str], prompt: Callable[[dict], str]) -> RecordFilter:
    c = ctx.config
    return RecordFilter(dedup=c.dedup, near_threshold=c.near_threshold, eval_texts=eval_texts(ctx),
                        ngram=c.decontaminate_ngram, key=key, prompt=prompt)


def finish_dataset(ctx, shards: Shards, filt: RecordFilter, what: str = "records", skipped: dict | None = None) -> int:
    """Merge the shards into `data.parquet` through the filter; record counts (the runner drops the shards after the rename).

    An empty result is an error (no artifact is written; the shards stay for a rerun).
    """
    tokens = {"target_tokens": 0, "prompt_tokens": 0}

    def keep(row: dict) -> bool:
        if not filt(row):
            return False
        tokens["target_tokens"] += len(row.get("completion_ids") or [])
        tokens["prompt_tokens"] += len(row.get("prompt_ids") or [])
        return True

    generated = shards.records()
    n = shards.merge(ctx.out.path / "data.parquet", keep)
    crash_point("dataset-merged")
    removed = {k: v for k, v in filt.counts.items() if v or ctx.config.dedup != "off" or ctx.config.decontaminate}
    skipped = {k: v for k, v in (skipped or {}).items() if v}
    if n == 0:
        (ctx.out.path / "data.parquet").unlink(missing_ok=True)
        facts = {**skipped, **removed}
        detail = f" ({', '.join(f'{k}={v}' for k, v in facts.items())})" if facts else ""
        raise EmptyDatasetError(f"stage '{ctx.name}': no {what} left{detail}")
    ctx.out.counts.update(records=n, generated_records=generated, **tokens, **removed)
    # the shards stay until the artifact is renamed into place (workspace.tidy): a kill before
    # the rename then loses nothing
    return n
