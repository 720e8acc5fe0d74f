"""The licence and terms registry (terms.yaml) and the obligations a model inherits from it.

A model inherits rules along two kinds of path:
  * weights: the terms of the base models its weights were initialised from, rules that
    `reach` weights;
  * outputs: the terms of every original teacher whose tokens it learned from, and of the
    base weights of every intermediate model those tokens passed through, rules that
    `reach` outputs (a Gemma-derived student's text still carries Gemma's terms onward).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import StillhouseError
from .graph import Lineage
from .shares import teacher_shares

REGISTRY = Path(__file__).with_name("terms.yaml")


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, dict]:
    data = yaml.safe_load(REGISTRY.read_text())
    terms = data["terms"]
    for tid, t in terms.items():
        t["id"] = tid
        base = t.get("inherits")
        if base:  # a newer licence that repeats an older one adds its own rules on top
            own = {r["id"] for r in t["rules"]}
            t["rules"] = [r for r in terms[base]["rules"] if r["id"] not in own] + t["rules"]
    return terms


@functools.lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    out = {}
    for tid, t in registry().items():
        out[tid.lower()] = tid
        for a in t.get("aliases") or []:
            out[str(a).lower()] = tid
    return out


def lookup(license_id: str | None) -> dict:
    """The registry entry for a licence or terms id (any known spelling); unknown ids map to 'unknown'."""
    return registry()[_aliases().get(str(license_id or "").strip().lower(), "unknown")]


def known(license_id: str | None) -> bool:
    return lookup(license_id)["id"] != "unknown"


def rules_for(license_id: str | None, reach: str) -> list[dict]:
    return [r for r in lookup(license_id)["rules"] if reach in r["reaches"]]


@dataclass
class Source:
    """One way terms reach a model: a model (teacher or base weights), its licence, the path, the share."""

    spec: str
    license: str
    reach: str  # weights | outputs
    via: tuple[str, ...] = ()
    share: float | None = None
    role: str = "teacher"  # teacher | base | teacher-base


def sources(lin: Lineage, key: str | None = None) -> list[Source]:
    """Everything whose terms reach a model: original teachers (outputs), the base weights of
    the intermediate models on their paths (outputs), and the model's own base weights."""
    key = key or lin.root
    out: list[Source] = []
    for sh in teacher_shares(lin, key):
        out.append(Source(sh.spec, sh.node.license, "outputs", _via(lin, sh.paths[0][0]), sh.share, "teacher"))
        for path, s in sh.paths:
            for i, k in enumerate(path[1:-1], 1):
                m = lin.nodes[k].manifest or {}
                if m.get("kind") == "model":
                    for b in m.get("base_models") or []:
                        out.append(Source(str(b.get("spec")), b.get("license") or "unknown", "outputs",
                                          _via(lin, path[: i + 1]) + (str(b.get("spec")),), s, "teacher-base"))
    for b in (lin.nodes[key].manifest or {}).get("base_models") or []:
        out.append(Source(str(b.get("spec")), b.get("license") or "unknown", "weights", (), None, "base"))
    return out


def _via(lin: Lineage, path: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(lin.nodes[k].label if k in lin.nodes else k for k in path[1:])


def obligations(lin: Lineage, key: str | None = None) -> list[dict]:
    """Each inherited rule once per (terms, rule, source model), with the paths it arrives by."""
    found: dict[tuple, dict] = {}
    for src in sources(lin, key):
        entry = lookup(src.license)
        for r in rules_for(src.license, src.reach):
            k = (entry["id"], r["id"], src.spec)
            ob = found.setdefault(k, {
                "terms": entry["id"], "terms_name": entry["name"], "rule": r["id"], "kind": r["kind"], "text": r["text"],
                "clause": r["clause"], "uncertain": bool(r.get("uncertain")), "blocks": list(r.get("blocks") or []),
                "source": src.spec, "license": src.license, "reach": set(), "paths": [], "checked": entry.get("checked"),
            })
            ob["reach"].add(src.reach)
            p = " -> ".join(src.via) if src.via else "(base weights)"
            if p not in ob["paths"]:
                ob["paths"].append(p)
    out = []
    for ob in found.values():
        ob["reach"] = sorted(ob["reach"])
        out.append(ob)
    return sorted(out, key=lambda o: (o["terms"], o["source"], o["rule"]))


def card_licenses(lin: Lineage, key: str | None = None) -> list[str]:
    """Terms ids that attach to the model itself: its base weights', and those of any source whose
    terms make a model trained on its outputs a derivative (or may: unclear counts)."""
    ids = []
    for src in sources(lin, key):
        entry = lookup(src.license)
        if src.reach == "weights" or entry["outputs_make_derivative"] in ("yes", "unclear"):
            if entry["id"] not in ids:
                ids.append(entry["id"])
    return ids


def hf_license(ids: list[str]) -> str:
    """The card's `license:` value: the one hub id all attached terms share, else 'other'."""
    hub = {lookup(i).get("hf_license") or "other" for i in ids}
    if len(hub) == 1:
        return hub.pop()
    return "other"


def validate_registry() -> None:
    """Cheap structural check of terms.yaml (run by the tests)."""
    for tid, t in registry().items():
        for f in ("name", "kind", "commercial", "outputs_make_derivative", "rules", "checked"):
            if f not in t:
                raise StillhouseError(f"terms.yaml: {tid}: missing '{f}'")
        if t["outputs_make_derivative"] not in ("yes", "no", "unclear") or t["commercial"] not in ("allowed", "conditional", "forbidden", "unclear"):
            raise StillhouseError(f"terms.yaml: {tid}: outputs_make_derivative/commercial has an unknown value (quote yes/no: YAML reads them as booleans)")
        for r in t["rules"]:
            for f in ("id", "kind", "text", "clause", "reaches", "uncertain", "blocks"):
                if f not in r:
                    raise StillhouseError(f"terms.yaml: {tid}.{r.get('id')}: missing '{f}'")
