"""The quickstart's student and teacher on the VALIDATION split: the figure settings are chosen on.

    .venv/bin/python bench/quickstart_validation.py WORKSPACE [--preset quickstart] [--models teacher,distilled]

Runs the built-in recipe's data and training stages (reused from WORKSPACE when a
`bench/quickstart.py --workspace WORKSPACE` run already made them: same stages, same
artifacts) and, in place of its test-split evaluation, one eval stage `on_validation` on the
tasks stage's validation split; then prints the figures as bench/quickstart_figures.py does.
The recipe is derived from the built-in one rather than copied, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from stillhouse.api import run_recipe
from stillhouse.recipe import builtin_recipe


def validation_recipe(preset: str, models: list[str]) -> dict:
    """The preset without its measuring stages, plus an eval of `models` on the validation split."""
    d = yaml.safe_load(builtin_recipe(preset).read_text())
    stages = d["stages"]
    test_eval = next(s for s in stages.values() if s["type"] == "eval")
    d["stages"] = {n: s for n, s in stages.items() if s["type"] not in ("eval", "report")}
    d["stages"]["on_validation"] = {
        "type": "eval", "tasks": test_eval["tasks"], "split": "validation", "teacher": test_eval["teacher"],
        "models": {m: test_eval["models"][m] for m in models}, "max_new_tokens": test_eval.get("max_new_tokens", 32),
        "memory": False,  # accuracy only: speed and memory are the test evaluation's
    }
    d["name"] = f"{d['name']}-validation"
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--models", default="teacher,distilled", help="labels of the preset's eval stage to measure")
    args = ap.parse_args()
    recipe = validation_recipe(args.preset, args.models.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{recipe['name']}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        run_recipe(path, args.workspace)
    sys.path.insert(0, str(Path(__file__).parent))
    from quickstart_figures import print_figures

    print_figures(args.workspace, student="distilled", eval_stage="on_validation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
