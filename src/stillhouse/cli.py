"""The `stillhouse` command: a thin typer wrapper over the Python API.

Every user error (StillhouseError) is printed as one line naming the culprit, exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import StillhouseError

app = typer.Typer(
    name="stillhouse",
    help="Distil a teacher LLM into a smaller student: data engine, KD training, pruning, evaluation, lineage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_WORKSPACE = Path("stillhouse-runs")
WorkspaceOpt = typer.Option(DEFAULT_WORKSPACE, "--workspace", "-w", help="Where artifacts are stored.")


def _run_recipe(path: Path, workspace: Path, force: bool, resume: bool = False) -> None:
    from .api import run_recipe

    results = run_recipe(path, workspace, force=force, resume=resume)
    last = list(results.values())[-1]
    from .progress import console

    console.print(f"\nDone. Final artifact: {last.path}")
    report = last.path / "report.md"
    if report.exists():
        console.print(f"Report: {report}")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    workspace: Path = WorkspaceOpt,
    force: bool = typer.Option(False, "--force", help="Recompute every stage even if its artifact exists."),
    resume: bool = typer.Option(False, "--resume", help="Train stages continue from their latest checkpoint (checkpoint_every)."),
):
    """Run a recipe: each stage writes an artifact; existing artifacts are reused."""
    _run_recipe(recipe, workspace, force, resume)


@app.command()
def quickstart(
    workspace: Path = WorkspaceOpt,
    force: bool = typer.Option(False, "--force", help="Recompute every stage."),
    preset: str = typer.Option("quickstart", help="Built-in recipe: quickstart (about 15 min on 2 CPU cores) or quickstart_long."),
):
    """Run the built-in quickstart: SmolLM2-135M -> verified traces -> pruned student -> KD -> eval -> report."""
    from .recipe import builtin_recipe

    _run_recipe(builtin_recipe(preset), workspace, force)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML file.")):
    """Check a recipe without running it."""
    from .recipe import load_recipe

    r = load_recipe(recipe)
    typer.echo(f"{recipe}: ok ({len(r.stages)} stages: {' -> '.join(r.order())})")


@app.command()
def show(
    artifact: str = typer.Argument(..., help="Artifact directory, id or id prefix."),
    workspace: Path = WorkspaceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the raw manifest."),
):
    """Print an artifact's manifest readably."""
    from .artifacts import ArtifactStore
    from .show import render_manifest

    art = ArtifactStore(workspace).find(artifact)
    if as_json:
        typer.echo(json.dumps(art.manifest, indent=2))
    else:
        render_manifest(art)


@app.command("models")
def list_models():
    """List the built-in model names and their licences."""
    from .models import BUILTINS

    for b in BUILTINS.values():
        typer.echo(f"{b.name:24} {b.license:20} {b.description} (package {b.package})")


def main(argv: Optional[list[str]] = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except StillhouseError as e:
        print(f"stillhouse: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("stillhouse: interrupted; finished artifacts are kept, rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive here in standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
