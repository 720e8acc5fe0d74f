"""Teacher shares: which fraction of a model's training signal traces back to each original teacher.

The training signal of a model is counted in tokens: tokens of SFT targets and tokens under
a KD loss (`signal.sources` in a train stage's manifest, one entry per input and role). A
source that is a dataset owes its tokens to the teachers that wrote the dataset; a dataset
written by a model of this workspace owes them to that model's own teachers, and so on, so
shares propagate through any number of stages:

    share(node) = sum over sources s of  tokens(s) / tokens(node) * share(s)

An original teacher (a model from outside the workspace, an API, a declared origin) owes
100% to itself; imported data with no declared origin owes 100% to `origin:unknown`. Every
contribution keeps the path it travelled, so `--from` can show *how* a model owes a teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StillhouseError
from .graph import UNKNOWN_ORIGIN, Lineage, Node, model_key, origin_node
from ..fsutil import expand_user

Path_ = tuple[str, ...]


@dataclass
class Share:
    key: str
    node: Node
    share: float
    paths: list[tuple[Path_, float]] = field(default_factory=list)

    @property
    def spec(self) -> str:
        return str(self.node.identity.get("spec", self.node.label))

    def to_dict(self, lineage: Lineage) -> dict:
        return {
            "spec": self.spec,
            "weights_sha256": self.node.identity.get("weights_sha256"),
            "license": self.node.license,
            "source": self.node.identity.get("source"),
            "share": round(self.share, 6),
            "paths": [{"via": [lineage.nodes[k].label for k in p[1:-1]], "nodes": list(p), "share": round(s, 6)} for p, s in self.paths],
        }


def _sources(lin: Lineage, node: Node) -> list[tuple[str, float]]:
    """(source node key, weight) pairs for one node; weights need not sum to 1."""
    m = node.manifest or {}
    sig = m.get("signal")
    if sig and sig.get("sources"):
        out = []
        for s in sig["sources"]:
            w = float(s.get("tokens", 0))
            if w <= 0:
                continue
            if s.get("parent"):
                if s["parent"] not in lin.nodes:
                    raise StillhouseError(f"artifact {node.key}: signal source {s['parent']} is not among its ancestors")
                out.append((s["parent"], w))
            elif s.get("teacher"):
                out.append((model_key(s["teacher"]), w))
            else:
                out.append((UNKNOWN_ORIGIN, w))
        return out
    if m.get("stage") == "import" or "origin" in m:
        return [(origin_node(m.get("origin")).key, 1.0)]
    teachers = [t for t in m.get("teachers") or [] if not t.get("derived")]
    if teachers:
        out = []
        for t in teachers:
            w = float(t.get("token_share", 1.0))
            if t.get("source") == "artifact":  # a model of the workspace: its directory name is its id
                out.append((_artifact_key(t), w))
            else:
                out.append((model_key(t), w))
        return out
    # no signal of its own (prune, a copy): whatever its model parents owe
    return [(p, 1.0) for p in lin.parents(node.key, "parent") if lin.nodes[p].kind == "model"]


def _artifact_key(t: dict) -> str:
    from pathlib import PurePath

    return PurePath(str(t["spec"])).name


def contributions(lin: Lineage, key: str | None = None) -> dict[Path_, float]:
    """Path (node keys from `key` to an original teacher) -> share; the shares sum to 1 or the dict is empty."""
    memo: dict[str, dict[Path_, float]] = {}

    def walk(k: str, stack: tuple[str, ...]) -> dict[Path_, float]:
        if k in stack:
            raise StillhouseError(f"lineage cycle: {' -> '.join(stack[stack.index(k):] + (k,))}")
        if k in memo:
            return memo[k]
        node = lin.nodes.get(k)
        if node is None:
            if k == UNKNOWN_ORIGIN:
                return {(k,): 1.0}
            raise StillhouseError(f"lineage of {stack[-1] if stack else k}: source {k} not found")
        if node.external:
            memo[k] = {(k,): 1.0}
            return memo[k]
        srcs = [(s, w) for s, w in _sources(lin, node)]
        parts = [(w, walk(s, stack + (k,))) for s, w in srcs]
        parts = [(w, c) for w, c in parts if c]
        total = sum(w for w, _ in parts)
        out: dict[Path_, float] = {}
        for w, c in parts:
            for p, s in c.items():
                out[(k,) + p] = out.get((k,) + p, 0.0) + s * w / total
        memo[k] = out
        return out

    return walk(key or lin.root, ())


def teacher_shares(lin: Lineage, key: str | None = None) -> list[Share]:
    """Original teachers of a node with their shares and paths, largest share first."""
    by_teacher: dict[str, Share] = {}
    for path, s in contributions(lin, key).items():
        t = path[-1]
        node = lin.nodes.get(t) or origin_node(None)
        sh = by_teacher.setdefault(t, Share(t, node, 0.0))
        sh.share += s
        sh.paths.append((path, s))
    return sorted(by_teacher.values(), key=lambda x: -x.share)


def signal_tokens(manifest: dict | None) -> int:
    """Cumulative training-signal tokens a model carries (its own training plus its student's)."""
    if not manifest:
        return 0
    sig = manifest.get("signal")
    if sig:
        return int(sum(s.get("tokens", 0) for s in sig.get("sources", [])))
    if manifest.get("stage") == "train":  # manifests written before `signal` existed
        return int((manifest.get("counts") or {}).get("tokens_seen", 0))
    return int(manifest.get("signal_tokens", 0))


def matches(share: Share, spec: str) -> bool:
    """Whether a teacher is the model `spec` names: its spec, a path ending, or its weights hash."""
    ident = share.node.identity
    s = spec.strip()
    if expand_user(s).exists():  # a path given relative to here
        s = str(expand_user(s).resolve())
    cand = {str(ident.get("spec")), share.node.label, str(ident.get("weights_sha256"))}
    return s in cand or any(c.rstrip("/").endswith("/" + s) for c in cand) or (len(s) >= 8 and str(ident.get("weights_sha256", "")).startswith(s))
