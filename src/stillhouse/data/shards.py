"""Resumable output: a stage's work split into fixed units, each written as one Parquet shard.

A unit is a fixed slice of the stage's inputs (unit `u` = inputs `[u*size, (u+1)*size)`), so
the units, their seeds and their batch composition do not depend on when a run was
interrupted. A unit is written only when all its records are finished: first its Parquet shard,
then a small JSON marker with its statistics; a unit counts as done iff its marker exists.
Killed at any moment, a rerun skips the done units and recomputes at most the unit in flight,
so no finished unit is lost and none is duplicated. At the end the shards are streamed, in
unit order, into one `data.parquet` (one shard in memory at a time), through optional
filters (dedup, decontamination).

The guarantee: an interrupted-and-resumed run writes the same dataset as an uninterrupted
one with the same config, on the same machine and library versions (generation is a pure
function of the unit's inputs and the unit seed; floating-point results can differ across
machines or thread counts, as they would for an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import StillhouseError
from ..fsutil import write_json_atomic
from ..progress import console, progress
from ..records import write_rows

SHARD_DIR = "shards"


def unit_seed(seed: int, unit: int) -> int:
    """The sampling seed of one unit: fixed by the stage seed and the unit's position."""
    return seed * 1_000_003 + unit


def units_of(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Shards:
    """The shards of one partially or fully computed stage, in `<work dir>/shards/`."""

    def __init__(self, work_dir: Path):
        self.dir = Path(work_dir) / SHARD_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def _marker(self, unit: int) -> Path:
        return self.dir / f"unit-{unit:06d}.json"

    def _shard(self, unit: int) -> Path:
        return self.dir / f"unit-{unit:06d}.parquet"

    @contextlib.contextmanager
    def writing(self):
        """Exclusive right to add shards: two runs of the same stage must not interleave. The
        kernel drops the lock when its holder dies, so a killed run never blocks the next one."""
        with open(self.dir / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = StillhouseError(f"{self.dir.parent} is being written by another stillhouse run; wait for it or stop it")
                busy.resumable = True  # the other run's work: never discard it
                raise busy from None
            yield

    def done(self, unit: int) -> bool:
        """Committed: its marker exists and so does its shard (a marker whose shard is gone, left
        by an older clean-up order, does not count: the unit is redone)."""
        marker = self._marker(unit)
        if not marker.is_file():
            return False
        return json.loads(marker.read_text())["records"] == 0 or self._shard(unit).is_file()

    def check_complete(self, n_units: int, stage: str) -> None:
        """Refuse to finish a stage whose committed units are not exactly its units."""
        committed = {m["unit"] for m in self.markers()}
        expected = set(range(n_units))
        missing = sorted(u for u in expected if not self.done(u))
        extra = sorted(committed - expected)
        if missing or extra:
            raise StillhouseError(
                f"stage '{stage}': {self.dir} holds the wrong units ({len(missing)} missing, e.g. {missing[:3]}; "
                f"{len(extra)} unexpected, e.g. {extra[:3]}); run again with --force to redo the stage"
            )

    def write(self, unit: int, rows: list[dict], stats: dict) -> None:
        """Commit one finished unit: shard first, marker last (the marker is the commit)."""
        if rows:
            write_rows(self._shard(unit), rows)
        write_json_atomic(self._marker(unit), {"unit": unit, "records": len(rows), "stats": stats})

    def markers(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("unit-*.json"))]

    def stats(self) -> list[dict]:
        return [m["stats"] for m in self.markers()]

    def records(self) -> int:
        return sum(m["records"] for m in self.markers())

    def _files(self) -> list[Path]:
        return [self._shard(m["unit"]) for m in self.markers() if m["records"]]

    def iter_rows(self) -> Iterator[dict]:
        """Every committed record, in unit order, one shard in memory at a time."""
        for f in self._files():
            yield from pq.read_table(f).to_pylist()

    def merge(self, dest: Path, keep: Callable[[dict], bool] | None = None) -> int:
        """Stream the shards into one Parquet file (atomic); returns the records written."""
        files = self._files()
        if not files:
            return 0
        # A column that is all-null in one shard (no top-k, no verdict) has type null there.
        schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
        tmp = dest.with_name(f".{dest.name}.tmp")
        n = 0
        try:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
                for f in files:
                    table = _conform(pq.read_table(f), schema)
                    if keep is not None:
                        table = table.filter(pa.array([keep(r) for r in table.to_pylist()], pa.bool_()))
                    n += table.num_rows
                    w.write_table(table)
        except BaseException:  # a full disk: the half-written merge must not hold the space
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(dest)
        return n


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def run_units(
    stage: str,
    work_dir: Path,
    units: list[Sequence],
    work: Callable[[int, Sequence], tuple[list[dict], dict]],
    description: str,
) -> Shards:
    """Run `work(unit_index, unit_items) -> (rows, stats)` for every unit not yet done.

    Ctrl-C abandons the unit in flight and keeps every committed one; the message says how to
    continue (the same command).
    """
    shards = Shards(work_dir)
    todo = [u for u in range(len(units)) if not shards.done(u)]
    if len(todo) < len(units):
        console.print(f"{stage}: resuming, {len(units) - len(todo)} of {len(units)} shards already done")
    records = shards.records()
    try:
        with shards.writing(), progress(description, total=len(units)) as advance:
            advance(len(units) - len(todo))
            for u in todo:
                rows, stats = work(u, units[u])
                shards.write(u, rows, stats)
                records += len(rows)
                advance(1, info=f"{records} records")
    except (KeyboardInterrupt, StillhouseError) as e:
        if getattr(e, "resumable", False):
            raise  # another run holds the lock
        done = sum(shards.done(u) for u in range(len(units)))
        if isinstance(e, StillhouseError):
            if not done:
                raise  # failed before any work was kept (a dead endpoint): nothing to leave behind
            e.resumable = True  # e.g. an endpoint that went away mid-run: keep the shards for a rerun
        # printed even when progress output is quiet: the user needs to know nothing was lost
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "stopped by an error"
        print(
            f"{stage}: {what}; {done} of {len(units)} shards ({shards.records()} records) are kept in "
            f"{work_dir}. Run the same command again to continue.", file=sys.stderr,
        )
        raise
    try:
        shards.check_complete(len(units), stage)
    except StillhouseError as e:
        e.resumable = True  # keep the work for the user to look at; --force redoes it
        raise
    return shards
