"""A full recipe on the tiny model, in-process: every stage type, lineage, reuse.

A random model never passes verification, so the teacher here is the tiny llama after a few
seconds of SFT that make it memorise the answers of most training problems. Everything
downstream (rejection sampling, pruning, cached and online KD, evaluation, the report) then
runs for real on it, in seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from stillhouse import models
from stillhouse.api import run_recipe
from stillhouse.records import read_rows
from stillhouse.recipe import load_recipe
from stillhouse.teachers.hf import render_chat
from stillhouse.train.loop import Example, TrainConfig, train
from stillhouse.verify.reasoning_gym import ReasoningGymVerifier, problems
from support import module_env

from conftest import assert_report, build_tiny_model, build_tokenizer

TASK_CFG = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
TRAIN = {"size": 8, "seed": 1}
EVAL = {"size": 4, "seed": 1000}
# the tasks and rejection stages the tiny recipes of several test modules share
PROBLEMS = {"type": "tasks", "task": "chain_sum", "config": TASK_CFG, "train": TRAIN, "eval": EVAL}
TRACES = {"type": "rejection", "teacher": "teacher", "tasks": "problems", "samples": 2, "temperature": 1.0,
          "max_new_tokens": 4, "keep_per_problem": 2, "top_k_logprobs": 8, "batch_size": 8}
MEMORISED = 6  # the teacher learns the first 6 training problems, not the last 2


def _recipe(teacher_dir: Path, distill_epochs: float = 2) -> dict:
    return {
        "name": "tiny-pipeline",
        "models": {"teacher": str(teacher_dir)},
        "stages": {
            "problems": PROBLEMS,
            "traces": TRACES,
            "pruned": {"type": "prune", "model": "teacher", "calibration": "traces", "layers": 2},
            "pruned_loss": {"type": "prune", "model": "teacher", "calibration": "traces", "layers": 3,
                            "method": "loss", "protect": [0]},
            "distilled": {"type": "train", "student": "pruned", "data": "traces", "epochs": distill_epochs,
                          "batch_size": 4, "lr": 1e-3, "log_to": ["tensorboard"]},
            "distilled_online": {"type": "train", "student": "pruned_loss", "data": "traces", "teacher": "teacher",
                                 "teacher_signal": "online", "epochs": 1, "heal_epochs": 1, "batch_size": 4,
                                 "temperature": 2.0},
            "evaluation": {"type": "eval", "tasks": "problems", "teacher": "teacher",
                           "models": {"teacher": "teacher", "pruned": "pruned", "distilled": "distilled"},
                           "max_new_tokens": 4, "batch_size": 4, "speed_batch": 4, "memory": False},
            "report": {"type": "report", "evals": ["evaluation"], "training": ["distilled"]},
        },
    }


def _train_teacher(out: Path) -> None:
    tok = build_tokenizer()
    models.prepare_tokenizer(tok)
    model = build_tiny_model(tok)
    examples = []
    for r in problems("chain_sum", TASK_CFG, TRAIN["size"], TRAIN["seed"])[:MEMORISED]:
        p = tok(render_chat(tok, [{"role": "user", "content": r["question"]}]), add_special_tokens=False)["input_ids"]
        c = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append(Example(p + c, len(p)))
    train(model, examples, TrainConfig(epochs=150, lr=1e-2, batch_size=8, sft_weight=1.0, kd_weight=0.0), tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "README.md").write_text("---\nlicense: mit\n---\n\n# tiny arithmetic teacher\n")


def run_tiny(tmp_path_factory, name: str, stages: dict) -> dict:
    """For other modules' fixtures: train the tiny teacher and run a recipe of PROBLEMS,
    TRACES and `stages` on it; returns its root, results and the teacher's directory."""
    root = tmp_path_factory.mktemp(name)
    with module_env(root):
        teacher = root / "teacher"
        _train_teacher(teacher)
        recipe = {"name": name, "models": {"teacher": str(teacher)},
                  "stages": {"problems": PROBLEMS, "traces": TRACES, **stages}}
        path = root / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        results = run_recipe(path, root / "ws")
    return {"root": root, "results": results, "teacher": teacher}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-pipeline")
    with module_env(root):
        teacher_dir = root / "teacher"
        _train_teacher(teacher_dir)
        recipe_path = root / "tiny.yaml"
        recipe_path.write_text(yaml.safe_dump(_recipe(teacher_dir), sort_keys=False))
        ws = root / "ws"
        t0 = time.perf_counter()
        results = run_recipe(recipe_path, ws)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with pytest.MonkeyPatch.context() as mp:  # reusing loads no model (not timed: the machine may be slow)
            mp.setattr("stillhouse.models.load", _no_model_load)
            again = run_recipe(recipe_path, ws)
        second_s = time.perf_counter() - t0
    return {"root": root, "ws": ws, "teacher_dir": teacher_dir, "recipe_path": recipe_path, "results": results,
            "again": again, "first_s": first_s, "second_s": second_s}


