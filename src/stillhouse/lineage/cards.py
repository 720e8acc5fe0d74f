"""Model cards: a Hugging Face README.md whose YAML says where the model came from.

The licence is never hard-coded: it is the hub id all terms attached to the model share
(its base weights', and its teachers' where their terms make a distilled model a derivative),
else `other`. The machine-readable `distillation:` block lists the original teachers with
their weights hash, share and terms, so a tool can walk a chain of cards without manifests.
"""

from __future__ import annotations

import json

import yaml

from .graph import Lineage
from .shares import signal_tokens, teacher_shares
from .terms import card_licenses, hf_license, lookup, obligations


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


def _stages(lin: Lineage) -> list[dict]:
    """Artifacts of the ancestry that produced data or weights, oldest first."""
    arts = [n for n in lin.artifacts() if n.kind in ("dataset", "model")]
    arts.sort(key=lambda n: (n.manifest or {}).get("created_at") or "9999")
    return [{"name": n.label, "stage": n.manifest.get("stage"), "kind": n.kind, "id": n.key} for n in arts]


def distillation_block(lin: Lineage) -> dict:
    """The card's machine-readable lineage (also what `stillhouse lineage --json` calls `card`)."""
    root = lin.nodes[lin.root]
    shares = teacher_shares(lin)
    return {
        "teachers": [
            {"spec": s.spec, "weights_sha256": s.node.identity.get("weights_sha256"), "share": round(s.share, 6),
             "license": s.node.license, "terms": lookup(s.node.license)["id"],
             "via": [[lin.nodes[k].label for k in p[1:-1]] for p, _ in s.paths]}
            for s in shares
        ],
        "base_models": [{k: b.get(k) for k in ("spec", "weights_sha256", "license")} for b in (root.manifest or {}).get("base_models") or []],
        "stages": len(_stages(lin)),
        "signal_tokens": signal_tokens(root.manifest),
        "artifact_id": root.key,
        "parents": (root.manifest or {}).get("parents", []),
    }


def model_card(name: str, manifest: dict, base_models: list[dict], lineage: Lineage, evals: list[dict] | None = None) -> str:
    """A Hugging Face model card from the model's ancestry (`lineage`): teachers with shares
    through every stage, the inherited obligations and the stages."""
    block = distillation_block(lineage)
    ids = card_licenses(lineage)
    lic = hf_license(ids) if ids else "other"
    obs = obligations(lineage)
    datasets = [f"{n['name']}-{n['id'][:8]}" for n in _stages(lineage) if n["kind"] == "dataset"]
    meta = {"license": lic}
    if lic == "other":
        meta["license_name"] = "see-lineage"
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                 "tags": ["distillation", "knowledge-distillation", "stillhouse"]})
    if base_models:
        meta["base_model"] = [b["spec"] for b in base_models]
    if datasets:
        meta["datasets"] = datasets
    meta["distillation"] = block | {"terms": ids}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines.append(f"Produced by stillhouse stage `{manifest.get('stage')}` (artifact `{manifest.get('id')}`). "
                 f"Licence: `{lic}`" + (f" (terms attached through the lineage: {', '.join(ids)})" if lic == "other" else "") + ".")
    lines += ["", "## Lineage", "", "### Teachers", ""]
    if block["teachers"]:
        lines += ["| teacher | terms | share of training signal | through |", "|---|---|---|---|"]
        for t in block["teachers"]:
            via = "; ".join(" -> ".join(v) or "direct" for v in t["via"])
            lines.append(f"| `{t['spec']}` | {t['terms']} | {t['share']:.1%} | {via} |")
    else:
        lines.append("No teacher signal (weights derived only).")
    if base_models:
        lines += ["", "Weights initialised from: " + ", ".join(f"`{b['spec']}` ({b.get('license', 'unknown')})" for b in base_models)]
    lines += ["", "### Stages", ""]
    lines += [f"{i}. `{s['name']}` ({s['stage']}, {s['kind']} `{s['id']}`)" for i, s in enumerate(_stages(lineage), 1)]
    lines += ["", "### Inherited obligations", ""]
    if obs:
        for o in obs:
            flag = " (uncertain)" if o["uncertain"] else ""
            lines.append(f"- **{o['terms']} / {o['rule']}**{flag}, from `{o['source']}` via {'; '.join(o['paths'])}: {o['text']} [{o['clause']}]")
        lines += ["", "Summaries of the terms, not legal advice; read the original texts."]
    else:
        lines.append("None recorded.")
    lines += _figures(manifest.get("metrics") or {}, evals or [])
    return "\n".join(lines) + "\n"


def _figures(metrics: dict, evals: list[dict]) -> list[str]:
    out = []
    if evals:
        out += ["", "## Evaluation", "", "| eval artifact | task | label | pass@1 | decode tok/s |", "|---|---|---|---|---|"]
        for e in evals:
            out.append(f"| `{e['eval']}` | {e.get('task')} | {e['label']} | {e.get('pass_at_1')} | {round(e['decode_tok_per_s'], 1) if e.get('decode_tok_per_s') else '-'} |")
    if metrics:
        out += ["", "## Training figures", "", "```json", json.dumps(metrics, indent=2, default=str)[:4000], "```"]
    return out


def eval_figures(store, model_id: str) -> list[dict]:
    """Results of every eval artifact in the workspace that evaluated this model."""
    out = []
    for art in store.all():
        if art.kind != "eval" or model_id not in art.manifest.get("parents", []) or not art.file("results.json").is_file():
            continue
        res = json.loads(art.file("results.json").read_text())
        for label, r in res.get("models", {}).items():
            if r.get("artifact") == model_id:
                out.append({"eval": art.id, "task": res.get("task", {}).get("name"), "label": label,
                            "pass_at_1": r.get("pass_at_1"), "decode_tok_per_s": r.get("decode_tok_per_s")})
    return out
