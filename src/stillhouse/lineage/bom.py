"""An AI bill of materials: a lineage as a CycloneDX 1.6 ML-BOM (JSON), for supply-chain tools.

Mapping, one component per lineage node:
  * models (the artifact's own and every outside teacher or base model): `machine-learning-model`,
    with the weights' SHA-256 where one exists, the licence or terms (an SPDX id when it is one,
    else the registry's name and URL) and, for models this workspace trained, a `modelCard` whose
    `datasets` name the datasets it learned from;
  * datasets and logit caches: `data` components (`data[].type: dataset`); declared origins of
    imported data likewise;
  * evaluations and reports: `data` components of type `other`.
The derivation chain is the `dependencies` graph (each artifact depends on what it was made
from); the role of each input (parent, teacher, base, origin) and each original teacher's share
of the root's training signal are `stillhouse:` properties, as the spec advises for facts it has
no field for. Nothing here reads an API key or a base URL: an API teacher is its model name and terms.

The document is built as plain JSON; `validate_cyclonedx` checks it against the official 1.6
schema that `cyclonedx-python-lib` ships (extra `bom`).
"""

from __future__ import annotations

import json
import re
import uuid

from ..errors import StillhouseError
from .cards import distillation_block
from .graph import Lineage, Node
from .shares import teacher_shares
from .terms import card_licenses, lookup

SPEC_VERSION = "1.6"
NAMESPACE = uuid.UUID("5f3c4bb2-7f0e-4b7e-9a53-8d7f5a6e0c11")  # serial numbers: uuid5(this, root id)


def _ref(node: Node) -> str:
    return f"{node.kind}:{node.key}" if not node.external else node.key


def _licenses(license_id: str | None) -> list[dict]:
    """CycloneDX `licenses`: an SPDX id as `id`, any other terms by name (and URL if known)."""
    from_registry = lookup(license_id)
    raw = str(license_id or "unknown")
    if _is_spdx(raw):
        return [{"license": {"id": raw}}]
    lic = {"name": raw if from_registry["id"] == "unknown" else from_registry["id"]}
    if from_registry.get("url"):
        lic["url"] = from_registry["url"]
    return [{"license": lic}]


def _is_spdx(value: str) -> bool:
    try:
        from cyclonedx.spdx import is_supported_id
    except ImportError:  # without the library: the ids stillhouse's registry knows to be SPDX
        return value in ("Apache-2.0", "MIT", "BSD-3-Clause", "CC-BY-4.0", "CC-BY-SA-4.0")
    return is_supported_id(value)


def _props(**kv) -> list[dict]:
    return [{"name": f"stillhouse:{k}", "value": str(v)} for k, v in kv.items() if v is not None]


def _external(node: Node) -> dict:
    ident = node.identity
    source = str(ident.get("source") or "unknown")
    if re.match(r"https?://", source):  # an API teacher's identity holds its endpoint: never exported
        source = "api"
    c = {"type": "machine-learning-model" if node.kind == "model" else "data", "bom-ref": _ref(node),
         "name": str(ident.get("spec") or node.label), "licenses": _licenses(node.license),
         "properties": _props(source=source)}
    if ident.get("weights_sha256") and re.fullmatch(r"[0-9a-f]{64}", str(ident["weights_sha256"])):
        c["hashes"] = [{"alg": "SHA-256", "content": ident["weights_sha256"]}]
    if c["type"] == "data":
        c["data"] = [{"type": "dataset", "name": node.label, "description": "declared origin of imported data"}]
    return c


def _artifact(lin: Lineage, node: Node) -> dict:
    m = node.manifest or {}
    c = {"bom-ref": _ref(node), "name": node.label, "version": node.key[:12],
         "properties": _props(artifact_id=node.key, kind=m.get("kind"), stage=m.get("stage"), recipe=m.get("recipe"),
                              created_at=m.get("created_at"))}
    for e in lin.edges:
        if e.child == node.key:
            c["properties"] += _props(**{f"input:{e.role}": _ref(lin.nodes[e.parent])})
    if node.kind == "model":
        c["type"] = "machine-learning-model"
        datasets = [p for p in lin.parents(node.key) if lin.nodes[p].kind in ("dataset", "logit_cache")]
        card = {"modelParameters": {"task": "text-generation", "approach": {"type": "supervised"},
                                    "datasets": [{"ref": _ref(lin.nodes[p])} for p in datasets]}}
        c["modelCard"] = card
    else:
        c["type"] = "data"
        kind = "dataset" if node.kind in ("dataset", "logit_cache") else "other"
        data = {"type": kind, "name": node.label}
        counts = m.get("counts") or {}
        if counts.get("records") is not None:
            data["contents"] = {"properties": _props(records=counts.get("records"), tokens=counts.get("tokens"))}
        c["data"] = [data]
    return c


def to_cyclonedx(lin: Lineage) -> dict:
    """The ancestry of `lin.root` as a CycloneDX 1.6 BOM (a dict ready for json.dumps)."""
    root = lin.nodes[lin.root]
    m = root.manifest or {}
    components = {n.key: (_external(n) if n.external else _artifact(lin, n)) for n in lin.nodes.values()}
    main = components.pop(lin.root)
    ids = card_licenses(lin)
    if ids:  # the terms every original teacher and base model pass on to the root
        main["licenses"] = [x for i in ids for x in _licenses(i)]
    for s in teacher_shares(lin):
        main["properties"] += _props(**{"teacher_share": f"{s.spec}={s.share:.6f}"})
        if s.key in components:
            components[s.key]["properties"] += _props(share_of_root=f"{s.share:.6f}")
    block = distillation_block(lin)
    main["properties"] += _props(signal_tokens=block["signal_tokens"], stages=block["stages"])
    version = m.get("stillhouse_version") or "unknown"
    metadata = {"component": main,
                "tools": {"components": [{"type": "application", "name": "stillhouse", "version": str(version)}]}}
    if m.get("created_at"):
        metadata["timestamp"] = _timestamp(m["created_at"])
    deps = [{"ref": _ref(n), "dependsOn": sorted({_ref(lin.nodes[e.parent]) for e in lin.edges if e.child == n.key})}
            for n in lin.nodes.values()]
    return {
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{uuid.uuid5(NAMESPACE, lin.root)}",
        "version": 1,
        "metadata": metadata,
        "components": sorted(components.values(), key=lambda c: c["bom-ref"]),
        "dependencies": sorted(deps, key=lambda d: d["ref"]),
    }


def _timestamp(value: str) -> str:
    """ISO 8601 with a zone, as the schema's date-time format demands."""
    return value if re.search(r"(Z|[+-]\d\d:\d\d)$", value) else value + "Z"


def validate_cyclonedx(doc: dict) -> None:
    """Raise StillhouseError (one line) unless `doc` validates against the CycloneDX 1.6 JSON schema."""
    try:
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator
    except ImportError:
        raise StillhouseError("validating a CycloneDX BOM needs cyclonedx-python-lib: pip install 'stillhouse[bom]'") from None
    err = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(doc))
    if err is not None:
        e = err.data
        where = "/".join(str(p) for p in getattr(e, "absolute_path", [])) or "(document)"
        raise StillhouseError(f"invalid CycloneDX {SPEC_VERSION} BOM at {where}: {getattr(e, 'message', e)}".splitlines()[0])
