"""The two-stage lineage example of docs/lineage.md, produced from the artifacts of one run.

    PYTHONPATH=src .venv/bin/python bench/two_stage.py [--workspace DIR] [--picture docs/lineage-two-stage.png] \
        [--write-doc docs/lineage.md]
    PYTHONPATH=src .venv/bin/python bench/two_stage.py --workspace DIR --no-run --write-doc docs/lineage.md

Runs the built-in `two_stage` recipe as a child process (wall time and peak RSS measured with
the GGUF teachers already converted, so the figures are the recipe's, not a one-off
conversion), then prints, from student2's artifacts, everything the doc quotes: the teacher
shares as a table, `stillhouse lineage` (tree), `--from`, the Gemma part of `--terms` and the
card's `distillation:` block, and redraws the picture. `--write-doc` puts those blocks into the
doc between its `<!-- two_stage:NAME -->` markers; `--no-run` takes them from an existing
workspace's artifacts instead of running the recipe. Doc, card and picture therefore come from
the same artifact (tests/test_docs_lineage.py checks the doc against the manifests of the run
it quotes, kept in tests/data/two_stage_lineage/).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

BLOCKS = ("shares", "tree", "from", "terms", "card")
WIDTH = "80"  # rich wraps the tree at the terminal width: fixed, so the doc's block is reproducible


def _cli(args: list[str]) -> str:
    """What `stillhouse ARGS` prints, at a fixed width."""
    from stillhouse.cli import main as cli_main

    buf, width = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        with redirect_stdout(buf):
            try:
                cli_main(args)
            except SystemExit:
                pass
    finally:
        os.environ.pop("COLUMNS") if width is None else os.environ.__setitem__("COLUMNS", width)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())


def student_id(ws: Path, name: str = "student2") -> str:
    """The newest model artifact of the workspace made by stage `name`."""
    found = [(json.loads(m.read_text()).get("created_at", ""), m.parent.name) for m in (ws / "model").glob("*/manifest.json")
             if json.loads(m.read_text()).get("name") == name]
    if not found:
        raise SystemExit(f"no '{name}' model in {ws}")
    return max(found)[1]


def doc_blocks(ws: Path, sid: str) -> dict[str, str]:
    """The doc's generated blocks (markdown), each from student2's artifacts through the library."""
    import yaml

    from stillhouse.artifacts import ArtifactStore
    from stillhouse.lineage import card_for, load_lineage
    from stillhouse.lineage.cards import distillation_block

    store = ArtifactStore(ws)
    block = distillation_block(load_lineage(store, sid))
    rows = [f"| {t['spec']} | {t['terms']} | {100 * t['share']:.1f}% | {' -> '.join(t['via'][0]) if t['via'] else '-'} |"
            for t in block["teachers"]]
    shares = "\n".join(["| original teacher | terms | share of student2's training signal | path |", "|---|---|---:|---|", *rows])
    lineage = ["lineage", sid, "-w", str(ws)]
    terms, keep = [], True
    for line in _cli(lineage + ["--terms"]).splitlines():
        if line.startswith("- "):
            keep = line.startswith("- gemma-terms-of-use")
        if keep:
            terms.append(line)
    head = yaml.safe_load(card_for(store, sid).split("---")[1])
    card = {k: head[k] for k in ("license", "license_name", "base_model") if k in head}
    d = head["distillation"]
    card["distillation"] = {
        "teachers": [{k: t[k] for k in ("spec", "weights_sha256", "share", "terms", "via") if t.get(k) is not None}
                     for t in d["teachers"]],
        **{k: d[k] for k in ("stages", "signal_tokens", "terms")}}
    return {
        "shares": shares,
        "tree": "```\n" + _cli(lineage) + "\n```",
        "from": "```\n" + _cli(lineage + ["--from", "gemma3-270m"]) + "\n" + _cli(lineage + ["--from", "gpt-4o"]) + "\n```",
        "terms": "```\n" + "\n".join(terms) + "\n```",
        "card": "```yaml\n" + yaml.safe_dump(card, sort_keys=False, width=1000).rstrip() + "\n```",
    }


def blocks_in(doc: str) -> dict[str, str]:
    """The generated blocks currently in the doc, by name."""
    return {m.group(1): m.group(2).strip("\n")
            for m in re.finditer(r"<!-- two_stage:(\w+) -->\n(.*?)<!-- /two_stage:\1 -->", doc, re.S)}


def write_doc(path: Path, blocks: dict[str, str]) -> None:
    from stillhouse.fsutil import write_text_atomic

    doc = path.read_text()
    missing = [b for b in blocks if b not in blocks_in(doc)]
    if missing:
        raise SystemExit(f"{path}: no <!-- two_stage:NAME --> markers for {missing}")
    for name, body in blocks.items():
        doc = re.sub(rf"(<!-- two_stage:{name} -->\n).*?(<!-- /two_stage:{name} -->)",
                     lambda m: m.group(1) + body + "\n" + m.group(2), doc, flags=re.S)
    write_text_atomic(path, doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default=None, help="default: a fresh temporary directory")
    ap.add_argument("--no-run", action="store_true", help="use the workspace's existing artifacts; do not run the recipe")
    ap.add_argument("--picture", default=None, help="also write the lineage picture here")
    ap.add_argument("--write-doc", default=None, help="put the generated blocks into this doc (docs/lineage.md)")
    args = ap.parse_args()
    os.environ.setdefault("STILLHOUSE_QUIET", "1")
    if args.no_run and not args.workspace:
        ap.error("--no-run needs --workspace")
    ws = Path(args.workspace or tempfile.mkdtemp(prefix="stillhouse-two-stage-"))
    wall = None
    if not args.no_run:
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

    sid = student_id(ws)
    blocks = doc_blocks(ws, sid)
    for name in BLOCKS:
        print(f"[{name}]\n{blocks[name]}\n")
    if args.picture:
        _cli(["lineage", sid, "-w", str(ws), "--graph", args.picture])
        print(f"wrote {args.picture}")
    if args.write_doc:
        write_doc(Path(args.write_doc), blocks)
        print(f"wrote the blocks {', '.join(BLOCKS)} into {args.write_doc}")
    from stillhouse.artifacts import ArtifactStore
    from stillhouse.lineage import load_lineage
    from stillhouse.lineage.cards import distillation_block

    shares = {t["spec"]: t["share"] for t in distillation_block(load_lineage(ArtifactStore(ws), sid))["teachers"]}
    print(json.dumps({"student2": sid, "wall_s": wall, "shares": shares}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
