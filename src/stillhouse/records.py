"""Reading and writing record lists: Parquet (Arrow schema inferred from the records) and JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StillhouseError


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write records to one Parquet file via a temp name (atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp, compression="zstd")
    except BaseException:  # e.g. a full disk: leave no stray temp file holding space
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def read_rows(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise StillhouseError(f"dataset file not found: {path}")
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:  # not Parquet, truncated, damaged
        raise StillhouseError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a user's JSONL file.

    A line that is not a JSON object is one error naming the file and the line."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise StillhouseError(f"{path}: not UTF-8 text (byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise StillhouseError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise StillhouseError(f"{path}:{n}: expected a JSON object")
        out.append((n, obj))
    return out
