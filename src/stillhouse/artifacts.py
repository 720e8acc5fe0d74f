"""The artifact store: every stage writes one directory `<workspace>/<kind>/<id>/`.

An artifact is written under a temporary name and renamed into place only when its payload
and `manifest.json` are complete, so a crash never leaves half an artifact. Its id hashes
everything that determines its content (kind, stage, resolved config, parent ids, code
version), so a stage whose id already exists is reused instead of recomputed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, ValidationError

from . import __version__
from .crashpoints import crash_point
from .errors import StillhouseError
from .fsutil import atomic_dir, sha256_json, write_json_atomic

KINDS = ("dataset", "model", "logit_cache", "eval", "report")
MANIFEST = "manifest.json"


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """The release plus a fingerprint of the package's sources: edited code never reuses stale artifacts."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def artifact_id(kind: str, stage: str, config: dict, parents: list[str], code_version: str | None = None) -> str:
    """Content id: the same inputs, config and code give the same id, and so the same artifact."""
    code_version = code_version or source_fingerprint()
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    return sha256_json({"kind": kind, "stage": stage, "config": config, "parents": sorted(parents), "code": code_version})[:20]


class ManifestSchema(BaseModel):
    """What every manifest.json must hold to be read (stages add their own keys on top)."""

    model_config = ConfigDict(extra="allow")
    id: str  # the content id, also the directory's name
    kind: str  # one of KINDS
    stage: str  # the stage type that wrote it
    name: str  # the stage's name in its recipe
    config: dict  # the stage's resolved config
    parents: list[str]  # ids of the input artifacts
    counts: dict = {}
    metrics: dict = {}
    warnings: list = []
    teachers: list = []


def read_manifest(path: Path, what: str) -> dict:
    """A manifest checked against ManifestSchema; a bad one is one error naming `what` and the fix."""
    fix = "run again with --force to replace it, or delete its directory"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StillhouseError(f"artifact {what}: {path} is corrupt (not JSON: {e}); {fix}") from None
    except OSError as e:
        raise StillhouseError(f"artifact {what}: cannot read {path} ({e.strerror}); {fix}") from None
    try:
        ManifestSchema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise StillhouseError(f"artifact {what}: {path} is not a valid manifest ({where}: {first['msg']}); {fix}") from None
    if data["kind"] not in KINDS:
        raise StillhouseError(f"artifact {what}: {path} has unknown kind {data['kind']!r}; {fix}")
    return data


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def file(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def open(cls, path: str | Path) -> "Artifact":
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            raise StillhouseError(f"not an artifact (no {MANIFEST}): {path}")
        return cls(path, read_manifest(mf, f"{path.parent.name}/{path.name}"))


@dataclass
class ArtifactWriter:
    """What a stage fills in while it writes: payload files go in `path`, facts in the fields."""

    path: Path
    kind: str
    id: str
    counts: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    teachers: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path_for(self, kind: str, aid: str) -> Path:
        return self.root / kind / aid

    def get(self, kind: str, aid: str) -> Artifact | None:
        p = self.path_for(kind, aid)
        if not (p / MANIFEST).is_file():
            return None
        art = Artifact.open(p)
        if art.id != aid or art.kind != kind:  # a copied or edited directory: never reused as this artifact
            raise StillhouseError(f"artifact {kind}/{aid}: its manifest says {art.kind}/{art.id}; run again with --force to replace it")
        return art

    def find(self, ref: str) -> Artifact:
        """An artifact by path, by id, or by unique id prefix."""
        p = Path(ref)
        if (p / MANIFEST).is_file():
            return Artifact.open(p)
        hits = [d for k in KINDS for d in (self.root / k).glob(f"{ref}*") if (d / MANIFEST).is_file()]
        if len(hits) == 1:
            return Artifact.open(hits[0])
        if not hits:
            raise StillhouseError(f"no artifact '{ref}' (not a path, and no id in {self.root})")
        raise StillhouseError(f"artifact id prefix '{ref}' is ambiguous: {len(hits)} matches")

    def all(self) -> list[Artifact]:
        out = []
        for k in KINDS:
            for d in sorted((self.root / k).glob("*")):
                if (d / MANIFEST).is_file():
                    out.append(Artifact.open(d))
        return out

    def partial_path(self, kind: str, aid: str) -> Path:
        """Where a resumable stage keeps its unfinished work (hidden: never read as an artifact)."""
        return self.root / kind / f".{aid}.partial"

    @contextlib.contextmanager
    def _resumable_dir(self, final: Path, tmp: Path) -> Iterator[Path]:
        """Like atomic_dir, but the work directory has a fixed name and survives a crash or
        Ctrl-C, so a rerun of the same stage (same id) continues it.

        A user error (bad input, nothing left to write) discards it, as a rerun would fail the
        same way, unless the error is marked `resumable` (a teacher that failed after some
        shards were committed)."""
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
        except StillhouseError as e:
            if not getattr(e, "resumable", False):
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    @contextlib.contextmanager
    def create(
        self, kind: str, aid: str, *, stage: str, name: str, config: dict, parents: list[str], recipe: str | None = None,
        resumable: bool = False,
    ) -> Iterator[ArtifactWriter]:
        """Write a new artifact atomically; the manifest is written last, then the rename.

        With `resumable`, the work directory is `partial_path(kind, aid)` and is kept if the
        block fails or the process dies, for the stage to continue on the next run.
        """
        final = self.path_for(kind, aid)
        start = time.perf_counter()
        work = self._resumable_dir(final, self.partial_path(kind, aid)) if resumable else atomic_dir(final)
        with work as tmp:
            writer = ArtifactWriter(tmp, kind, aid)
            yield writer
            manifest: dict[str, Any] = {
                "id": aid,
                "kind": kind,
                "stage": stage,
                "name": name,
                "recipe": recipe,
                "config": config,
                "parents": parents,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "stillhouse_version": __version__,
                "code_version": source_fingerprint(),
                "duration_s": round(time.perf_counter() - start, 2),
                "teachers": writer.teachers,
                "counts": writer.counts,
                "metrics": writer.metrics,
                "warnings": writer.warnings,
                **writer.extra,
            }
            write_json_atomic(tmp / MANIFEST, manifest)
            crash_point("before-rename")
