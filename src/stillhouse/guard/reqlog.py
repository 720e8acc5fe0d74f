"""The gateway's request log: append-only SQLite (WAL), one row per request, log_schema's columns.

Requests never wait on the disk: the event loop puts a row on a queue and a writer thread
inserts what is queued in one transaction at least every `flush_ms`. What "committed" means
here: a row is committed when its transaction's COMMIT has returned. In WAL mode with
synchronous=NORMAL the COMMIT has written the row to the WAL file (in the OS page cache, not
yet fsynced), so a committed row survives kill -9 of the gateway (the OS still holds the file
and the next open replays the WAL); only an OS crash or power loss could lose the last
transactions, which synchronous=FULL would prevent at one fsync per batch. A row still queued
when the gateway is killed (at most `flush_ms` of traffic) is lost; a graceful stop drains
the queue first. The prompt's hash, MinHash signature and intents are computed on the writer
thread too, off the request path.

`export_parquet` writes the log as Parquet partitioned by UTC day (hive `day=YYYY-MM-DD`).
"""

from __future__ import annotations

import queue
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from ..errors import StillhouseError
from . import intent, log_schema as L

_INSERT = f"INSERT INTO requests ({', '.join(L.NAMES)}) VALUES ({', '.join('?' * len(L.NAMES))})"
_STOP = object()


def check_log(path: Path) -> None:
    """Raise a one-line StillhouseError unless `path` is missing or a request log of this schema."""
    if not path.exists():
        return
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            cols = [r[1] for r in con.execute("PRAGMA table_info(requests)")]
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise StillhouseError(f"{path}: not a readable request log ({e})") from None
    if cols and cols[1 : 1 + len(L.NAMES)] != L.NAMES:
        raise StillhouseError(f"{path}: request log has other columns than this version writes ({', '.join(cols[1:4])}...)")
    if not cols and path.stat().st_size > 0:
        raise StillhouseError(f"{path}: SQLite file without a requests table: not a request log")


def connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute(L.SQLITE_DDL)
    return con


def derive(row: dict, log_text: bool, sig: bytes | None = None) -> tuple:
    """The row's values in column order; the prompt-derived columns are computed here (`sig`:
    the prompt's signature if already computed with its batch)."""
    text = row.pop("_prompt", None)
    system = row.pop("_system", None)
    if text is not None:
        row["prompt_sha256"] = L.prompt_sha256(text)
        row["prompt_sig"] = sig if sig is not None else L.prompt_signature(text)
        row["prompt_chars"] = len(text)
        row["probe"] = ",".join(intent.probes(text))
        if log_text:
            row["prompt_text"] = text
    if system:
        row["system_sha256"] = L.prompt_sha256(system)
    return tuple(row.get(name) for name in L.NAMES)


class RequestLog:
    def __init__(self, path: str | Path, *, log_text: bool = False, flush_ms: float = 50.0, max_batch: int = 1024):
        self.path = Path(path)
        self.log_text, self.flush_s, self.max_batch = log_text, flush_ms / 1000, max_batch
        check_log(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            connect(self.path).close()
        except sqlite3.Error as e:
            raise StillhouseError(f"{self.path}: cannot open the request log: {e}") from None
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()  # set by close(): stop sleeping and drain
        self.committed = 0  # rows committed so far by this process
        self._thread = threading.Thread(target=self._run, name="guard-request-log", daemon=True)
        self._thread.start()

    def append(self, row: dict) -> None:
        """Queue one row (a dict of log_schema columns, plus `_prompt`/`_system` texts)."""
        self._q.put(row)

    def close(self) -> None:
        """Commit everything queued, then stop the writer."""
        self._q.put(_STOP)
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        con = connect(self.path)
        stop = full = False
        while not stop:
            # sleep, then take everything queued: one wake-up per flush, not one per request (a
            # blocking get per row handed the GIL to this thread and back on every request)
            if not full:
                self._wake.wait(self.flush_s)
            batch = []
            while len(batch) < self.max_batch:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            full = len(batch) >= self.max_batch
            if batch:
                try:
                    # one vectorised MinHash pass per batch: it holds the GIL far less than a MinHash per row
                    sigs = iter(L.prompt_signatures([r["_prompt"] for r in batch if r.get("_prompt") is not None]))
                    rows = [derive(r, self.log_text, next(sigs) if r.get("_prompt") is not None else None) for r in batch]
                    con.execute("BEGIN")
                    con.executemany(_INSERT, rows)
                    con.execute("COMMIT")
                    self.committed += len(rows)
                except Exception as e:  # a full disk must not kill the gateway; say so loudly
                    print(f"guard: request log {self.path}: {len(batch)} rows not written: {e}", file=sys.stderr)
                    if con.in_transaction:
                        con.execute("ROLLBACK")
        con.close()

    def today(self, now: float) -> Iterator[tuple[str, str, float, int]]:
        """(key_id, org, ts, tokens) of today's admitted requests, to seed the quota windows."""
        day_start = now - now % 86_400
        con = sqlite3.connect(self.path)
        try:
            yield from con.execute(
                "SELECT key_id, org, ts, coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0) + coalesce(withheld_tokens, 0) "
                "FROM requests WHERE ts >= ? AND key_id IS NOT NULL AND outcome NOT IN ('unauthorized', 'rate_limited', 'quota_exceeded', 'bad_request')",
                (day_start,),
            )
        finally:
            con.close()


# --- export ----------------------------------------------------------------------------

EXPORT_BATCH = 65_536


def _batches(con: sqlite3.Connection, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    import pyarrow.compute as pc

    cur = con.execute(f"SELECT {', '.join(L.NAMES)} FROM requests ORDER BY id")
    bools = {i for i, (_, typ, _, _) in enumerate(L.COLUMNS) if typ == pa.bool_()}
    while rows := cur.fetchmany(EXPORT_BATCH):
        cols = list(zip(*rows))
        arrays = []
        for i, (name, typ, _, _) in enumerate(L.COLUMNS):
            vals = [None if v is None else bool(v) for v in cols[i]] if i in bools else cols[i]
            arrays.append(pa.array(vals, type=typ))
        stamp = pc.cast(pc.floor(pc.multiply(arrays[0], 1e6)), pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        arrays.append(pc.strftime(stamp, format="%Y-%m-%d"))
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def export_parquet(log: str | Path, out_dir: str | Path) -> int:
    """Write the log as Parquet under out_dir/day=YYYY-MM-DD/ (replacing out_dir); return rows."""
    import pyarrow.dataset as ds

    from ..fsutil import atomic_dir

    log = Path(log)
    if not log.is_file():
        raise StillhouseError(f"{log}: no such request log")
    check_log(log)
    schema = L.ARROW_SCHEMA.append(pa.field("day", pa.string()))
    try:
        # pyarrow pulls the batches from a thread of its own
        con = sqlite3.connect(f"file:{log}?mode=ro", uri=True, check_same_thread=False)
        (n,) = con.execute("SELECT count(*) FROM requests").fetchone()
        with atomic_dir(out_dir) as tmp:
            ds.write_dataset(
                _batches(con, schema), tmp, schema=schema, format="parquet",
                partitioning=ds.partitioning(pa.schema([("day", pa.string())]), flavor="hive"),
                existing_data_behavior="overwrite_or_ignore", basename_template="part-{i}.parquet",
            )
        con.close()
    except sqlite3.DatabaseError as e:
        raise StillhouseError(f"{log}: cannot read the request log ({e})") from None
    return n
