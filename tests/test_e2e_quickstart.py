"""End to end: the built-in quickstart recipe, shrunk, with the real packaged teacher.

Runs in-process so it shares the session's converted SmolLM2 cache with test_models.py.
About 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import yaml
from transformers import AutoModelForCausalLM

from stillhouse.api import run_recipe
from stillhouse.records import read_rows
from stillhouse.recipe import builtin_recipe, load_recipe

from conftest import assert_report

pytestmark = pytest.mark.slow

STAGES = ["problems", "traces", "pruned", "distilled", "evaluation", "report"]


def _shrunk_quickstart() -> dict:
    d = yaml.safe_load(builtin_recipe("quickstart").read_text())
    s = d["stages"]
    s["problems"]["train"]["size"] = 40
    s["problems"]["eval"]["size"] = 24
    s["traces"]["samples"] = 2
    s["traces"]["max_new_tokens"] = 16
    s["pruned"]["layers"] = 12
    s["distilled"]["epochs"] = 1
    s["evaluation"]["max_new_tokens"] = 16
    return d


@pytest.fixture(scope="module")
def quickstart_run(smollm_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    recipe_path = root / "quickstart-small.yaml"
    recipe_path.write_text(yaml.safe_dump(_shrunk_quickstart(), sort_keys=False))
    ws = root / "ws"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STILLHOUSE_CACHE", str(smollm_session["cache"]))
        mp.setenv("STILLHOUSE_QUIET", "1")
        t0 = time.perf_counter()
        first = run_recipe(recipe_path, ws)
        first_s = time.perf_counter() - t0
        created = {name: json.loads((a.path / "manifest.json").read_text())["created_at"] for name, a in first.items()}
        t0 = time.perf_counter()
        mp.setattr("stillhouse.models.load", _no_model_load)  # reusing loads no model (not timed: the machine may be slow)
        second = run_recipe(recipe_path, ws)
        second_s = time.perf_counter() - t0
    return {"ws": ws, "recipe_path": recipe_path, "first": first, "second": second,
            "first_s": first_s, "second_s": second_s, "created": created}


def test_every_stage_has_an_artifact(quickstart_run):
    first = quickstart_run["first"]
    assert list(first) == STAGES
    for name, art in first.items():
        m = json.loads((art.path / "manifest.json").read_text())
        assert m["id"] == art.id and m["name"] == name
        assert art.path.parent.parent == quickstart_run["ws"]
    assert not [p for p in quickstart_run["ws"].rglob("*") if "partial" in p.name]


def test_parents_are_referenced_stages(quickstart_run):
    first = quickstart_run["first"]
    recipe = load_recipe(quickstart_run["recipe_path"])
    for name, art in first.items():
        expected = [first[ref].id for _, ref, _ in recipe.refs(name) if ref in recipe.stages]
        assert art.manifest["parents"] == expected, name
    assert first["traces"].manifest["parents"] == [first["problems"].id]
    assert set(first["evaluation"].manifest["parents"]) == {first[n].id for n in ("problems", "pruned", "distilled")}


def test_traces_record_the_teacher(quickstart_run):
    m = quickstart_run["first"]["traces"].manifest
    (t,) = m["teachers"]
    assert t["spec"] == "smollm2-135m-instruct"
    assert t["license"] == "Apache-2.0"
    assert t["source"] == "builtin"
    assert m["counts"]["records"] > 0
    rows = read_rows(quickstart_run["first"]["traces"].file("data.parquet"))
    assert len(rows) == m["counts"]["records"]
    assert all(r["passed"] for r in rows)
    assert all(len(r["topk_ids"]) == len(r["completion_ids"]) for r in rows)


@pytest.mark.parametrize("name", ["pruned", "distilled"])
def test_student_models_load_and_carry_cards(quickstart_run, name):
    art = quickstart_run["first"][name]
    model = AutoModelForCausalLM.from_pretrained(art.path)
    assert model.config.num_hidden_layers == 12 == len(model.model.layers)
    card = (art.path / "README.md").read_text()
    assert "distillation:" in card
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "apache-2.0"  # the hub's id for the lineage's one licence
    assert meta["base_model"] == ["smollm2-135m-instruct"]


def test_eval_results(quickstart_run):
    res = json.loads(quickstart_run["first"]["evaluation"].file("results.json").read_text())
    ms = res["models"]
    assert set(ms) == {"teacher", "pruned", "distilled"}
    for r in ms.values():
        assert 0.0 <= r["pass_at_1"] <= 1.0
        assert r["decode_tok_per_s"] > 0
        assert r["n_problems"] == 24
    assert ms["teacher"]["layers"] == 30
    for label in ("pruned", "distilled"):
        r = ms[label]
        assert r["params"] < ms["teacher"]["params"]
        assert r["layers"] == 12
        assert math.isfinite(r["kl_to_teacher"]) and r["kl_to_teacher"] >= 0


def test_report(quickstart_run):
    assert_report(quickstart_run["first"]["report"])


def test_second_run_reuses_everything(quickstart_run):
    first, second = quickstart_run["first"], quickstart_run["second"]
    assert {k: a.id for k, a in second.items()} == {k: a.id for k, a in first.items()}
    for name, art in second.items():
        assert json.loads((art.path / "manifest.json").read_text())["created_at"] == quickstart_run["created"][name]
    # and loaded no model (models.load raised if called: see the fixture)


def _no_model_load(*a, **k):
    raise AssertionError("a rerun of finished stages loaded a model")
