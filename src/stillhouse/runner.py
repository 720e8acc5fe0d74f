"""Runs a recipe: stages in dependency order, each reused if its artifact already exists."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import models as model_specs
from .artifacts import Artifact, ArtifactStore, ArtifactWriter, artifact_id
from .progress import console
from .recipe import STAGE_KIND, Recipe


@dataclass
class StageContext:
    """What a stage function sees: its config, its input artifacts, and where to write."""

    name: str
    config: object  # the stage's pydantic model
    inputs: dict[str, Artifact]  # field name -> artifact, for fields that name a stage
    out: ArtifactWriter
    runner: "Runner"
    recipe_name: str
    _teachers: list = field(default_factory=list)

    def model(self, ref: str) -> model_specs.LoadedModel:
        return self.runner.load_model(ref)

    def identity(self, ref: str) -> model_specs.ModelIdentity:
        return self.runner.identity(ref)

    def teacher(self, ref: str, **overrides):
        """A Teacher for a model reference or a `teachers:` entry; its usage lands in the manifest."""
        t = self.runner.teacher(ref, **overrides)
        self._teachers.append((ref, t))
        return t

    def record_teacher_usage(self) -> None:
        """Token and cost accounting of the API teachers this stage used, under metrics.teacher_usage."""
        usage = {ref: t.usage_metrics() for ref, t in self._teachers if hasattr(t, "usage_metrics")}
        if usage:
            self.out.metrics.setdefault("teacher_usage", {}).update(usage)


def _stage_functions() -> dict[str, Callable[[StageContext], None]]:
    # Imported lazily so `stillhouse show` and recipe validation never import torch.
    from .data.stages import run_rejection, run_tasks
    from .eval.stages import run_eval
    from .eval.report import run_report
    from .train.stages import run_prune, run_train
    from .data.imports import run_import, run_mix

    return {
        "tasks": run_tasks,
        "rejection": run_rejection,
        "prune": run_prune,
        "train": run_train,
        "eval": run_eval,
        "report": run_report,
        "import": run_import,
        "mix": run_mix,
    }


@dataclass
class Runner:
    recipe: Recipe
    workspace: Path
    force: bool = False
    results: dict[str, Artifact] = field(default_factory=dict)
    _loaded: dict[str, model_specs.LoadedModel] = field(default_factory=dict)
    _identities: dict[str, model_specs.ModelIdentity] = field(default_factory=dict)

    def __post_init__(self):
        self.store = ArtifactStore(self.workspace)

    # -- models -------------------------------------------------------------------------
    def spec_of(self, ref: str) -> str:
        """A reference (stage name, models: key or raw spec) as a loadable spec."""
        if ref in self.results:
            return str(self.results[ref].path)
        decl = self.recipe.teachers.get(ref)
        if decl is not None and decl.backend != "openai":
            return decl.model
        return self.recipe.models.get(ref, ref)

    def identity(self, ref: str) -> model_specs.ModelIdentity:
        decl = self.recipe.teachers.get(ref)
        if decl is not None and decl.backend == "openai":
            from .teachers.factory import api_identity

            return api_identity(decl)
        spec = self.spec_of(ref)
        if spec not in self._identities:
            if spec in self._loaded:
                self._identities[spec] = self._loaded[spec].identity
            else:
                self._identities[spec] = model_specs.resolve(spec)[1]
        return self._identities[spec]

    def load_model(self, ref: str) -> model_specs.LoadedModel:
        spec = self.spec_of(ref)
        if spec not in self._loaded:
            from .progress import status

            with status(f"Loading model {ref}"):
                self._loaded[spec] = model_specs.load(spec)
            self._identities[spec] = self._loaded[spec].identity
        return self._loaded[spec]

    def teacher(self, ref: str, **overrides):
        """A teacher object for a reference: a `teachers:` entry, or any model reference (HF)."""
        from .teachers.factory import make_teacher

        decl = self.recipe.teachers.get(ref)
        if decl is None:
            return make_teacher(self.spec_of(ref), loader=self.load_model, **overrides)
        return make_teacher(decl, loader=self.load_model, **overrides)

    # -- stages -------------------------------------------------------------------------
    def _key(self, name: str) -> tuple[str, dict, list[str]]:
        stage = self.recipe.stages[name]
        cfg = stage.model_dump(mode="json")
        parents, external = [], {}
        for fld, ref, _ in self.recipe.refs(name):
            if ref in self.recipe.stages:
                parents.append(self.results[ref].id)
            else:  # an outside model: its weights hash is part of what this stage depends on
                ident = self.identity(ref)
                external[fld] = {"spec": ident.spec, "weights_sha256": ident.weights_sha256}
                if ref in self.recipe.teachers:  # the backend and terms too (an API model has no weights hash)
                    from .teachers.config import key_fields

                    external[fld]["teacher"] = key_fields(self.recipe.teachers[ref])
        key_cfg = {**cfg, "_external_models": external}
        return artifact_id(STAGE_KIND[stage.type], stage.type, key_cfg, parents), cfg, parents

    def run(self, only: list[str] | None = None) -> dict[str, Artifact]:
        from .lineage.policy import check_policy

        policy_notes = check_policy(self.recipe)  # refuses before any model loads
        fns = _stage_functions()
        order = self.recipe.order()
        for i, name in enumerate(order, 1):
            stage = self.recipe.stages[name]
            kind = STAGE_KIND[stage.type]
            aid, cfg, parents = self._key(name)
            existing = self.store.get(kind, aid)
            if existing is not None and not self.force:
                console.print(f"[dim][{i}/{len(order)}] {name} ({stage.type}): reusing {kind}/{aid}[/dim]")
                self.results[name] = existing
                continue
            console.rule(f"[{i}/{len(order)}] {name} ({stage.type})")
            start = time.perf_counter()
            inputs = {fld: self.results[ref] for fld, ref, _ in self.recipe.refs(name) if ref in self.recipe.stages}
            with self.store.create(kind, aid, stage=stage.type, name=name, config=cfg, parents=parents, recipe=self.recipe.name) as out:
                out.extra.update(policy_notes.get(name, {}))
                ctx = StageContext(name, stage, inputs, out, self, self.recipe.name)
                fns[stage.type](ctx)
                ctx.record_teacher_usage()
            self.results[name] = self.store.get(kind, aid)
            console.print(f"{name}: wrote {kind}/{aid} in {time.perf_counter() - start:.1f}s")
        return self.results
