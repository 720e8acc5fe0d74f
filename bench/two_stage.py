"""The two-stage lineage example of docs/lineage.md, produced from the artifacts of one run.

    PYTHONPATH=src .venv/bin/python bench/two_stage.py [--workspace DIR] [--picture docs/lineage-two-stage.png]

Runs the built-in `two_stage` recipe as a child process (wall time and peak RSS measured with
the GGUF teachers already converted, so the figures are the recipe's, not a one-off
conversion), then prints, from student2's artifacts, everything the doc quotes: the teacher
shares as a table, `stillhouse lineage` (tree), `--from gemma3-270m`, and the card's
`distillation:` block, and redraws the picture. Doc, card and picture therefore come from the
same artifact.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default=None, help="default: a fresh temporary directory")
    ap.add_argument("--picture", default=None, help="also write the lineage picture here")
    args = ap.parse_args()
    os.environ.setdefault("STILLHOUSE_QUIET", "1")
    ws = Path(args.workspace or tempfile.mkdtemp(prefix="stillhouse-two-stage-"))
    exe = Path(sys.executable).with_name("stillhouse")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "stillhouse.cli"]
    subprocess.run([sys.executable, "-c", "from stillhouse import models\nfor s in ('gemma3-270m', 'smollm2-135m-instruct'): "
                    "models.resolve(s)"], check=True)
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cli + ["quickstart", "--preset", "two_stage", "-w", str(ws)], check=True)
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"two_stage: {wall:.0f} s wall, {c1.ru_utime - c0.ru_utime:.0f} s user CPU, peak RSS {c1.ru_maxrss / 1e6:.1f} GB "
          f"(load average {os.getloadavg()[0]:.1f}; workspace {ws})\n")

    from stillhouse.artifacts import ArtifactStore
    from stillhouse.cli import main as cli_main
    from stillhouse.lineage import card_for, load_lineage
    from stillhouse.lineage.cards import distillation_block

    store = ArtifactStore(ws)
    sid = next(m.parent.name for m in (ws / "model").glob("*/manifest.json") if json.loads(m.read_text()).get("name") == "student2")
    lin = load_lineage(store, sid)
    block = distillation_block(lin)
    print("| original teacher | terms | share of student2's training signal | path |\n|---|---|---:|---|")
    for t in block["teachers"]:
        print(f"| {t['spec']} | {t['terms']} | {100 * t['share']:.1f}% | {' -> '.join(t['via'][0]) if t['via'] else '-'} |")
    print(f"\nsignal tokens: {block['signal_tokens']}; stages: {block['stages']}\n")
    for extra in ([], ["--from", "gemma3-270m"]):
        buf = io.StringIO()
        with redirect_stdout(buf):
            try:
                cli_main(["lineage", sid, "-w", str(ws), *extra])
            except SystemExit:
                pass
        print(f"$ stillhouse lineage {sid} " + " ".join(extra) + "\n" + buf.getvalue())
    card = card_for(store, lin.root)
    head = card.split("---")[1]
    print("card (YAML head):\n" + head)
    if args.picture:
        with redirect_stdout(io.StringIO()):
            cli_main(["lineage", sid, "-w", str(ws), "--graph", args.picture])
        print(f"wrote {args.picture}")
    print(json.dumps({"wall_s": wall, "shares": {t["spec"]: t["share"] for t in block["teachers"]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
