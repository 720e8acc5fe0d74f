"""Recipe validation: one-line errors naming the file and the key; stages in dependency order."""

from __future__ import annotations

import copy

import pytest
import yaml

from stillhouse.errors import StillhouseError
from stillhouse.recipe import Recipe, builtin_recipe, load_recipe, parse_recipe

QUICKSTART_ORDER = ["problems", "traces", "pruned", "distilled", "evaluation", "report"]


@pytest.fixture(scope="module")
def quickstart_data() -> dict:
    return yaml.safe_load(builtin_recipe("quickstart").read_text())


def _write(tmp_path, data, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_quickstart_validates_and_orders():
    r = load_recipe(builtin_recipe("quickstart"))
    assert isinstance(r, Recipe)
    assert r.name == "quickstart"
    assert r.order() == QUICKSTART_ORDER
    assert r.models == {"teacher": "smollm2-135m-instruct"}
    assert r.stages["pruned"].layers <= 15  # at most half of SmolLM2-135M's 30 blocks
    assert r.stages["traces"].top_k_logprobs > 0
    assert r.stage_deps("distilled") == ["pruned", "traces"]
    assert r.stage_deps("evaluation") == ["problems", "pruned", "distilled"]


def test_order_follows_dependencies_not_file_order(quickstart_data):
    d = copy.deepcopy(quickstart_data)
    d["stages"] = dict(reversed(list(d["stages"].items())))
    r = parse_recipe(d, "reversed.yaml")
    order = r.order()
    assert order[0] == "problems" and order[-1] == "report"
    for name in order:
        for dep in r.stage_deps(name):
            assert order.index(dep) < order.index(name)


def test_builtin_recipe_unknown():
    with pytest.raises(StillhouseError, match="nope"):
        builtin_recipe("nope")


def _unknown_key(d):
    d["stages"]["traces"]["samplez"] = 3


def _unknown_top_key(d):
    d["modles"] = {}


def _wrong_type(d):
    d["stages"]["traces"]["samples"] = "many"


def _wrong_nested_type(d):
    d["stages"]["problems"]["train"]["size"] = "big"


def _out_of_range(d):
    d["stages"]["pruned"]["layers"] = 0


def _unknown_stage_type(d):
    d["stages"]["traces"]["type"] = "bake"


def _missing_type(d):
    del d["stages"]["traces"]["type"]


def _missing_field(d):
    del d["stages"]["pruned"]["calibration"]  # (layers became optional: width pruning needs none)


def _unknown_task(d):
    d["stages"]["problems"]["task"] = "no_such_task"


def _unknown_model(d):
    d["models"]["teacher"] = "no-such-model"


def _unknown_model_in_stage(d):
    d["stages"]["pruned"]["model"] = "no-such-model"


def _missing_model_path(d):
    d["models"]["teacher"] = "./no/such/dir"


def _missing_stage_ref(d):
    d["stages"]["distilled"]["data"] = "nostage"


def _data_field_names_model_stage(d):
    d["stages"]["distilled"]["data"] = "pruned"


def _eval_tasks_not_tasks_stage(d):
    d["stages"]["evaluation"]["tasks"] = "traces"


def _report_evals_not_eval(d):
    d["stages"]["report"]["evals"] = ["pruned"]


def _report_training_not_train(d):
    d["stages"]["report"]["training"] = ["pruned"]


ERROR_CASES = [
    (_unknown_key, "stages.traces.samplez", "unknown key"),
    (_unknown_top_key, "modles", "unknown key"),
    (_wrong_type, "stages.traces.samples", "integer"),
    (_wrong_nested_type, "stages.problems.train.size", "integer"),
    (_out_of_range, "stages.pruned.layers", "greater than 0"),
    (_unknown_stage_type, "stages.traces", "bake"),
    (_missing_type, "stages.traces", "type"),
    (_missing_field, "stages.pruned.calibration", "required"),
    (_unknown_task, "stages.problems.task", "no_such_task"),
    (_unknown_model, "models.teacher", "no-such-model"),
    (_unknown_model_in_stage, "stages.pruned.model", "no-such-model"),
    (_missing_model_path, "models.teacher", "./no/such/dir"),
    (_missing_stage_ref, "stages.distilled.data", "nostage"),
    (_data_field_names_model_stage, "stages.distilled.data", "pruned"),
    (_eval_tasks_not_tasks_stage, "stages.evaluation.tasks", "traces"),
    (_report_evals_not_eval, "stages.report.evals[0]", "pruned"),
    (_report_training_not_train, "stages.report.training[0]", "pruned"),
]


@pytest.mark.parametrize("mutate,key,detail", ERROR_CASES, ids=[c[0].__name__.strip("_") for c in ERROR_CASES])
def test_recipe_errors_name_file_and_key(tmp_path, quickstart_data, mutate, key, detail):
    d = copy.deepcopy(quickstart_data)
    mutate(d)
    path = _write(tmp_path, d, "my-recipe.yaml")
    with pytest.raises(StillhouseError) as ei:
        load_recipe(path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: "), msg
    assert f" {key}: " in msg, msg
    assert detail in msg, msg


def test_data_field_pointing_at_model_stage_says_so(tmp_path, quickstart_data):
    d = copy.deepcopy(quickstart_data)
    d["stages"]["distilled"]["data"] = "pruned"
    with pytest.raises(StillhouseError, match=r"stage 'pruned' produces a model, not a dataset"):
        load_recipe(_write(tmp_path, d))


@pytest.mark.parametrize(
    "edges",
    [
        # pruned.model -> distilled and distilled.student -> pruned
        {"pruned": ("model", "distilled"), "distilled": ("student", "pruned")},
        # a stage naming itself
        {"traces": ("tasks", "traces")},
    ],
    ids=["two-stage-cycle", "self-reference"],
)
def test_cycle_is_rejected_naming_file_and_stages(tmp_path, quickstart_data, edges):
    d = copy.deepcopy(quickstart_data)
    for stage, (fld, ref) in edges.items():
        d["stages"][stage][fld] = ref
    path = _write(tmp_path, d, "cyclic.yaml")
    with pytest.raises(StillhouseError) as ei:
        load_recipe(path)
    msg = str(ei.value)
    assert "cycle" in msg
    for stage in edges:
        assert stage in msg
    assert str(path) in msg, f"cycle error does not name the recipe file: {msg!r}"


def test_malformed_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nstages:\n  a: [1, 2\n")
    with pytest.raises(StillhouseError) as ei:
        load_recipe(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "malformed YAML" in msg
    assert "line" in msg


def test_recipe_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(StillhouseError, match="mapping") as ei:
        load_recipe(path)
    assert str(path) in str(ei.value)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(StillhouseError) as ei:
        load_recipe(path)
    assert str(path) in str(ei.value)
    assert "not found" in str(ei.value)


def test_empty_stages_rejected(tmp_path):
    path = _write(tmp_path, {"name": "x", "stages": {}}, "empty.yaml")
    with pytest.raises(StillhouseError, match="stages") as ei:
        load_recipe(path)
    assert str(path) in str(ei.value)


def test_model_path_recipe_accepts_existing_dir(tmp_path, tiny_model_dir):
    d = {
        "name": "tiny",
        "models": {"teacher": str(tiny_model_dir)},
        "stages": {
            "problems": {"type": "tasks", "task": "chain_sum", "train": {"size": 4}, "eval": {"size": 4, "seed": 9}},
            "traces": {"type": "rejection", "teacher": "teacher", "tasks": "problems"},
        },
    }
    r = load_recipe(_write(tmp_path, d))
    assert r.order() == ["problems", "traces"]
    assert r.stages["traces"].samples == 4  # defaults filled in
    assert [(f, t, ref.expects) for f, t, ref in r.refs("traces")] == [("teacher", "teacher", "model"), ("tasks", "problems", "dataset")]


def test_low_memory_with_clipping_is_refused_when_the_recipe_loads(tmp_path, quickstart_data):
    d = copy.deepcopy(quickstart_data)
    d["stages"]["distilled"]["low_memory"] = True
    with pytest.raises(StillhouseError, match=r"stages\.distilled.*low_memory: .*set grad_clip: 0") as ei:
        load_recipe(_write(tmp_path, d))
    assert "\n" not in str(ei.value)
    d["stages"]["distilled"]["grad_clip"] = 0
    assert load_recipe(_write(tmp_path, d)).stages["distilled"].low_memory is True