def test_every_stage_wrote_an_artifact(pipeline):
    results = pipeline["results"]
    recipe = load_recipe(pipeline["recipe_path"])
    assert list(results) == recipe.order()
    kinds = {"problems": "dataset", "traces": "dataset", "pruned": "model", "pruned_loss": "model",
             "distilled": "model", "distilled_online": "model", "evaluation": "eval", "report": "report"}
    for name, art in results.items():
        assert art.path == pipeline["ws"] / kinds[name] / art.id
        m = json.loads((art.path / "manifest.json").read_text())
        assert m["id"] == art.id and m["kind"] == kinds[name] and m["name"] == name
        assert m["recipe"] == "tiny-pipeline"
        assert m["stage"] == recipe.stages[name].type
    assert not [p for p in pipeline["ws"].rglob("*") if "partial" in p.name or p.name.endswith(".tmp")]


def test_parents_are_the_referenced_artifacts(pipeline):
    results = pipeline["results"]
    recipe = load_recipe(pipeline["recipe_path"])
    for name, art in results.items():
        expected = [results[ref].id for _, ref, _ in recipe.refs(name) if ref in recipe.stages]
        assert art.manifest["parents"] == expected, name
    assert results["problems"].manifest["parents"] == []
    assert results["distilled"].manifest["parents"] == [results["pruned"].id, results["traces"].id]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_traces_are_verified_teacher_answers_with_lineage(pipeline):
    results, teacher_dir = pipeline["results"], pipeline["teacher_dir"]
    m = results["traces"].manifest
    (t,) = m["teachers"]
    assert t["license"] == "mit"
    assert t["weights_sha256"] == _sha(teacher_dir / "model.safetensors")
    assert t["spec"] == str(teacher_dir.resolve())
    assert t["token_share"] == 1.0
    rows = read_rows(results["traces"].file("data.parquet"))
    assert m["counts"]["records"] == len(rows) >= 1
    train_rows = read_rows(results["problems"].file("train.parquet"))
    eval_rows = read_rows(results["problems"].file("eval.parquet"))
    assert m["metrics"]["problems"] == len(train_rows)
    assert 0 < m["metrics"]["greedy_pass_rate"] <= 1
    assert m["metrics"]["problems_covered"] >= 1
    tok = models.load(str(teacher_dir)).tokenizer
    verifier = ReasoningGymVerifier("chain_sum", TASK_CFG)
    by_id = {r["id"]: r for r in train_rows}
    eval_questions = {r["question"] for r in eval_rows}
    for r in rows:
        assert r["passed"] is True
        assert r["question"] not in eval_questions
        assert verifier(by_id[r["problem_id"]], r["completion"]).passed
        assert r["prompt_ids"] == tok(r["prompt"], add_special_tokens=False)["input_ids"]
        assert len(r["topk_ids"]) == len(r["topk_logprobs"]) == len(r["completion_ids"])
        assert all(len(row) == 8 for row in r["topk_ids"])
        if r["finish_reason"] == "stop":
            assert r["completion_ids"][-1] == tok.eos_token_id
    per_problem = {}
    for r in rows:
        per_problem.setdefault(r["problem_id"], []).append(r)
    assert all(len(v) <= 2 for v in per_problem.values())  # keep_per_problem


