"""The Python API the CLI wraps."""

from __future__ import annotations

from pathlib import Path

from .artifacts import Artifact
from .recipe import Recipe, load_recipe
from .runner import Runner


def run_recipe(
    recipe: str | Path | Recipe, workspace: str | Path = "stillhouse-runs", force: bool = False, resume: bool = False
) -> dict[str, Artifact]:
    """Validate and run a recipe; returns stage name -> artifact, in execution order.

    `resume`: train stages continue from their latest checkpoint (see docs/training.md)."""
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return Runner(r, Path(workspace), force=force, resume=resume).run()
