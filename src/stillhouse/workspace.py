"""Crash safety of the workspace: one writer per artifact, and the clean-up a killed run left.

Every write of an artifact happens under its lock (`<workspace>/.locks/<kind>-<id>.lock`, an
flock: the kernel drops it when the holder dies, so a killed run never blocks the next). The
lock is taken before `--force` discards anything and held through the merge and the rename,
so two runs can never write into one directory. Under the lock, `recover` settles what a
killed run left behind, in an order where every kill point is recoverable:

- a work directory whose manifest is complete (killed between the manifest and the rename)
  is renamed into place: the finished work is accepted, not redone;
- other orphaned one-shot work directories (`.<id>.<random>.partial`) are removed: nothing
  can continue them;
- a resumable work directory (`.<id>.partial`) without a manifest is kept for the stage;
- spent scratch (a dataset's unit shards, a training run's checkpoints) is removed only once
  the artifact is in place (`tidy`), so a kill before the rename never loses finished work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from .crashpoints import crash_point
from .artifacts import MANIFEST, ArtifactStore, read_manifest
from .errors import StillhouseError

SPENT_SCRATCH = ("shards",)  # directories inside an artifact that only its writing needed
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def artifact_lock(store: ArtifactStore, kind: str, aid: str) -> Iterator[None]:
    """Hold the artifact's write lock; a second run waits for the first (and says so)."""
    folder = store.root / ".locks"  # outside the kind folders: nothing there but artifacts and their work
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-{aid}.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            print(f"stillhouse: {kind}/{aid} is being written by another stillhouse run (pid {holder}); waiting for it",
                  file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield


def _complete(work: Path, kind: str, aid: str) -> bool:
    """Whether a work directory holds a finished artifact (its manifest is written last)."""
    try:
        m = read_manifest(work / MANIFEST, f"{kind}/{aid}")
    except StillhouseError:
        return False
    return m["id"] == aid and m["kind"] == kind


def recover(store: ArtifactStore, kind: str, aid: str) -> list[str]:
    """Settle a killed run's leftovers of one artifact (call under its lock); returns what was done."""
    done: list[str] = []
    final = store.path_for(kind, aid)
    resumable = store.partial_path(kind, aid)
    orphans = sorted((store.root / kind).glob(f".{aid}.*.partial"))
    for work in [resumable, *orphans]:
        if not work.is_dir():
            continue
        if not (final / MANIFEST).is_file() and _complete(work, kind, aid):
            if final.exists():  # an unreadable leftover in the final place
                shutil.rmtree(final)
            os.replace(work, final)
            done.append(f"accepted the finished work in {work.name}")
        elif work != resumable:
            shutil.rmtree(work, ignore_errors=True)
            done.append(f"removed the orphaned work directory {work.name}")
    if (final / MANIFEST).is_file():
        done += tidy(store, kind, aid)
    return done


def tidy(store: ArtifactStore, kind: str, aid: str) -> list[str]:
    """Remove an artifact's spent scratch once the artifact is in place (safe to repeat)."""
    done = []
    final = store.path_for(kind, aid)
    for name in SPENT_SCRATCH:
        if (final / name).is_dir():
            crash_point("after-rename")
            discard_units(final / name)
            done.append(f"removed spent {name}/")
    ckpts = store.root / "checkpoints"
    for d in ckpts.glob(f"*-{aid}") if ckpts.is_dir() else []:
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"removed spent checkpoints {d.name}")
    return done


def discard_units(shard_dir: Path) -> None:
    """Remove a unit-shard directory markers first, so no kill leaves a marker without its shard."""
    for marker in sorted(shard_dir.glob("unit-*.json")):
        marker.unlink(missing_ok=True)
    crash_point("mid-tidy")
    shutil.rmtree(shard_dir, ignore_errors=True)


def discard(store: ArtifactStore, kind: str, aid: str) -> None:
    """`--force`: drop the unfinished work of an artifact (call under its lock)."""
    for work in [store.partial_path(kind, aid), *(store.root / kind).glob(f".{aid}.*.partial")]:
        if (work / "shards").is_dir():
            discard_units(work / "shards")
        shutil.rmtree(work, ignore_errors=True)


def check_workspace(root: Path) -> None:
    """A workspace must be a writable directory: one line saying what is wrong, before any work."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise StillhouseError(f"workspace {root} is not a directory; pass another --workspace")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StillhouseError(f"cannot create workspace {root}: {e.strerror}; pass another --workspace") from None
    try:  # a real write: permissions alone do not show a read-only mount (or bind root's rights)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StillhouseError(f"workspace {root} is not writable ({e.strerror}); pass another --workspace or fix its permissions") from None


def write_error(e: OSError, stage: str, kind: str, aid: str, store: ArtifactStore) -> StillhouseError | None:
    """An OSError of the file system (full, quota, read-only, permissions) as one line, or None."""
    if e.errno in DISK_FULL:
        return disk_full_error(e, stage, kind, aid, store)
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StillhouseError(f"stage '{stage}': cannot write {e.filename or store.root} ({e.strerror}); "
                               f"finished artifacts in {store.root} are intact. Make the workspace writable and run again")
    return None


def disk_full_error(e: OSError, stage: str, kind: str, aid: str, store: ArtifactStore) -> StillhouseError:
    """ENOSPC/EDQUOT as one line saying what was kept and how to continue."""
    what = "disk quota exceeded" if e.errno == errno.EDQUOT else "no space left on device"
    kept = sum(1 for k in ("dataset", "model", "logit_cache", "eval", "report") for d in (store.root / k).glob("*")
               if (d / MANIFEST).is_file())
    partial = store.partial_path(kind, aid)
    work = f"; the unfinished work of stage '{stage}' is kept in {partial}" if partial.is_dir() else ""
    err = StillhouseError(f"stage '{stage}': {what} while writing {e.filename or kind + '/' + aid}; "
                          f"{kept} finished artifacts in {store.root} are intact{work}. Free space and run the same command to continue")
    err.resumable = True
    return err