def test_pruned_models_are_plain_hf_dirs_with_cards(pipeline):
    results, teacher_dir = pipeline["results"], pipeline["teacher_dir"]
    for name, layers in (("pruned", 2), ("pruned_loss", 3), ("distilled", 2), ("distilled_online", 3)):
        art = results[name]
        model = AutoModelForCausalLM.from_pretrained(art.path)
        assert model.config.num_hidden_layers == layers == len(model.model.layers)
        assert art.manifest["counts"]["layers"] == layers
        assert art.manifest["counts"]["params"] == models.param_count(model)
        card = (art.path / "README.md").read_text()
        meta = yaml.safe_load(card.split("---")[1])
        assert "distillation" in meta
        assert meta["license"] == "mit"  # every source is MIT
        assert meta["distillation"]["parents"] == art.manifest["parents"]
        (base,) = art.manifest["base_models"]
        assert base["spec"] == str(teacher_dir.resolve())
        assert base["weights_sha256"] == _sha(teacher_dir / "model.safetensors")
    pm = results["pruned"].manifest["metrics"]
    assert len(pm["importance"]) == 4 and len(pm["kept_layers"]) == 2
    assert sorted(pm["kept_layers"] + pm["dropped_layers"]) == [0, 1, 2, 3]
    assert pm["params_after"] < pm["params_before"]
    lm = results["pruned_loss"].manifest["metrics"]
    assert lm["method"] == "loss" and 0 in lm["kept_layers"] and len(lm["kept_layers"]) == 3


def test_model_card_names_its_own_artifact(pipeline):
    for name in ("pruned", "distilled"):
        art = pipeline["results"][name]
        card = (art.path / "README.md").read_text()
        meta = yaml.safe_load(card.split("---")[1])
        assert meta["distillation"]["artifact_id"] == art.id, f"{name}: card names artifact {meta['distillation']['artifact_id']!r}"
        assert f"(artifact `{art.id}`)" in card


def test_pruned_model_weights_are_the_teachers_kept_layers(pipeline):
    art = pipeline["results"]["pruned"]
    kept = art.manifest["metrics"]["kept_layers"]
    teacher = AutoModelForCausalLM.from_pretrained(pipeline["teacher_dir"])
    student = AutoModelForCausalLM.from_pretrained(art.path)
    for new, old in enumerate(kept):
        a, b = student.model.layers[new].state_dict(), teacher.model.layers[old].state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (new, old, k)


def test_artifact_model_identity_says_artifact(pipeline):
    ident = models.load(str(pipeline["results"]["pruned"].path)).identity
    assert ident.license == "mit"
    assert ident.source == "artifact", f"a model artifact directory is reported as {ident.source!r}"


def test_training_history_and_teacher_shares(pipeline):
    results = pipeline["results"]
    for name in ("distilled", "distilled_online"):
        art = results[name]
        hist = [json.loads(x) for x in art.file("metrics.jsonl").read_text().splitlines()]
        assert len(hist) == art.manifest["metrics"]["steps"] > 0
        assert all(math.isfinite(h["loss"]) and h["kl"] >= -1e-6 for h in hist)
        shares = art.manifest["teachers"]
        assert len(shares) == 1  # data and KD teacher are the same model
        assert shares[0]["token_share"] == pytest.approx(1.0)
        assert shares[0]["derived"]  # the original teacher, from the lineage
        assert {s["role"] for s in art.manifest["signal"]["sources"]} == {"sft-targets", "logit-kd"}
    online = [json.loads(x) for x in results["distilled_online"].file("metrics.jsonl").read_text().splitlines()]
    assert {h["phase"] for h in online} == {"heal", "task"}
    assert results["distilled_online"].manifest["counts"]["heal_records"] > 0


