"""Exact de-duplication and held-out decontamination of records."""

from __future__ import annotations


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def exact_dedup(rows: list[dict], key: str) -> tuple[list[dict], int]:
    """Keep the first record of each normalised `key` value; return (kept, number removed)."""
    seen, out = set(), []
    for r in rows:
        k = _norm(r[key])
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out, len(rows) - len(out)


def drop_overlap(rows: list[dict], held_out: list[dict], key: str) -> tuple[list[dict], int]:
    """Remove records whose `key` also appears in the held-out set (exact, normalised)."""
    banned = {_norm(r[key]) for r in held_out}
    out = [r for r in rows if _norm(r[key]) not in banned]
    return out, len(rows) - len(out)
