"""The stage registry (stages.py): one declaration per stage type, read by the recipe parser,
the runner and the licence policy; validating a recipe never imports torch."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from typing import Literal

import pytest
import yaml

from stillhouse.errors import StillhouseError
from stillhouse.lineage.policy import plan_sources
from stillhouse.recipe import parse_recipe
from stillhouse.stages import DATASET, STAGES, Ref, StageType, register
from stillhouse.strict import Strict

from support import subprocess_env

# Every stage type once, referring to each other (no model is loaded: hub ids are only checked by shape).
ALL_STAGES = {
    "tasks": {"type": "tasks", "task": "basic_arithmetic", "train": {"size": 4}, "eval": {"size": 2}},
    "rej": {"type": "rejection", "teacher": "base", "tasks": "tasks"},
    "imp": {"type": "import", "path": "IMPORT", "tokenizer": "base", "origin": {"teacher": "org/x", "license": "apache-2.0"}},
    "mix": {"type": "mix", "datasets": ["rej", "imp"], "tokenizer": "base"},
    "comp": {"type": "complete", "teacher": "base", "prompts": "tasks", "decontaminate": ["tasks", "humaneval"]},
    "pref": {"type": "preference", "teacher": "base", "judge": "other", "prompts": "comp"},
    "crit": {"type": "critique_revise", "teacher": "base", "prompts": "tasks"},
    "si": {"type": "self_instruct", "teacher": "base", "prompts": "comp"},
    "short": {"type": "filter", "data": "rej", "max_completion_tokens": 8},
    "prune": {"type": "prune", "model": "base", "calibration": "rej", "layers": 2},
    "scratch": {"type": "scratch", "teacher": "base", "layers": 2, "hidden_size": 32, "heads": 2},
    "cache": {"type": "cache_logits", "teacher": "base", "data": "rej"},
    "train": {"type": "train", "student": "prune", "data": "short", "teacher": "base", "teacher_signal": "online"},
    "cached": {"type": "train", "student": "scratch", "data": "mix", "teacher": "base", "logit_cache": "cache"},
    "onp": {"type": "onpolicy", "student": "train", "teacher": "base", "data": "rej"},
    "cross": {"type": "cross_tokenizer", "student": "other", "teacher": "base", "data": "rej"},
    "ev": {"type": "eval", "tasks": "tasks", "teacher": "base", "models": {"a": "train", "b": "onp"}},
    "rep": {"type": "report", "evals": ["ev"], "training": ["train"]},
    "cmp": {"type": "compare", "models": ["base", "train"], "suites": ["rg:basic_arithmetic,size=2"]},
    "arts": {"type": "report_artifacts", "artifacts": ["/nowhere/eval/0123"]},
}


@pytest.fixture
def every_stage(tmp_path) -> dict:
    data = tmp_path / "imported.jsonl"
    data.write_text('{"prompt": "hi", "completion": "there"}\n')
    stages = copy.deepcopy(ALL_STAGES)
    stages["imp"]["path"] = str(data)
    return {"name": "all", "models": {"base": "org/base", "other": "org/other"}, "stages": stages}


def test_the_recipe_above_covers_every_registered_stage_type():
    assert {s["type"] for s in ALL_STAGES.values()} == set(STAGES)


def test_validate_does_not_import_torch(tmp_path, every_stage):
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(every_stage))
    probe = (
        "import sys\n"
        "from stillhouse.cli import app\n"
        f"try:\n    app(['validate', {str(path)!r}])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"{path}: ok (20 stages" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "False False"  # a loaded torch would print True


def test_references_follow_the_registry_declarations(every_stage):
    r = parse_recipe(every_stage)
    assert [(f, t) for f, t, _ in r.refs("comp")] == [("teacher", "base"), ("prompts", "tasks"), ("decontaminate[0]", "tasks")]
    assert [(f, t) for f, t, _ in r.refs("ev")] == [("teacher", "base"), ("tasks", "tasks"), ("models.a", "train"), ("models.b", "onp")]
    assert r.stage_deps("cached") == ["scratch", "mix", "cache"]
    assert r.order().index("short") < r.order().index("train")


def test_what_each_reference_carries_reaches_the_policy(every_stage):
    plan = plan_sources(parse_recipe(every_stage))
    reach = {name: {(s.spec, s.reach, s.via) for s in srcs} for name, srcs in plan.items()}
    assert reach["scratch"] == set()  # only the teacher's tokenizer and shape
    assert reach["ev"] == reach["rep"] == reach["cmp"] == reach["arts"] == set()  # measuring carries nothing on
    assert reach["prune"] == {("org/base", "weights", ())}  # calibration text only picks layers
    assert reach["imp"] == {("org/x", "outputs", ())}  # the declared origin
    assert reach["pref"] == {("org/base", "outputs", ()), ("org/other", "outputs", ()), ("org/base", "outputs", ("comp",))}
    # an online teacher shapes the student; a cached run's teacher reaches it only through the cache
    assert ("org/base", "outputs", ()) in reach["train"]
    assert ("org/base", "outputs", ()) not in reach["cached"] and ("org/base", "outputs", ("cache",)) in reach["cached"]
    assert ("org/base", "outputs", ("short", "rej")) in reach["train"]  # through the filter stage


@pytest.mark.parametrize("stage, field, value, message", [
    ("rep", "training", ["ev"], "stages.rep.training[0]: stage 'ev' produces a eval, not a model"),
    ("rep", "training", ["prune"], "stages.rep.training[0]: stage 'prune' is not a train stage"),
    ("rej", "tasks", "comp", "stages.rej.tasks: stage 'comp' is not a tasks stage"),
    ("train", "logit_cache", "rej", "stages.train.logit_cache: stage 'rej' produces a dataset, not a logit_cache"),
    ("mix", "datasets", ["rej", "nowhere"], "stages.mix.datasets[1]: unknown stage 'nowhere'"),
])
def test_a_wrong_reference_is_one_line_naming_the_field(every_stage, stage, field, value, message):
    every_stage["stages"][stage][field] = value
    with pytest.raises(StillhouseError, match=f"^all: {re.escape(message)}$"):
        parse_recipe(every_stage, "all")


def test_api_teachers_only_where_the_registry_allows_text(every_stage):
    every_stage["teachers"] = {"api": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    every_stage["stages"]["comp"]["teacher"] = "api"  # text is enough
    parse_recipe(every_stage)
    every_stage["stages"]["train"]["teacher"] = "api"  # logits are not
    with pytest.raises(StillhouseError, match="stages.train.teacher: teacher 'api' \\(openai\\) only generates text"):
        parse_recipe(every_stage)
    every_stage["stages"]["train"]["teacher"] = "base"
    every_stage["stages"]["pref"]["judge"] = "api"
    with pytest.raises(StillhouseError, match="stages.pref.judge: 'api' is a openai teacher, not a model"):
        parse_recipe(every_stage)


def test_every_registered_stage_runs_through_an_importable_function():
    for entry in STAGES.values():
        assert callable(entry.run_function()), entry.name


def test_registering_checks_the_declaration():
    class Odd(Strict):
        type: Literal["odd"]
        data: str

    with pytest.raises(ValueError, match="registered twice"):
        register(StageType("tasks", Odd, DATASET, "x:y"))
    with pytest.raises(ValueError, match="Odd.type must be Literal\\['even'\\]"):
        register(StageType("even", Odd, DATASET, "x:y"))
    with pytest.raises(ValueError, match="Odd has no field 'prompts'"):
        register(StageType("odd", Odd, DATASET, "x:y", refs=(Ref("prompts", DATASET),)))
    assert "odd" not in STAGES and "even" not in STAGES
