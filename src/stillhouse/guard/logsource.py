"""Open a request log for analysis as a DuckDB view `requests`, whatever it is stored in.

Two stores, one schema (log_schema.py): the gateway's SQLite file (table `requests`) and a
directory of day-partitioned Parquet files (hive style `day=YYYY-MM-DD/`, or any *.parquet
below it). Anything else, or a log missing columns, is refused in one line naming the file.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import duckdb

from ..errors import StillhouseError
from . import log_schema as L

_SQLITE_MAGIC = b"SQLite format 3\x00"


def open_log(path: str | Path, threads: int = 2, memory_limit: str = "2GB") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection whose view `requests` is the log at `path` (checked against the schema)."""
    path = Path(path)
    # spills go to the system's temp directory, not to `.tmp/` in whatever directory the command runs in
    spill = Path(tempfile.gettempdir()) / "stillhouse-duckdb"
    con = duckdb.connect(config={"threads": threads, "memory_limit": memory_limit, "temp_directory": str(spill)})
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise StillhouseError(f"{path}: no *.parquet files: not a request-log export")
        hive = any("=" in p.parent.name for p in files)
        src = f"read_parquet('{_sql_str(str(path))}/**/*.parquet', hive_partitioning={str(hive).lower()}, union_by_name=true)"
        _view(con, src, path)
    elif path.is_file() and path.suffix == ".parquet":
        _view(con, f"read_parquet('{_sql_str(str(path))}')", path)
    elif path.is_file():
        with open(path, "rb") as f:
            if f.read(16) != _SQLITE_MAGIC:
                raise StillhouseError(f"{path}: neither a SQLite request log nor a Parquet directory")
        con.register("requests_arrow", _sqlite_arrow(path))
        _view(con, "requests_arrow", path)
    else:
        raise StillhouseError(f"{path}: no such request log")
    return con


def _sql_str(s: str) -> str:
    return s.replace("'", "''")


def _view(con: duckdb.DuckDBPyConnection, src: str, path: Path) -> None:
    try:
        cols = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    except duckdb.Error as e:
        raise StillhouseError(f"{path}: unreadable request log ({_first_line(e)})") from None
    missing = [c for c in L.NAMES if c not in cols]
    if missing:
        raise StillhouseError(f"{path}: not the request-log schema: missing column(s) {', '.join(missing)}")
    if cols["ts"] not in ("DOUBLE", "FLOAT", "BIGINT", "INTEGER") or cols["prompt_sig"] != "BLOB":
        raise StillhouseError(f"{path}: not the request-log schema: ts is {cols['ts']}, prompt_sig is {cols['prompt_sig']}")
    con.execute(f"CREATE VIEW requests AS SELECT {', '.join(L.NAMES)} FROM {src}")
    try:  # a truncated or corrupt Parquet file fails here, on first read, not halfway through the analysis
        con.execute("SELECT count(*), min(ts), max(ts) FROM requests").fetchall()[0]
    except duckdb.Error as e:
        raise StillhouseError(f"{path}: corrupt request log ({_first_line(e)})") from None


def _sqlite_arrow(path: Path):
    """The SQLite log as an Arrow table (the embedded log is the single-machine case; beyond
    that the gateway exports Parquet, which DuckDB reads without loading)."""
    import pyarrow as pa

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        have = [r[1] for r in con.execute("PRAGMA table_info(requests)")]
        if not have:
            raise StillhouseError(f"{path}: SQLite file without a `requests` table: not a request log")
        missing = [c for c in L.NAMES if c not in have]
        if missing:
            raise StillhouseError(f"{path}: not the request-log schema: missing column(s) {', '.join(missing)}")
        cur = con.execute(f"SELECT {', '.join(L.NAMES)} FROM requests ORDER BY id")
        batches = []
        while rows := cur.fetchmany(100_000):
            cols = list(zip(*rows))
            batches.append(pa.record_batch([_column(c, L.ARROW_SCHEMA.field(i).type) for i, c in enumerate(cols)], schema=L.ARROW_SCHEMA))
        con.close()
    except sqlite3.DatabaseError as e:
        raise StillhouseError(f"{path}: corrupt SQLite request log ({_first_line(e)})") from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
        raise StillhouseError(f"{path}: request log with values of the wrong type ({_first_line(e)})") from None
    return pa.Table.from_batches(batches, schema=L.ARROW_SCHEMA)


def _column(values, typ):
    import pyarrow as pa

    if typ == pa.bool_():  # SQLite keeps booleans as 0/1
        values = [None if v is None else bool(v) if isinstance(v, int) else v for v in values]
    return pa.array(values, type=typ)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
