"""The sandbox escape battery in both modes, as one table; and what a sandboxed run costs.

    sudo .venv/bin/python bench/sandbox_escape.py [--verbose] [--runs 20] [--humaneval] [--against OLD/sandbox.py]

Runs `stillhouse.verify.escape_battery` as root (the root mode: a fresh uid, then bubblewrap)
and as uid 65534 through setpriv (the non-root mode: the launcher's own user namespace, then
bubblewrap), and prints one markdown table, one column per mode (docs/security.md quotes it).
Then times `--runs` trivial programs through `run_python` (median and p90 wall seconds per
run; with `--against`, alternately with another checkout's sandbox and their ratio; the
battery then also runs against that sandbox, two more columns) and, with `--humaneval`, the 164 HumanEval canonical solutions through the code verifier.
Exit status 1 if any attack got through. Needs root (for setpriv); the machine's load shows
in the timings, the table does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from stillhouse.verify.escape_battery import Outcome, format_table, load_sandbox, run_battery, unprivileged_command  # noqa: E402
from stillhouse.verify.sandbox import Limits, run_python  # noqa: E402


def unprivileged_outcomes(against: str | None = None) -> list[Outcome]:
    extra = ["--sandbox", against] if against else []
    reach = [str(SRC)] + ([str(Path(against).resolve().parent)] if against else [])
    cmd = unprivileged_command([sys.executable, "-m", "stillhouse.verify.escape_battery", "--json", *extra], reach=reach)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(SRC), "LANG": "C.UTF-8"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")
    if not r.stdout.strip():
        sys.exit(f"the unprivileged run failed: {r.stderr.strip()[-500:]}")
    return [Outcome(**o) for o in json.loads(r.stdout)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="print each attack's evidence per mode")
    ap.add_argument("--runs", type=int, default=20, help="trivial programs to time (0: skip)")
    ap.add_argument("--humaneval", action="store_true", help="also time the 164 HumanEval canonical solutions")
    ap.add_argument("--against", metavar="SANDBOX_PY", help="another sandbox.py (e.g. main's) timed alternately with this one")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the non-root column is produced through setpriv")
    rows = {"root": run_battery(), "uid 65534 (setpriv)": unprivileged_outcomes()}
    if args.against:  # the same attacks on the other sandbox: what this one changed
        rows["root, against"] = run_battery(runner=load_sandbox(args.against).run_python)
        rows["uid 65534, against"] = unprivileged_outcomes(args.against)
    print(format_table(rows))
    if args.verbose:
        for mode, outcomes in rows.items():
            print(f"\n{mode}:")
            for o in outcomes:
                print(f"  {o.name}: {o.evidence}")
    if args.runs:
        runners = {"this": run_python}
        if args.against:
            runners["against"] = load_sandbox(args.against).run_python
        walls: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.runs):  # alternated, so both see the same load
            for name, run in runners.items():
                t = time.perf_counter()
                assert run("print(1)", limits=Limits(wall_s=30)).passed
                walls[name].append(time.perf_counter() - t)
        for name, w in walls.items():
            print(f"\nrun_python('print(1)') as root ({name}): median {statistics.median(w):.3f} s, "
                  f"p90 {sorted(w)[int(0.9 * (len(w) - 1))]:.3f} s over {len(w)} runs")
        if args.against:
            print(f"this/against median ratio: {statistics.median(walls['this']) / statistics.median(walls['against']):.2f}")
    if args.humaneval:
        from stillhouse.verify.code import CodeVerifier, humaneval_problems

        verify = CodeVerifier(Limits(wall_s=30))
        problems = humaneval_problems()
        t = time.perf_counter()
        passed = sum(verify(p, p["canonical_solution"]).passed for p in problems)
        print(f"HumanEval canonical solutions: {passed}/{len(problems)} pass in {time.perf_counter() - t:.1f} s")
    ours = [rows["root"], rows["uid 65534 (setpriv)"]]
    return 1 if any(o.escaped for outcomes in ours for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
