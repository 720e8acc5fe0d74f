"""Lineage on real runs with tiny models: the two-stage shape of recipes/two_stage.yaml, recipe
policies refusing before any model loads, overrides recorded, imported data.

Two tiny "teachers" memorise the answers of the first training problems (see
test_pipeline_tiny); one is labelled with the Gemma terms, the other Apache-2.0, and their
weights differ by a hair so lineage tells them apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from stillhouse import models
from stillhouse.api import run_recipe
from stillhouse.artifacts import ArtifactStore
from stillhouse.cli import main
from stillhouse.errors import StillhouseError
from stillhouse.lineage import load_lineage, obligations, teacher_shares
from stillhouse.lineage.policy import plan_sources
from stillhouse.recipe import builtin_recipe, load_recipe, parse_recipe

from test_pipeline_tiny import PROBLEMS, _train_teacher
from support import module_env, one_thread


def _licensed(d: Path, licence: str) -> None:
    (d / "README.md").write_text(f"---\nlicense: {licence}\n---\n\n# tiny teacher\n")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lineage-teachers")
    with one_thread():
        g = root / "gemma-like"
        _train_teacher(g)
        _licensed(g, "gemma")
        a = root / "apache-like"
        m = AutoModelForCausalLM.from_pretrained(g)
        with torch.no_grad():
            m.model.norm.weight.add_(1e-4)  # same answers, other weights: another model to lineage
        m.save_pretrained(a)
        for f in g.glob("*token*"):
            (a / f.name).write_bytes(f.read_bytes())
        _licensed(a, "apache-2.0")
    return {"root": root, "gemma": g, "apache": a}


def two_stage(g: Path, a: Path, policy: dict | None = None) -> dict:
    """The shape of recipes/two_stage.yaml with tiny models and sizes."""
    rej = {"type": "rejection", "tasks": "problems", "samples": 2, "temperature": 1.0, "max_new_tokens": 4,
           "keep_per_problem": 2, "batch_size": 8}
    r = {
        "name": "tiny-two-stage",
        "models": {"gemma": str(g), "smol": str(a)},
        "stages": {
            "problems": PROBLEMS,
            "gemma_traces": {**rej, "teacher": "gemma"},
            "gemma_for_smol": {"type": "mix", "datasets": ["gemma_traces"], "tokenizer": "smol"},
            "student1": {"type": "train", "student": "smol", "data": "gemma_for_smol", "sft_weight": 1.0, "kd_weight": 0.0,
                         "epochs": 1, "lr": 1e-5, "batch_size": 4},
            "student1_traces": {**rej, "teacher": "student1", "top_k_logprobs": 8},
            "smol_traces": {**rej, "teacher": "smol", "top_k_logprobs": 8},
            "both": {"type": "mix", "datasets": ["student1_traces", "smol_traces"]},
            "pruned": {"type": "prune", "model": "smol", "calibration": "smol_traces", "layers": 2},
            "student2": {"type": "train", "student": "pruned", "data": "both", "epochs": 1, "batch_size": 4, "lr": 1e-3},
        },
    }
    if policy is not None:
        r["policy"] = policy
    return r


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def run(teachers, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-stage")
    with module_env(root):
        recipe = _write(root / "two.yaml", two_stage(teachers["gemma"], teachers["apache"], {"purpose": "research", "require_known_origin": True}))
        results = run_recipe(recipe, root / "ws")
    return {"ws": root / "ws", "results": results, **teachers}


def test_second_student_owes_both_original_teachers(run):
    res = run["results"]
    both = res["both"].manifest["signal"]["sources"]
    n1, n2 = (s["tokens"] for s in both)
    assert n1 > 0 and n2 > 0 and [s["parent"] for s in both] == [res["student1_traces"].id, res["smol_traces"].id]
    lin = load_lineage(ArtifactStore(run["ws"]), res["student2"].id)
    shares = {s.spec: s for s in teacher_shares(lin)}
    g, a = str(run["gemma"].resolve()), str(run["apache"].resolve())
    assert set(shares) == {g, a}
    assert shares[g].share == pytest.approx(n1 / (n1 + n2), abs=1e-6)
    assert shares[a].share == pytest.approx(n2 / (n1 + n2), abs=1e-6)
    (path, _), = shares[g].paths
    assert [lin.nodes[k].label for k in path[1:-1]] == ["both", "student1_traces", "student1", "gemma_for_smol", "gemma_traces"]
    # the manifest's teachers are the same original teachers, marked as derived from the lineage
    recorded = {t["spec"]: t["token_share"] for t in res["student2"].manifest["teachers"]}
    assert recorded == {k: pytest.approx(v.share, abs=1e-6) for k, v in shares.items()}
    assert all(t["derived"] for t in res["student2"].manifest["teachers"])
    # per-input token counts: SFT targets and KD tokens from the mixed data, nothing from the pruned student
    sig = res["student2"].manifest["signal"]["sources"]
    assert {s["role"] for s in sig} == {"sft-targets", "logit-kd"} and all(s["parent"] == res["both"].id for s in sig)


def test_gemma_obligations_reach_through_student1(run):
    res = run["results"]
    obs = obligations(load_lineage(ArtifactStore(run["ws"]), res["student2"].id))
    gemma = [o for o in obs if o["terms"] == "gemma-terms-of-use"]
    assert gemma and all(any("student1" in p for p in o["paths"]) for o in gemma)
    assert {o["rule"] for o in gemma} >= {"model-derivative", "prohibited-use"}


def test_saved_cards_carry_the_lineage(run):
    from huggingface_hub import ModelCard

    res = run["results"]
    s1 = ModelCard.load(res["student1"].file("README.md")).data.to_dict()
    assert s1["license"] == "other" and s1["distillation"]["teachers"][0]["terms"] == "gemma-terms-of-use"
    s2 = ModelCard.load(res["student2"].file("README.md")).data.to_dict()
    assert s2["license"] == "other" and set(s2["distillation"]["terms"]) == {"Apache-2.0", "gemma-terms-of-use"}
    assert {t["terms"] for t in s2["distillation"]["teachers"]} == {"Apache-2.0", "gemma-terms-of-use"}
    assert "distillation" in s2["tags"] and s2["base_model"] == [str(run["apache"].resolve())]
    # the policy the recipe ran under is in every data/model manifest
    assert res["student2"].manifest["policy"] == {"purpose": "research", "deny": [], "require_known_origin": True, "overrides": []}


def test_cli_from_answers_yes_and_no(run, capsys):
    sid = run["results"]["student2"].id
    main(["lineage", sid, "-w", str(run["ws"]), "--from", str(run["gemma"])])
    out = capsys.readouterr().out
    assert out.startswith("yes:") and "student1" in out
    with pytest.raises(SystemExit) as e:
        main(["lineage", run["results"]["student1"].id, "-w", str(run["ws"]), "--from", str(run["apache"])])
    assert e.value.code == 1 and "weights were initialised from" in capsys.readouterr().out


# -- policy ------------------------------------------------------------------------------------
@pytest.fixture
def no_models(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded or resolved before the policy check")

    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(models, "resolve", refuse)


def _refused(tmp_path, recipe: dict, match: str):
    ws = tmp_path / "ws"
    with pytest.raises(StillhouseError, match=match) as e:
        run_recipe(_write(tmp_path / "r.yaml", recipe), ws)
    assert "\n" not in str(e.value)
    assert not ws.exists() or not any(ws.rglob("manifest.json"))  # nothing ran
    return str(e.value)


def test_deny_refuses_before_any_model_loads(teachers, tmp_path, no_models):
    msg = _refused(tmp_path, two_stage(teachers["gemma"], teachers["apache"], {"deny": ["gemma-terms-of-use"]}),
                   "refuses stage 'gemma_traces'")
    assert str(teachers["gemma"]) in msg and "policy.deny: gemma-terms-of-use" in msg and "policy.allow" in msg


def test_policy_follows_terms_through_intermediate_models(teachers):
    recipe = parse_recipe(two_stage(teachers["gemma"], teachers["apache"]))
    plan = plan_sources(recipe)
    g = [s for s in plan["student2"] if s.spec == str(teachers["gemma"])]
    assert g and g[0].reach == "outputs" and g[0].via[:3] == ("both", "student1_traces", "student1")
    assert {s.reach for s in plan["pruned"]} == {"weights"}


def test_policy_reads_the_lineage_of_a_model_made_by_another_run(run, tmp_path, no_models):
    """student1 of the two-stage run, used as a plain path by a new recipe, still carries the Gemma terms."""
    student1 = str(run["results"]["student1"].path)
    recipe = {"name": "reuse", "policy": {"deny": ["gemma"]}, "models": {"s1": student1},
              "stages": {"problems": PROBLEMS,
                         "again": {"type": "rejection", "teacher": "s1", "tasks": "problems"}}}
    msg = _refused(tmp_path, recipe, "refuses stage 'again'")
    assert str(run["gemma"].resolve()) in msg and "gemma-terms-of-use" in msg and "through s1" in msg


def _import_recipe(tmp_path: Path, tok_dir: Path, origin: dict | None, policy: dict) -> dict:
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"What is {i}+1?", "completion": str(i + 1)}) for i in range(5)) + "\n")
    st = {"type": "import", "path": str(f), "tokenizer": str(tok_dir)}
    if origin is not None:
        st["origin"] = origin
    return {"name": "imp", "policy": policy, "stages": {"pairs": st}}


def test_commercial_purpose_refuses_api_outputs_with_the_clause(teachers, tmp_path, no_models):
    r = _import_recipe(tmp_path, teachers["apache"], {"api": "openai", "license": "openai-terms"}, {"purpose": "commercial"})
    msg = _refused(tmp_path, r, "policy \\(commercial\\) refuses stage 'pairs': teacher 'openai' under openai-terms")
    assert "OpenAI Terms of Use" in msg and "no-competing-models" in msg


def test_unknown_origin_refused_when_origin_required(teachers, tmp_path, no_models):
    r = _import_recipe(tmp_path, teachers["apache"], None, {"require_known_origin": True})
    _refused(tmp_path, r, "teacher 'unknown origin' under unknown: terms unknown")


def test_override_runs_and_is_recorded(teachers, tmp_path, capsys):
    allow = [{"source": "openai-terms", "rule": "no-competing-models", "reason": "internal evaluation model, never offered"}]
    r = _import_recipe(tmp_path, teachers["apache"], {"api": "openai", "license": "openai-terms"}, {"purpose": "commercial", "allow": allow})
    res = run_recipe(_write(tmp_path / "r.yaml", r), tmp_path / "ws")
    m = res["pairs"].manifest
    (ov,) = m["policy"]["overrides"]
    assert ov["rule"] == "no-competing-models" and ov["override"]["reason"].startswith("internal") and ov["source"] == "openai"
    assert m["origin"] == {"teacher": None, "api": "openai", "license": "openai-terms"} and m["counts"]["records"] == 5
    main(["lineage", res["pairs"].id, "-w", str(tmp_path / "ws"), "--from", "openai"])
    assert capsys.readouterr().out.startswith("yes:")


def test_undeclared_import_is_unknown_in_lineage(teachers, tmp_path, capsys):
    res = run_recipe(_write(tmp_path / "r.yaml", _import_recipe(tmp_path, teachers["apache"], None, {})), tmp_path / "ws")
    assert res["pairs"].manifest["warnings"] and res["pairs"].manifest["origin"] == {"declared": False}
    main(["lineage", res["pairs"].id, "-w", str(tmp_path / "ws")])
    assert "unknown origin" in capsys.readouterr().out


def test_import_errors_name_the_file(teachers, tmp_path):
    r = _import_recipe(tmp_path, teachers["apache"], None, {})
    r["stages"]["pairs"]["path"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(StillhouseError, match="stages.pairs.path: file not found: .*missing.jsonl"):
        parse_recipe(r, "r.yaml")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{nope\n')
    r["stages"]["pairs"]["path"] = str(bad)
    with pytest.raises(StillhouseError, match="bad.jsonl:2: not valid JSON"):
        run_recipe(_write(tmp_path / "r.yaml", r), tmp_path / "ws")
    assert not any((tmp_path / "ws").rglob("manifest.json"))


def test_builtin_two_stage_recipe_validates():
    r = load_recipe(builtin_recipe("two_stage"))
    assert r.policy is not None and r.policy.require_known_origin
    assert r.order()[-1] == "student2" and r.stages["both"].datasets == ["student1_traces", "smollm_traces"]


def test_policy_covers_api_teachers_and_data_engine_stages(teachers, tmp_path, no_models):
    # An API teacher declared under `teachers:` carries its terms into a `complete` stage, and
    # from there into a student trained on that data: refused before any request or load.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi"}\n')
    recipe = {
        "name": "api",
        "policy": {"purpose": "commercial"},
        "teachers": {"gpt": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-x", "terms": "openai-terms"}},
        "stages": {
            "answers": {"type": "complete", "teacher": "gpt", "prompts_file": str(prompts)},
        },
    }
    msg = _refused(tmp_path, recipe, "refuses stage 'answers': teacher 'openai:gpt-x' under openai-terms")
    assert "no-competing-models" in msg
    plan = plan_sources(parse_recipe({**recipe, "policy": None}))
    assert [(s.spec, s.reach) for s in plan["answers"]] == [("openai:gpt-x", "outputs")]
