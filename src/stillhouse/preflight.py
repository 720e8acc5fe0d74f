"""Checks of a recipe's outside inputs that need no model: run by `validate`, and by `run`
before any model loads, so a missing config.json or an empty prompt file is one line at once,
not a traceback after minutes of loading."""

from __future__ import annotations

from pathlib import Path

from .errors import StillhouseError
from .recipe import Recipe
from .stages import MODEL
from .fsutil import expand_user


def _model_spec(recipe: Recipe, ref: str) -> str | None:
    """The spec a model reference names, or None when it is no local path (a stage, an API, a built-in)."""
    if ref in recipe.stages:
        return None
    decl = recipe.teachers.get(ref)
    if decl is not None:
        return None if decl.backend == "openai" else decl.model
    return recipe.models.get(ref, ref)


def check_model_path(spec: str, where: str) -> None:
    """A local model spec points at a model directory (config.json and safetensors weights) or a .gguf file."""
    path = expand_user(spec)
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or path.exists()
    if not looks_local:
        return  # a built-in name or a hub id: models.resolve says what is wrong with it
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise StillhouseError(f"{where}: GGUF file not found: {spec}")
        return
    if not path.is_dir():
        raise StillhouseError(f"{where}: model directory not found: {spec}")
    if not (path / "config.json").is_file():
        raise StillhouseError(f"{where}: model directory {spec} has no config.json (not a Hugging Face model directory)")
    if not any(path.glob("*.safetensors")):
        raise StillhouseError(f"{where}: model directory {spec} has no .safetensors weights")


def check_prompt_file(path: Path, where: str) -> None:
    """A prompt or evaluation file exists and holds at least one record."""
    if not path.is_file():
        raise StillhouseError(f"{where}: file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_metadata(path).num_rows
        except Exception as e:  # not Parquet at all
            raise StillhouseError(f"{where}: {path} is not a readable Parquet file ({type(e).__name__})") from None
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise StillhouseError(f"{where}: {path} is not UTF-8 text") from None
        rows = sum(1 for line in text.splitlines() if line.strip())
    if rows == 0:
        raise StillhouseError(f"{where}: {path} is empty (no records)")


def check_inputs(recipe: Recipe) -> None:
    for name, stage in recipe.stages.items():
        for r in recipe.refs(name):
            if r.ref.expects == MODEL and (spec := _model_spec(recipe, r.target)) is not None:
                check_model_path(spec, f"stages.{name}.{r.field}")
        for path in getattr(stage, "external_files", lambda: [])():
            check_prompt_file(Path(path), f"stages.{name}")
