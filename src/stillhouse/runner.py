"""Runs a recipe: stages in dependency order, each reused if its artifact already exists."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import models as model_specs
from . import workspace
from .artifacts import Artifact, ArtifactStore, ArtifactWriter, artifact_id
from .errors import StillhouseError
from .progress import console
from .recipe import Recipe
from .stages import STAGES


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

    @property
    def store(self) -> ArtifactStore:
        """The workspace's artifacts (the ones this stage's inputs are among)."""
        return self.runner.store

    def model(self, ref: str) -> model_specs.LoadedModel:
        return self.runner.load_model(ref)

    def identity(self, ref: str) -> model_specs.ModelIdentity:
        return self.runner.identity(ref)

    def teacher(self, ref: str, **overrides):
        """A Teacher for a model reference or a `teachers:` entry; its usage lands in the manifest."""
        t = self.runner.teacher(ref, **overrides)
        if hasattr(t, "ledger"):  # usage of every process of a resumed stage, kept with its work
            t.ledger = self.out.path / "teacher_usage" / f"{ref.replace('/', '_')}.jsonl"
        self._teachers.append((ref, t))
        return t

    def record_teacher_usage(self) -> None:
        """Token and cost accounting of the API teachers this stage used, under metrics.teacher_usage."""
        usage = {ref: m for ref, t in self._teachers if (m := t.usage_metrics())}
        if usage:
            self.out.metrics.setdefault("teacher_usage", {}).update(usage)


@dataclass
class Runner:
    recipe: Recipe
    workspace: Path
    force: bool = False
    results: dict[str, Artifact] = field(default_factory=dict)
    _loaded: dict[str, model_specs.LoadedModel] = field(default_factory=dict)
    _identities: dict[str, model_specs.ModelIdentity] = field(default_factory=dict)
    resume: bool = False  # train stages continue from their latest checkpoint

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
                self._identities[spec] = model_specs.identify(spec)  # a GGUF is hashed, not converted
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
        files = getattr(stage, "external_files", lambda: [])()
        if files:  # input files the stage reads (a prompt file): edited content means a new artifact
            from .fsutil import sha256_file

            key_cfg["_external_files"] = {str(p): sha256_file(p) for p in files}
        return artifact_id(STAGES[stage.type].kind, stage.type, key_cfg, parents), cfg, parents

    def run(self) -> dict[str, Artifact]:
        from .lineage.policy import check_policy
        from .preflight import check_inputs
        from .processes import from_environment

        policy_notes = check_policy(self.recipe)  # refuses before any model loads
        check_inputs(self.recipe)  # model directories and prompt files, before any model loads
        workspace.check_workspace(self.workspace)
        procs = from_environment()  # one process, or one of several under a launcher
        order = self.recipe.order()
        for i, name in enumerate(order, 1):
            stage = self.recipe.stages[name]
            entry = STAGES[stage.type]
            kind = entry.kind
            aid, cfg, parents = self._key(name)
            # the main process decides, so every process takes the same branch
            reuse = procs.from_main(procs.main and self._reusable(kind, aid))
            if reuse:
                console.print(f"[dim][{i}/{len(order)}] {name} ({stage.type}): reusing {kind}/{aid}[/dim]")
                self.results[name] = self._shared(kind, aid, name)
                continue
            console.rule(f"[{i}/{len(order)}] {name} ({stage.type})")
            start = time.perf_counter()
            inputs = {fld: self.results[ref] for fld, ref, _ in self.recipe.refs(name) if ref in self.recipe.stages}
            parallel = entry.parallel  # the others run it too (into scratch) or wait for the main process
            if procs.main:
                try:
                    self._write(entry, name, stage, aid, cfg, parents, inputs, policy_notes.get(name, {}))
                except BaseException as e:
                    # the others wait for this stage's outcome; in a parallel stage they are
                    # inside the same collectives and the launcher stops them
                    if procs.many and not parallel:
                        _tell_others(procs, f"{type(e).__name__}: {e}")
                    raise
            elif parallel:
                self._scratch(entry.run_function(), name, stage, kind, aid, inputs)
            failed = procs.from_main(None)  # the main process has its artifact (or an error) by now
            if failed:
                raise StillhouseError(f"stage '{name}' failed on the main process: {failed}")
            self.results[name] = self._shared(kind, aid, name)
            console.print(f"{name}: wrote {kind}/{aid} in {time.perf_counter() - start:.1f}s")
        procs.close()
        return self.results

    def existing(self, name: str) -> Artifact | None:
        """The artifact stage `name` would reuse, if it is there (its parent stages must have run)."""
        return self.store.get(STAGES[self.recipe.stages[name].type].kind, self._key(name)[0])

    def _reusable(self, kind: str, aid: str) -> bool:
        """Whether the artifact exists (a killed run's finished work is accepted first, see workspace.py)."""
        if self.force:
            return False
        with workspace.artifact_lock(self.store, kind, aid):  # waits while another run writes it
            workspace.recover(self.store, kind, aid)
        return self.store.get(kind, aid) is not None

    def _write(self, entry, name, stage, aid, cfg, parents, inputs, notes) -> None:
        # Resumable stages keep their unfinished work across a crash or Ctrl-C; --force discards it.
        # The artifact's lock is held from the discard through the rename and the clean-up.
        kind, fn, resumable = entry.kind, entry.run_function(), entry.resumable
        with workspace.artifact_lock(self.store, kind, aid):
            if self.force:
                workspace.discard(self.store, kind, aid)
            workspace.recover(self.store, kind, aid)
            try:
                with self.store.create(kind, aid, stage=stage.type, name=name, config=cfg, parents=parents,
                                       recipe=self.recipe.name, resumable=resumable) as out:
                    out.extra.update(notes)
                    ctx = StageContext(name, stage, inputs, out, self, self.recipe.name)
                    fn(ctx)
                    ctx.record_teacher_usage()
            except OSError as e:  # a full disk, a quota, a read-only file system: one line, work kept
                if (err := workspace.write_error(e, name, kind, aid, self.store)) is not None:
                    raise err from None
                raise
            workspace.tidy(self.store, kind, aid)  # spent shards and checkpoints, only now the artifact is in place

    def _scratch(self, fn, name, stage, kind, aid, inputs) -> None:
        """A parallel stage on a process other than the main one: the same work, its files discarded."""
        with tempfile.TemporaryDirectory(prefix=f"stillhouse-{name}-") as tmp:
            fn(StageContext(name, stage, inputs, ArtifactWriter(Path(tmp), kind, aid), self, self.recipe.name))

    def _shared(self, kind: str, aid: str, name: str) -> Artifact:
        art = self.store.get(kind, aid)
        if art is None:  # only a process that does not see the main process's files gets here
            raise StillhouseError(f"stage '{name}': artifact {kind}/{aid} is not in workspace {self.workspace} on this "
                                  "process; every process of a launched run needs the same workspace (a shared file system)")
        return art


def _tell_others(procs, error: str) -> None:
    try:
        procs.from_main(error)
    except Exception:  # the others are gone already: nothing to tell
        pass
