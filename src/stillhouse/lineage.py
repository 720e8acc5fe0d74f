"""Lineage: which teachers and base weights an artifact owes, and the model card that says so.

Everything here reads manifests only; nothing is re-run. Licences are never hard-coded: a
derived model's licence field lists what its teachers' and base weights' terms are.
"""

from __future__ import annotations

import json

import yaml


def merge_teachers(entries: list[tuple[dict, float]]) -> list[dict]:
    """Combine (teacher, weight) pairs into teachers with normalised `token_share` summing to 1."""
    by_key: dict[tuple, dict] = {}
    total = sum(w for _, w in entries) or 1.0
    for t, w in entries:
        key = (t["spec"], t["weights_sha256"])
        cur = by_key.setdefault(key, {k: v for k, v in t.items() if k not in ("token_share", "role")} | {"token_share": 0.0, "roles": []})
        cur["token_share"] += w / total
        role = t.get("role")
        if role and role not in cur["roles"]:
            cur["roles"].append(role)
    for v in by_key.values():
        v["token_share"] = round(v["token_share"], 6)
    return sorted(by_key.values(), key=lambda t: -t["token_share"])


def license_of(teachers: list[dict], base_models: list[dict]) -> str:
    """The licence id to put on a derived model's card: the one all sources share, else 'other'."""
    ids = {x.get("license", "unknown") for x in teachers + base_models}
    if len(ids) == 1:
        return ids.pop()
    return "other"


def model_card(name: str, manifest: dict, base_models: list[dict]) -> str:
    """A Hugging Face model card whose YAML carries a machine-readable `distillation:` block."""
    teachers = manifest.get("teachers", [])
    lic = license_of(teachers, base_models)
    meta = {
        "license": lic,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["distillation", "stillhouse"],
    }
    if base_models:
        meta["base_model"] = [b["spec"] for b in base_models]
    if lic == "other":
        meta["license_name"] = "see-lineage"
    meta["distillation"] = {
        "teachers": [
            {k: t.get(k) for k in ("spec", "weights_sha256", "license", "token_share", "roles")} for t in teachers
        ],
        "base_models": [{k: b.get(k) for k in ("spec", "weights_sha256", "license")} for b in base_models],
        "stage": manifest.get("stage"),
        "artifact_id": manifest.get("id"),
        "parents": manifest.get("parents", []),
    }
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines.append(f"Produced by stillhouse stage `{manifest.get('stage')}` (artifact `{manifest.get('id')}`).")
    lines += ["", "## Lineage", ""]
    if teachers:
        lines.append("| teacher | licence / terms | share of training signal |")
        lines.append("|---|---|---|")
        for t in teachers:
            lines.append(f"| {t['spec']} | {t.get('license', 'unknown')} | {t.get('token_share', 0):.0%} |")
    else:
        lines.append("No teacher signal (weights derived only).")
    if base_models:
        lines += ["", "Weights initialised from: " + ", ".join(f"`{b['spec']}` ({b.get('license', 'unknown')})" for b in base_models)]
    if lic == "other":
        lines += ["", "Sources carry different licences or terms; each applies to this model. See the table above."]
    metrics = manifest.get("metrics") or {}
    if metrics:
        lines += ["", "## Figures", "", "```json", json.dumps(metrics, indent=2, default=str)[:4000], "```"]
    return "\n".join(lines) + "\n"