def test_eval_results(pipeline):
    art = pipeline["results"]["evaluation"]
    res = json.loads(art.file("results.json").read_text())
    assert res["teacher"] == "teacher" and res["split"] == "test"  # the tasks stage's held-out split
    ms = res["models"]
    assert list(ms) == ["teacher", "pruned", "distilled"]
    for label, r in ms.items():
        assert 0.0 <= r["pass_at_1"] <= 1.0
        assert r["decode_tok_per_s"] > 0
        assert r["n_problems"] == EVAL["size"]
    assert ms["teacher"]["role"] == "teacher" and "kl_to_teacher" not in ms["teacher"]
    for label in ("pruned", "distilled"):
        r = ms[label]
        assert r["role"] == "student"
        assert r["params"] < ms["teacher"]["params"]
        assert r["layers"] == 2
        assert math.isfinite(r["kl_to_teacher"]) and r["kl_to_teacher"] >= 0
        assert r["artifact"] == pipeline["results"][label].id
        assert r["params_vs_teacher"] == pytest.approx(r["params"] / ms["teacher"]["params"])
    outputs = read_rows(art.file("outputs.parquet"))
    assert len(outputs) == 3 * EVAL["size"]


def test_report(pipeline):
    md = assert_report(pipeline["results"]["report"])
    assert pipeline["results"]["evaluation"].id in md
    assert "evaluation: chain_sum (test split)" in md  # every figure names its split
    assert "![training loss, KL to teacher and learning rate](training.png)" in md  # curves of `distilled`
    assert f"`{pipeline['results']['distilled'].id}` (metrics.jsonl)" in md


def test_training_curves_also_in_tensorboard(pipeline):
    pytest.importorskip("tensorboard")
    from test_tracking import assert_matches_history

    art = pipeline["results"]["distilled"]
    history = [json.loads(x) for x in art.file("metrics.jsonl").read_text().splitlines()]
    assert_matches_history(art.path / "tensorboard" / "distilled", history)
    assert not (pipeline["results"]["distilled_online"].path / "tensorboard").exists()  # only when asked


def test_rerun_reuses_every_stage(pipeline):
    first, again = pipeline["results"], pipeline["again"]
    assert {k: a.id for k, a in again.items()} == {k: a.id for k, a in first.items()}
    for name in first:
        assert again[name].manifest["created_at"] == first[name].manifest["created_at"]
    # the second run loaded no model (models.load raised if called: see the fixture)


def _no_model_load(*a, **k):
    raise AssertionError("a rerun of finished stages loaded a model")


def test_changed_stage_recomputes_only_downstream(pipeline, tmp_path):
    recipe_path = tmp_path / "changed.yaml"
    recipe_path.write_text(yaml.safe_dump(_recipe(pipeline["teacher_dir"], distill_epochs=1), sort_keys=False))
    first = pipeline["results"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STILLHOUSE_CACHE", str(pipeline["root"] / "cache"))
        changed = run_recipe(load_recipe(recipe_path), pipeline["ws"])
    same = {"problems", "traces", "pruned", "pruned_loss", "distilled_online"}
    for name in first:
        if name in same:
            assert changed[name].id == first[name].id, name
        else:
            assert changed[name].id != first[name].id, name
    assert changed["distilled"].manifest["config"]["epochs"] == 1


def test_force_recomputes_with_the_same_id(tmp_path, monkeypatch):
    d = {"name": "tasks-only", "stages": {"problems": PROBLEMS}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    ws = tmp_path / "ws"
    a = run_recipe(path, ws)["problems"]
    mf = a.path / "manifest.json"
    stamp = mf.stat().st_mtime_ns
    rows = read_rows(a.file("train.parquet"))
    b = run_recipe(path, ws)["problems"]
    assert b.id == a.id and mf.stat().st_mtime_ns == stamp
    time.sleep(0.01)
    c = run_recipe(path, ws, force=True)["problems"]
    assert c.id == a.id and mf.stat().st_mtime_ns != stamp
    assert read_rows(c.file("train.parquet")) == rows  # same config, same problems
    assert [p.name for p in (ws / "dataset").iterdir()] == [a.id]
