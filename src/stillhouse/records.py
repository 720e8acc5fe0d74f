"""Reading and writing record lists as Parquet (Arrow schema inferred from the records)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StillhouseError


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write records to one Parquet file via a temp name (atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp, compression="zstd")
    tmp.replace(path)


def read_rows(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise StillhouseError(f"dataset file not found: {path}")
    return pq.read_table(path).to_pylist()
