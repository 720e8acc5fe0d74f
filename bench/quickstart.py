"""Measure the quickstart end to end: wall time, peak RSS, and the student against its teacher.

    .venv/bin/python bench/quickstart.py [--preset quickstart] [--workspace DIR]

Runs `stillhouse quickstart --force` in a fresh workspace as a child process (so the model
conversion cache is reused but no stage is), then prints the figures the README quotes:
wall seconds, peak RSS of the run, and from its eval artifact each model's held-out pass@1,
decode tokens/s at batch 16, and the student/teacher ratios measured in the same run.
Targets (issue 2): <= 900 s wall, <= 6 GB peak RSS, student >= teacher pass@1 at >= 1.8x speed.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--workspace", default=None, help="default: a fresh temporary directory, removed afterwards")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = ap.parse_args()
    ws = Path(args.workspace or tempfile.mkdtemp(prefix="stillhouse-bench-"))
    exe = Path(sys.executable).with_name("stillhouse")
    # Warm the model conversion cache first so the timed run measures the recipe, not a one-off.
    subprocess.run([sys.executable, "-c", "from stillhouse import models; models.resolve('smollm2-135m-instruct')"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), "quickstart", "--preset", args.preset, "--workspace", str(ws), "--force"])
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        print(f"quickstart failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    evals = sorted((ws / "eval").glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    res = json.loads(evals[-1].read_text())
    models = res["models"]
    teacher = models[res["teacher"]]
    print(f"\npreset {args.preset}: wall {wall:.0f} s (target <= 900), peak RSS {peak_kb / 1e6:.2f} GB (target <= 6)")
    print(f"{'model':12} {'layers':>6} {'params':>8} {'pass@1':>7} {'tok/s':>7} {'pass vs T':>9} {'speed vs T':>10} {'KL':>6}")
    for label, m in models.items():
        ratio_p = m["pass_at_1"] / teacher["pass_at_1"] if teacher["pass_at_1"] else float("nan")
        ratio_s = m["decode_tok_per_s"] / teacher["decode_tok_per_s"]
        kl = m.get("kl_to_teacher")
        print(f"{label:12} {m['layers']:>6} {m['params'] / 1e6:>7.1f}M {m['pass_at_1']:>7.3f} {m['decode_tok_per_s']:>7.0f} "
              f"{ratio_p:>9.2f} {ratio_s:>9.2f}x {'' if kl is None else format(kl, '.3f'):>6}")
    if not args.workspace and not args.keep:
        shutil.rmtree(ws, ignore_errors=True)
    else:
        print(f"workspace: {ws}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
