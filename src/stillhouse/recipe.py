"""Recipes: YAML validated by pydantic into a DAG of typed stages.

A recipe names its models (`models:`) and its stages (`stages:`); each stage has a `type`
and fields of its own. Fields that refer to other things hold names: a model field names an
entry of `models:` or a stage that produces a model; a data field names a stage. Unknown
keys, wrong types, unknown stage types, models, tasks or references are rejected with one
line that names the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NamedTuple, Union

import yaml
from pydantic import Field, ValidationError

from .errors import StillhouseError
from .lineage.policy import Policy
from .stages import MODEL, STAGES, Ref, StageType
from .strict import Strict
from .teachers.config import BACKENDS, TeacherConfig
from .fsutil import expand_user

# One config class per registered stage type, told apart by `type`.
Stage = Annotated[Union[tuple(entry.config for entry in STAGES.values())], Field(discriminator="type")]


class Reference(NamedTuple):
    field: str  # as an error names it: `teacher`, `datasets[1]`, `models.student`
    target: str  # the name it holds: a stage, a models:/teachers: entry or a model spec
    ref: Ref  # what the stage type declares about the field (stages.py)


class Recipe(Strict):
    name: str
    description: str = ""
    models: dict[str, str] = {}
    teachers: dict[str, TeacherConfig] = {}  # named teacher backends a stage's `teacher:` may name
    stages: dict[str, Stage]
    policy: Policy | None = None  # licence/terms policy, checked before any compute (lineage/policy.py)

    def stage_type(self, name: str) -> StageType:
        """What the registry declares about one stage's type (stages.py)."""
        return STAGES[self.stages[name].type]

    def refs(self, name: str) -> list[Reference]:
        """What one stage names, in the order its stage type declares its references."""
        st = self.stages[name]
        out = []
        for ref in STAGES[st.type].refs:
            value = getattr(st, ref.field)
            if isinstance(value, dict):
                named = [(f"{ref.field}.{k}", v) for k, v in value.items()]
            elif isinstance(value, list):
                named = [(f"{ref.field}[{i}]", v) for i, v in enumerate(value)]
            else:
                named = [] if value is None else [(ref.field, value)]
            out += [Reference(f, v, ref) for f, v in named if ref.pick is None or ref.pick(v)]
        return out

    def stage_deps(self, name: str) -> list[str]:
        return [ref for _, ref, _ in self.refs(name) if ref in self.stages]

    def order(self) -> list[str]:
        """Stages in dependency order (stable: recipe order among independent stages)."""
        done: list[str] = []
        visiting: set[str] = set()

        def visit(n: str, path: list[str]):
            if n in done:
                return
            if n in visiting:
                raise StillhouseError(f"recipe has a cycle: {' -> '.join(path + [n])}")
            visiting.add(n)
            for d in self.stage_deps(n):
                visit(d, path + [n])
            visiting.discard(n)
            done.append(n)

        for n in self.stages:
            visit(n, [])
        return done


def _check_refs(recipe: Recipe) -> None:
    from . import model_catalog

    for name, spec in recipe.models.items():
        if name in recipe.stages:
            raise ValueError(f"models.{name}: name is also a stage")
        _check_model_spec(spec, f"models.{name}", model_catalog)
    _check_teachers(recipe, model_catalog)
    for sname in recipe.stages:
        for field, target, ref in recipe.refs(sname):
            key = f"stages.{sname}.{field}"
            if target in recipe.stages:
                made = recipe.stages[target].type
                if STAGES[made].kind != ref.expects:
                    raise ValueError(f"{key}: stage '{target}' produces a {STAGES[made].kind}, not a {ref.expects}")
                if ref.types and made not in ref.types and target != sname:
                    raise ValueError(f"{key}: stage '{target}' is not a {' or '.join(ref.types)} stage")
            elif ref.expects == MODEL and target in recipe.models:
                continue
            elif ref.expects == MODEL and target in recipe.teachers:
                _check_teacher_use(recipe, ref, target, key)
            elif ref.expects == MODEL:
                _check_model_spec(target, key, model_catalog)
            else:
                raise ValueError(f"{key}: unknown stage '{target}'")


def _check_teachers(recipe: Recipe, model_specs) -> None:
    for name, t in recipe.teachers.items():
        if name in recipe.stages or name in recipe.models:
            raise ValueError(f"teachers.{name}: name is also a {'stage' if name in recipe.stages else 'model'}")
        for fld in ("model", "tokenizer"):
            spec = getattr(t, fld, None)
            if spec and (t.backend != "openai" or fld == "tokenizer"):
                _check_model_spec(spec, f"teachers.{name}.{fld}", model_specs)


def _check_teacher_use(recipe: Recipe, ref: Ref, target: str, key: str) -> None:
    backend = recipe.teachers[target].backend
    if ref.role == "model" and backend != "hf":
        raise ValueError(f"{key}: '{target}' is a {backend} teacher, not a model")
    if ref.role == "logits" and backend != "hf":
        raise ValueError(f"{key}: teacher '{target}' ({backend}) only generates text; this stage needs its logits (backend: hf)")


def _check_model_spec(spec: str, key: str, model_specs) -> None:
    """Cheap validation of a model spec (no loading): built-in, existing path, or hub id."""
    import re

    p = expand_user(spec)
    if spec in model_specs.BUILTINS:
        return
    if p.suffix == ".gguf" or spec.startswith((".", "/", "~")):
        if not p.exists():
            raise ValueError(f"{key}: model path not found: {spec}")
        return
    if p.exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return
    raise ValueError(f"{key}: unknown model '{spec}' (built-ins: {', '.join(model_specs.BUILTINS)})")


def _format_validation_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    # pydantic puts the discriminator value in the path of union members; keep it readable
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "union_tag_invalid":
        msg = f"unknown stage type {err.get('input', {}).get('type')!r}" if isinstance(err.get("input"), dict) else msg
    elif err["type"] == "union_tag_not_found":
        msg = "stage needs a 'type'"
    parts = [str(x) for x in err["loc"]]
    if parts[:1] == ["teachers"]:
        if err["type"] == "union_tag_invalid":
            msg = f"unknown backend (known: {', '.join(BACKENDS)})"
        elif err["type"] == "union_tag_not_found":
            msg = f"teacher needs a 'backend' ({', '.join(BACKENDS)})"
        if len(parts) >= 3 and parts[2] in BACKENDS:
            parts.pop(2)
        loc = ".".join(parts)
    if len(parts) >= 3 and parts[0] == "stages" and parts[2] in STAGES:
        parts.pop(2)  # drop the discriminator tag pydantic inserts
        loc = ".".join(parts)
    return f"{loc}: {msg}"


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise StillhouseError(f"{source}: a recipe must be a YAML mapping")
    try:
        recipe = Recipe.model_validate(data)
        _check_refs(recipe)
        recipe.order()
    except ValidationError as e:
        raise StillhouseError(f"{source}: {_format_validation_error(e)}") from None
    except ValueError as e:
        raise StillhouseError(f"{source}: {e}") from None
    except StillhouseError as e:
        raise StillhouseError(f"{source}: {e}") from None
    if not recipe.stages:
        raise StillhouseError(f"{source}: stages: a recipe needs at least one stage")
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise StillhouseError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise StillhouseError(f"{path}:{where} malformed YAML: {getattr(e, 'problem', e)}") from None
    return parse_recipe(data, str(path))


def builtin_recipe(name: str) -> Path:
    path = Path(__file__).parent / "recipes" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise StillhouseError(f"no built-in recipe '{name}' (built-in: {known})")
    return path
