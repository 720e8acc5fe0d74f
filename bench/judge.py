"""Is a 135M model a usable judge? The `preference` stage with the packaged SmolLM2-135M-Instruct
judging its own candidates, counting the judge answers that carry a parseable score.

    PYTHONPATH=src .venv/bin/python bench/judge.py [--prompts 4] [--candidates 2] [--judge-tokens 96] [--workspace DIR]

Runs a one-stage recipe (`preference` on a fixed prompt file, with
`method: judge`, the default rubric and template) in a fresh workspace, greedy judging, and
prints the judge answers given, how many had no parseable score (`judge_unparsed`), the
prompts left without a pair (`skipped_unparsed`) and the pairs made. When no pair is left the
stage fails by design (one line with the same counts); the script prints that line.
docs/data-engine.md quotes this command's output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a lighthouse.",
    "Give three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Suggest a name for a bakery that sells only bread.",
    "How many legs does a spider have, and why?",
    "Describe a good way to start a short speech.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=2)
    ap.add_argument("--judge-tokens", type=int, default=96)
    ap.add_argument("--workspace", default=None, help="default: a fresh temporary directory")
    args = ap.parse_args()
    if not 1 <= args.prompts <= len(PROMPTS):
        ap.error(f"--prompts: 1..{len(PROMPTS)}")
    os.environ.setdefault("STILLHOUSE_QUIET", "1")
    from stillhouse.api import run_recipe
    from stillhouse.errors import StillhouseError
    from stillhouse.recipe import parse_recipe

    ws = Path(args.workspace or tempfile.mkdtemp(prefix="stillhouse-judge-"))
    prompts = ws / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[: args.prompts]))
    recipe = parse_recipe({
        "name": "judge-check",
        "models": {"teacher": "smollm2-135m-instruct"},
        "stages": {"pairs": {"type": "preference", "teacher": "teacher", "prompts_file": str(prompts),
                             "candidates": args.candidates, "judge_max_new_tokens": args.judge_tokens,
                             "max_new_tokens": 64}},
    }, source="bench/judge.py")
    answers = args.prompts * args.candidates
    print(f"smollm2-135m-instruct judging its own candidates: {args.prompts} prompts x {args.candidates} candidates "
          f"= {answers} judge answers (judge_max_new_tokens {args.judge_tokens})")
    try:
        art = run_recipe(recipe, workspace=ws)["pairs"]
    except StillhouseError as e:
        print(f"stage failed: {e}")
        return 0
    c = art.manifest["counts"]
    print(f"judge answers without a score: {c['judge_unparsed']} of {answers}; prompts without a pair: "
          f"{c['skipped_unparsed']}; pairs: {c.get('records', 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
