"""Stage `filter`: the records of a dataset that pass a verifier and a completion-length bound.

A filtered dataset is a subset of its parent: same columns, same ids, so a train stage reads it
as it would the parent; its `signal` names the parent, so lineage follows it to the parent's teachers.
"""

from __future__ import annotations

from typing import Callable

from ..errors import EmptyDatasetError, StillhouseError
from ..lineage.signal import target_tokens
from ..records import read_rows, write_rows


def filter_records(rows: list[dict], verifier: Callable | None, min_tokens: int, max_tokens: int | None) -> tuple[list[dict], dict]:
    """(kept rows, how many were dropped for length and by the verifier). The length bound is
    checked first: it is free, a verifier may run code."""
    kept, dropped = [], {"length": 0, "verifier": 0}
    for r in rows:
        n = len(r["completion_ids"])
        if n < min_tokens or (max_tokens is not None and n > max_tokens):
            dropped["length"] += 1
        elif verifier is not None and not verifier(r, r["completion"]).passed:
            dropped["verifier"] += 1
        else:
            kept.append(r)
    return kept, dropped


def run_filter(ctx) -> None:
    from ..verify.choose import verifier_for

    c = ctx.config
    data = ctx.inputs["data"]
    path = data.file("data.parquet")
    rows = read_rows(path) if path.is_file() else []
    if not rows:
        raise EmptyDatasetError(f"stage '{ctx.name}': dataset '{c.data}' has no records")
    missing = {"completion", "completion_ids"} - set(rows[0])
    if missing:
        raise StillhouseError(f"stages.{ctx.name}.data: '{c.data}' has no {' or '.join(sorted(missing))} column "
                              "(filter a dataset of completions: rejection, complete, import, mix)")
    verifier = None if c.verifier == "none" else verifier_for(c.verifier, data.manifest, rows, ctx.name)
    kept, dropped = filter_records(rows, verifier, c.min_completion_tokens, c.max_completion_tokens)
    if not kept:
        raise EmptyDatasetError(f"stage '{ctx.name}': no record of '{c.data}' passes the filter "
                                f"({dropped['length']} too short or long, {dropped['verifier']} failed the verifier)")
    write_rows(ctx.out.path / "data.parquet", kept)
    ctx.out.counts.update(records=len(kept), dropped_length=dropped["length"], dropped_verifier=dropped["verifier"],
                          target_tokens=sum(len(r["completion_ids"]) for r in kept))
    # what lineage weighs teacher shares by: the kept target tokens all come from the parent
    ctx.out.extra["signal"] = {"unit": "tokens", "sources": [{"parent": data.id, "role": "data", "tokens": target_tokens(kept, 1 << 30)}]}
    if data.manifest.get("task"):  # a verifier downstream (or an eval) still knows the task
        ctx.out.extra["task"] = data.manifest["task"]
