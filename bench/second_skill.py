"""The second skill (issue 18, "Also show") and the HumanEval figure, each with its command.

    .venv/bin/python bench/second_skill.py screen    [--workspace DIR] [--size 50]
    .venv/bin/python bench/second_skill.py run       [--workspace DIR] [--recipe recipes/chain_sum.yaml]
    .venv/bin/python bench/second_skill.py humaneval [--workspace DIR] [--size 164]

screen     the teacher's (SmolLM2-135M-Instruct) greedy pass@1 on SIZE problems of each candidate
           task: how the second skill was picked (teacher neither ~0 nor ~1, a question space large
           enough for three disjoint splits).
run        `stillhouse run RECIPE` in a workspace (wall time and the largest process's peak RSS),
           then the teacher-vs-student tables of the recipe's eval stages, each naming its split:
           validation (where settings are chosen) and test (reported only).
humaneval  `stillhouse eval smollm2-135m-instruct --suite humaneval,size=SIZE`: the teacher's
           greedy pass@1 on HumanEval (256 new tokens, programs run in the sandbox) with its 95%
           bootstrap interval and the problems it solves: the figure docs/evaluation.md quotes.

Every figure is read back from the eval artifacts (results.json, outputs.parquet); rerunning in
the same workspace reuses them, so printing again is free.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEACHER = "smollm2-135m-instruct"

# Candidate second skills: reasoning-gym tasks with configs small enough for a 135M model to get
# some right and a question space far larger than the three splits together.
CANDIDATES = [
    "rg:gcd,max_value=50",
    "rg:lcm,max_value=20",
    "rg:products,max_digits=2",
    "rg:leg_counting,min_animals=1,max_animals=2,max_instances=3",
    "rg:number_sorting,min_numbers=3,max_numbers=4,max_decimals=0,min_value=0,max_value=99,max_new_tokens=48",
]


def stillhouse(*args: str) -> tuple[int, float]:
    """Run the CLI in a child process: (exit code, wall seconds)."""
    exe = Path(sys.executable).with_name("stillhouse")
    t0 = time.perf_counter()
    code = subprocess.call([str(exe), *args])
    return code, time.perf_counter() - t0


def newest(ws: Path, kind: str, **match) -> Path:
    """The newest artifact of `kind` whose manifest matches `match`."""
    found = [m.parent for m in (ws / kind).glob("*/manifest.json")
             if all(json.loads(m.read_text()).get(k) == v for k, v in match.items())]
    if not found:
        raise SystemExit(f"{ws}: no {kind} artifact {match or ''}")
    return max(found, key=lambda p: p.stat().st_mtime)


def results(ev: Path) -> dict:
    return json.loads((ev / "results.json").read_text())


def print_eval(ev: Path, title: str) -> None:
    """One eval artifact as a table: pass@1 [95% CI], the paired difference to the teacher, decode speed."""
    res = results(ev)
    models = res["models"]
    teacher = models[res["teacher"]]
    n = teacher["n_problems"]
    print(f"\n{title}: {res.get('split', '?')} split, {n} problems ({ev.name})")
    print(f"{'model':10} {'layers':>6} {'pass@1':>7} {'95% CI':>16} {'student - teacher [paired 95%]':>31} {'tok/s b16':>9} {'vs T':>6}")
    for label, m in models.items():
        lo, hi = m["pass_at_1_ci"]
        diff = m.get("pass_at_1_diff_ci")
        d = f"{m['pass_at_1'] - teacher['pass_at_1']:+.3f} [{diff[0]:+.3f}, {diff[1]:+.3f}]" if diff else "-"
        speed = m["decode_tok_per_s"] / teacher["decode_tok_per_s"]
        print(f"{label:10} {m['layers']:>6} {m['pass_at_1']:>7.3f} {f'[{lo:.3f}, {hi:.3f}]':>16} {d:>31} "
              f"{m['decode_tok_per_s']:>9.1f} {speed:>5.2f}x")


def cmd_screen(args) -> int:
    suites = [f"{c},size={args.size}" for c in CANDIDATES]
    code, wall = stillhouse("eval", TEACHER, "--no-memory", "-w", str(args.workspace), *sum((["-s", s] for s in suites), []))
    if code:
        return code
    res = results(newest(args.workspace, "eval"))
    teacher = next(iter(res["models"].values()))  # the one model evaluated (a single-model eval names no teacher)
    print(f"\nteacher {TEACHER}, greedy pass@1 on {args.size} problems per task (seed 1000000), {wall:.0f} s, "
          f"1-min load {os.getloadavg()[0]:.1f}:")
    for name, s in teacher["suites"].items():
        print(f"  {name:16} {s['pass_at_1']:.3f} [{s['pass_at_1_ci'][0]:.3f}, {s['pass_at_1_ci'][1]:.3f}]  n={s['n']}")
    return 0


def cmd_run(args) -> int:
    code, wall = stillhouse("run", str(args.recipe), "-w", str(args.workspace))
    if code:
        return code
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    print(f"\n{args.recipe}: wall {wall:.0f} s (a rerun reuses finished stages), largest process peak RSS {peak / 1e9:.2f} GB, "
          f"1-min load at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    tasks = newest(args.workspace, "dataset", stage="tasks")
    counts = json.loads((tasks / "manifest.json").read_text()).get("counts", {})
    print(f"splits (disjoint by question text): {json.dumps(counts)}")
    for stage, title in (("on_validation", "validation (settings chosen here)"), ("evaluation", "test (reported)")):
        try:
            print_eval(newest(args.workspace, "eval", name=stage), title)
        except SystemExit as e:
            print(f"\n{title}: {e}")
    return 0


def cmd_humaneval(args) -> int:
    from stillhouse.records import read_rows

    code, wall = stillhouse("eval", TEACHER, "--no-memory", "-w", str(args.workspace), "-s", f"humaneval,size={args.size}")
    if code:
        return code
    ev = newest(args.workspace, "eval")
    m = next(iter(results(ev)["models"].values()))  # the one model evaluated
    solved = sorted((r["id"] for r in read_rows(ev / "outputs.parquet") if r["passed"]), key=lambda i: int(i.rsplit("/", 1)[-1]))
    lo, hi = m["pass_at_1_ci"]
    print(f"\nHumanEval, {TEACHER}, greedy, 256 new tokens, {m['n_problems']} problems: pass@1 {m['pass_at_1']:.3f} "
          f"[{lo:.3f}, {hi:.3f}], {len(solved)} solved: {', '.join(solved)}")
    print(f"wall {wall:.0f} s (a rerun in the same workspace reuses the evaluation), 1-min load {os.getloadavg()[0]:.1f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, fn in (("screen", cmd_screen), ("run", cmd_run), ("humaneval", cmd_humaneval)):
        p = sub.add_parser(name)
        p.add_argument("--workspace", type=Path, default=Path(f"runs-second-skill-{name}"))
        p.set_defaults(fn=fn)
        if name == "screen":
            p.add_argument("--size", type=int, default=50)
        if name == "run":
            p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "chain_sum.yaml")
        if name == "humaneval":
            p.add_argument("--size", type=int, default=164)
    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
