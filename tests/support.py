"""Helpers shared by test modules (not a test file: pytest collects only test_*.py)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest
import torch


@contextlib.contextmanager
def one_thread():
    """One intra-op thread for tiny-model work (on a busy 2-core machine, two OpenMP threads
    make tiny ops 10-50x slower); the previous count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def module_env(root: Path, threads: bool = True):
    """For module-scoped fixtures, which are set up before conftest's per-test isolation: a
    stillhouse cache under `root`, no progress output and (by default) one torch thread.
    Yields the MonkeyPatch, for more variables."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STILLHOUSE_CACHE", str(root / "cache"))
        mp.setenv("STILLHOUSE_QUIET", "1")
        with one_thread() if threads else contextlib.nullcontext():
            yield mp


def free_port() -> int:
    """A loopback port nothing listens on (free when checked; the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SRC = Path(__file__).resolve().parents[1] / "src"


def subprocess_env(**extra: str) -> dict:
    """The environment for a stillhouse run in another process: this checkout's sources, one
    OpenMP thread per process, no progress output; `extra` variables on top."""
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "STILLHOUSE_QUIET": "1", **extra}
