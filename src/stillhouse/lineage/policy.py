"""Recipe policies: refuse a stage whose teachers' terms the recipe says it cannot accept.

    policy:
      purpose: commercial            # research | commercial
      deny: [openai-terms, gemma3-270m]   # terms ids (any alias), model specs or models: keys
      require_known_origin: true     # refuse teachers / imported data with unknown terms
      allow:                         # explicit overrides, recorded in the manifest
        - {source: gemma-terms-of-use, rule: no-competing-models, reason: "internal research only"}

The check is static: it follows the recipe's references (which stage's data or weights flow
into which) and reads licences without loading any weights (built-in table, a directory's
card), so a refusal comes before any compute is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import StillhouseError
from ..strict import Strict
from .terms import lookup, rules_for
from ..fsutil import expand_user


class Override(Strict):
    source: str  # a terms id, model spec or models: key
    rule: str | None = None  # one rule id of those terms; none: every rule and the deny list
    reason: str = Field(min_length=1)


class Policy(Strict):
    purpose: Literal["research", "commercial"] = "research"
    deny: list[str] = []
    require_known_origin: bool = False
    allow: list[Override] = []


@dataclass(frozen=True)
class PlannedSource:
    spec: str
    license: str
    reach: str  # weights | outputs
    via: tuple[str, ...]  # stage names the source passes through
    ref: str  # the recipe name it was referenced by (models: key or spec)


def license_of_spec(spec: str) -> str:
    """A model's licence without loading it: built-in table, or a directory's card / stillhouse.json."""
    from .. import model_catalog

    if spec in model_catalog.BUILTINS:
        return model_catalog.BUILTINS[spec].license
    p = expand_user(spec)
    if p.is_dir():
        return model_catalog._read_card_license(p)
    return "unknown"


def plan_sources(recipe) -> dict[str, list[PlannedSource]]:
    """For each stage: every outside model or origin whose terms reach what it makes. How a
    reference passes terms on is declared with the stage type (stages.Ref.carries): a teacher's
    or judge's *outputs* shape the artifact, a student's or pruned model's *weights* are it, a
    dataset passes on its own sources; a tokenizer, calibration text or a measured model nothing."""
    out: dict[str, list[PlannedSource]] = {}

    def of_model(ref: str, reach: str, via: tuple[str, ...]) -> list[PlannedSource]:
        if ref in recipe.stages:  # a model this recipe makes: all it owes reaches on, through it
            return [PlannedSource(s.spec, s.license, "outputs" if reach == "outputs" else s.reach, (ref,) + s.via, s.ref) for s in out[ref]]
        decl = getattr(recipe, "teachers", {}).get(ref)
        if decl is not None:  # a `teachers:` entry: an API model carries its declared terms
            if getattr(decl, "backend", None) == "openai":
                return [PlannedSource(f"openai:{decl.model}", decl.terms, reach, via, ref)]
            ref = decl.model
        spec = recipe.models.get(ref, ref)
        if (expand_user(spec) / "manifest.json").is_file():  # a model another run made: what it owes
            return _artifact_sources(expand_user(spec), ref, reach)
        return [PlannedSource(spec, license_of_spec(spec), reach, via, ref)]

    def of_data(ref: str) -> list[PlannedSource]:
        return [PlannedSource(s.spec, s.license, s.reach, (ref,) + s.via, s.ref) for s in out.get(ref, [])]

    for name in recipe.order():
        st = recipe.stages[name]
        srcs: list[PlannedSource] = []
        for _, target, ref in recipe.refs(name):
            carried = ref.carried(st)
            if carried == "data":
                srcs += of_data(target)
            elif carried is not None:
                srcs += of_model(target, carried, ())
        origin_field = recipe.stage_type(name).origin
        if origin_field:  # outside data: its declared origin (unknown when it declares none)
            o = getattr(st, origin_field)
            name_ = (o.teacher or o.api) if o else None
            srcs.append(PlannedSource(name_ or "unknown origin", (o.license if o else None) or "unknown", "outputs", (), name_ or "unknown"))
        out[name] = list(dict.fromkeys(srcs))
    return out


def _artifact_sources(path: Path, ref: str, reach: str) -> list[PlannedSource]:
    """Sources of a model artifact used from outside its recipe, read from its workspace's manifests."""
    from ..artifacts import ArtifactStore
    from .graph import load_lineage
    from .terms import sources

    lin = load_lineage(ArtifactStore(path.parent.parent), str(path))
    return [PlannedSource(s.spec, s.license, "outputs" if reach == "outputs" else s.reach, (ref,) + s.via[:-1], s.spec)
            for s in sources(lin)]


def _matches(entry: str, src: PlannedSource) -> bool:
    e = entry.strip()
    if e in (src.spec, src.ref):
        return True
    entry_terms = lookup(e)["id"]
    return entry_terms != "unknown" and entry_terms == lookup(src.license)["id"] or e.lower() == lookup(src.license)["id"].lower()


def _violations(policy: Policy, src: PlannedSource) -> list[dict]:
    terms = lookup(src.license)
    found = []
    for d in policy.deny:
        if _matches(d, src):
            found.append({"rule": None, "clause": f"policy.deny: {d}", "text": "denied by the recipe's policy"})
    for r in rules_for(src.license, src.reach):
        if policy.purpose in (r.get("blocks") or []):
            found.append({"rule": r["id"], "clause": r["clause"],
                          "text": r["text"] + (" (uncertain reading)" if r.get("uncertain") else "")})
    if policy.require_known_origin and terms["id"] == "unknown":
        found.append({"rule": "unknown-origin", "clause": "policy.require_known_origin",
                      "text": f"terms unknown (licence '{src.license}')"})
    return [{**v, "source": src.spec, "terms": terms["id"], "via": list(src.via)} for v in found]


def check_policy(recipe) -> dict[str, dict]:
    """Raise on the first stage the policy refuses; otherwise {stage: manifest fields to record}."""
    policy = getattr(recipe, "policy", None)
    if policy is None:
        return {}
    notes: dict[str, dict] = {}
    for name, srcs in plan_sources(recipe).items():
        overrides = []
        for src in srcs:
            for v in _violations(policy, src):
                ov = next((o for o in policy.allow if _matches(o.source, src) and (o.rule is None or o.rule == v["rule"])), None)
                if ov is None:
                    through = f" through {' -> '.join(v['via'])}" if v["via"] else ""
                    hint = f"policy.allow: [{{source: {v['terms'] if v['terms'] != 'unknown' else src.spec}, rule: {v['rule']}, reason: ...}}]"
                    raise StillhouseError(
                        f"policy ({policy.purpose}) refuses stage '{name}': teacher '{src.spec}'{through} under {v['terms']}: "
                        f"{v['text']} [{v['clause']}]; to override, add {hint}"
                    )
                overrides.append({**v, "override": ov.model_dump()})
        notes[name] = {"policy": {"purpose": policy.purpose, "deny": policy.deny,
                                  "require_known_origin": policy.require_known_origin, "overrides": overrides}}
    return notes
