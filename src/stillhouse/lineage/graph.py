"""Ancestry of an artifact, read from manifests only: artifacts, the models outside the
workspace they used (teachers, base weights) and the declared origins of imported data.

Nodes are keyed by artifact id for artifacts, `model:<spec>@<hash12>` for outside models and
`origin:<name>` for what imported data says it came from (`origin:unknown` when it says
nothing). A model that a stage of this workspace produced and that later acted as a teacher
is an artifact node, so its own ancestry is walked too: that is how a share or an obligation
reaches a student through an intermediate model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import KINDS, MANIFEST, Artifact, ArtifactStore
from ..errors import StillhouseError
from ..teachers.endpoint import strip_userinfo

REQUIRED = ("id", "kind", "stage", "parents")
UNKNOWN_ORIGIN = "origin:unknown"


@dataclass
class Node:
    key: str
    kind: str  # an artifact kind, or "model" (outside model) / "origin" (declared source of imported data)
    label: str
    manifest: dict | None = None  # artifacts only
    identity: dict = field(default_factory=dict)  # outside models / origins: spec, weights_sha256, license, source

    @property
    def external(self) -> bool:
        return self.manifest is None

    @property
    def license(self) -> str:
        return self.identity.get("license") or "unknown"


@dataclass(frozen=True)
class Edge:
    child: str  # the derived node
    parent: str  # what it came from
    role: str  # parent | teacher | base | origin


@dataclass
class Lineage:
    root: str
    nodes: dict[str, Node]
    edges: list[Edge]

    def parents(self, key: str, role: str | None = None) -> list[str]:
        return [e.parent for e in self.edges if e.child == key and (role is None or e.role == role)]

    def edge_roles(self, child: str, parent: str) -> list[str]:
        return [e.role for e in self.edges if e.child == child and e.parent == parent]

    def artifacts(self) -> list[Node]:
        return [n for n in self.nodes.values() if not n.external]


def model_key(ident: dict) -> str:
    return f"model:{ident.get('spec')}@{str(ident.get('weights_sha256') or '?')[:12]}"


def origin_node(origin: dict | None) -> Node:
    """The declared source of imported data; no declaration is an explicit unknown, never clean."""
    if not origin or not (origin.get("teacher") or origin.get("api")):
        return Node(UNKNOWN_ORIGIN, "origin", "unknown origin", identity={"spec": "unknown", "license": (origin or {}).get("license", "unknown"), "source": "undeclared"})
    name = origin.get("teacher") or origin.get("api")
    ident = {"spec": name, "license": origin.get("license") or "unknown", "source": "api" if origin.get("api") else "declared",
             "weights_sha256": origin.get("weights_sha256")}
    return Node(f"origin:{name}", "origin", name, identity=ident)


def check_manifest(m: object, where: Path | str) -> dict:
    if not isinstance(m, dict):
        raise StillhouseError(f"corrupt manifest {where}: not a JSON object")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise StillhouseError(f"corrupt manifest {where}: missing {', '.join(repr(k) for k in missing)}")
    if not isinstance(m["parents"], list) or not all(isinstance(p, str) for p in m["parents"]):
        raise StillhouseError(f"corrupt manifest {where}: 'parents' must be a list of artifact ids")
    return m


class _Resolver:
    """Finds artifacts by id in a workspace (exact id, any kind), with clear errors."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self.roots = [store.root]  # plus the workspaces of teachers that live elsewhere

    def by_id(self, aid: str, needed_by: str) -> Artifact:
        for root in self.roots:
            for kind in KINDS:
                p = root / kind / aid
                if p.is_dir():
                    if not (p / MANIFEST).is_file():
                        raise StillhouseError(f"artifact {aid} (needed by {needed_by}) has no {MANIFEST}: {p}")
                    return _open(p)
        raise StillhouseError(f"artifact {aid} (needed by {needed_by}) not found in {self.store.root}: manifest missing or workspace moved")

    def teacher_artifact(self, ident: dict, needed_by: str) -> Artifact:
        """A teacher that is itself an artifact: found by its directory name (its id) or its path."""
        p = Path(str(ident.get("spec")))
        for kind in KINDS:
            if (self.store.root / kind / p.name / MANIFEST).is_file():
                return _open(self.store.root / kind / p.name)
        if (p / MANIFEST).is_file():  # a model of another workspace: its ancestors live there
            if p.parent.parent not in self.roots:
                self.roots.append(p.parent.parent)
            return _open(p)
        raise StillhouseError(f"teacher artifact {p.name} (needed by {needed_by}) not found in {self.store.root} or at {p}")


def _open(path: Path) -> Artifact:
    art = Artifact.open(path)
    check_manifest(art.manifest, path / MANIFEST)
    return art


def load_lineage(store: ArtifactStore, ref: str | None = None, *, pending: dict | None = None) -> Lineage:
    """The ancestry of artifact `ref` (path, id or prefix), or of a `pending` manifest not yet written.

    Missing or corrupted manifests and cycles raise StillhouseError naming the artifact.
    """
    res = _Resolver(store)
    nodes: dict[str, Node] = {}
    edges: list[Edge] = []

    def add_external(ident: dict) -> str:
        key = model_key(ident)
        nodes.setdefault(key, Node(key, "model", str(ident.get("spec")), identity=dict(ident)))
        return key

    def visit(m: dict, stack: list[str]) -> str:
        m = strip_userinfo(m)  # manifests written before base_url credentials were refused
        aid = m["id"]
        if aid in stack:
            raise StillhouseError(f"lineage cycle: {' -> '.join(stack[stack.index(aid):] + [aid])}")
        if aid in nodes:
            return aid
        nodes[aid] = Node(aid, m["kind"], m.get("name") or aid, manifest=m)
        stack = stack + [aid]
        for pid in m["parents"]:
            visit(res.by_id(pid, aid).manifest, stack)
            edges.append(Edge(aid, pid, "parent"))
        for t in m.get("teachers") or []:
            if not isinstance(t, dict) or "spec" not in t:
                raise StillhouseError(f"corrupt manifest of {aid}: a 'teachers' entry has no 'spec'")
            if t.get("source") == "artifact":
                tid = visit(res.teacher_artifact(t, aid).manifest, stack)
                edges.append(Edge(aid, tid, "teacher"))
            elif not t.get("derived"):  # derived entries summarise ancestry, they are not inputs
                edges.append(Edge(aid, add_external(t), "teacher"))
        for b in m.get("base_models") or []:
            if b.get("source") != "artifact":
                edges.append(Edge(aid, add_external(b), "base"))
        for src in (m.get("signal") or {}).get("sources", []):
            if src.get("teacher"):  # an outside online-KD teacher
                edges.append(Edge(aid, add_external(src["teacher"]), "teacher"))
        if m["stage"] == "import" or "origin" in m:
            o = origin_node(m.get("origin"))
            nodes.setdefault(o.key, o)
            edges.append(Edge(aid, o.key, "origin"))
        return aid

    if pending is not None:
        root = visit(check_manifest(pending, "<pending artifact>"), [])
    else:
        if ref is None:
            raise StillhouseError("load_lineage needs an artifact reference")
        art = store.find(ref)
        root = visit(check_manifest(art.manifest, art.path / MANIFEST), [])
    # one edge per (child, parent, role)
    edges = list(dict.fromkeys(edges))
    return Lineage(root, nodes, edges)

