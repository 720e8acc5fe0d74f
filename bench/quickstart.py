"""Measure the quickstart end to end: wall time, peak RSS, and the student against its teacher.

    .venv/bin/python bench/quickstart.py [--preset quickstart] [--workspace DIR] [--warm-cache]

Runs `stillhouse quickstart --force` in a fresh workspace as a child process and, by default,
with a fresh model cache (STILLHOUSE_CACHE), so the wall time includes the one-off conversion of
the packaged teacher weights a new user pays. Peak memory is the whole process tree's: the sum of
the RSS of the run and all its descendants, sampled every 0.2 s (a spike shorter than that can be
missed; the largest single process's exact peak from getrusage is printed beside it).
The figures (bench/quickstart_figures.py) come from the run's eval artifact and say which split
they are from; `python bench/quickstart_figures.py WORKSPACE` prints them again for a kept workspace.
Targets (issue 18): student >= 1.3x the teacher's pass@1 on unseen test problems with the paired
95% interval excluding zero, <= half the teacher's layers, >= 1.8x decode tok/s at batch 16,
<= 900 s wall, <= 6 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and all its descendants now (processes that vanish mid-walk count as 0)."""
    total = 0
    try:
        members = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in members:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(cmd: list[str], env: dict, interval: float = 0.2) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak process-tree RSS bytes) of `cmd`."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env)
    proc, peak, done = psutil.Process(child.pid), 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc))
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = child.wait()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    return code, wall, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--workspace", default=None, help="default: a fresh temporary directory, removed afterwards")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    ap.add_argument("--warm-cache", action="store_true", help="reuse the user's model cache (excludes the one-off conversion)")
    args = ap.parse_args()
    ws = Path(args.workspace or tempfile.mkdtemp(prefix="stillhouse-bench-"))
    env = dict(os.environ)
    cache = None
    if not args.warm_cache:
        cache = Path(tempfile.mkdtemp(prefix="stillhouse-cache-"))
        env["STILLHOUSE_CACHE"] = str(cache)
    exe = Path(sys.executable).with_name("stillhouse")
    code, wall, peak = run_measured([str(exe), "quickstart", "--preset", args.preset, "--workspace", str(ws), "--force"], env)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the whole (waited-for) process tree
    biggest = usage.ru_maxrss * 1024  # Linux reports KiB
    # CPU seconds are what a loaded machine does not inflate much (wall time is shared with others)
    cpu = usage.ru_utime + usage.ru_stime
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    if code != 0:
        print(f"quickstart failed with exit code {code}", file=sys.stderr)
        return code
    run = {"preset": args.preset, "wall_s": wall, "cpu_s": cpu, "peak_tree_rss_bytes": peak, "peak_single_rss_bytes": biggest,
           "includes_conversion": not args.warm_cache, "load_1min_at_end": os.getloadavg()[0], "cpus": os.cpu_count()}
    (ws / "bench-quickstart.json").write_text(json.dumps(run, indent=2))

    sys.path.insert(0, str(Path(__file__).parent))
    from quickstart_figures import print_figures

    print_figures(ws, run)
    if not args.workspace and not args.keep:
        shutil.rmtree(ws, ignore_errors=True)
    else:
        print(f"workspace: {ws}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
