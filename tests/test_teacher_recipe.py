"""Recipe-level teachers: the `teachers:` section, `ctx.teacher`, lineage and cost of an API teacher.

The rejection stage runs twice on a tiny teacher that has memorised its answers: once with
the model in process, once through `stillhouse serve` and the openai backend. The datasets
must be the same; the API run's manifest names the API model and its terms, counts tokens
and cost, and never holds the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stillhouse.api import run_recipe
from stillhouse.cli import main
from stillhouse.errors import StillhouseError
from stillhouse.records import read_rows
from stillhouse.recipe import parse_recipe
from stillhouse.runner import Runner
from stillhouse.serve import ServerThread, build_app

from support import module_env, one_thread
from test_pipeline_tiny import PROBLEMS, _train_teacher

SECRET = "sk-test-" + "Q7" * 16
PRICE = {"input_per_mtok": 2.0, "output_per_mtok": 8.0}


def _stages(teacher_ref: str) -> dict:
    return {
        "problems": PROBLEMS,
        "traces": {"type": "rejection", "teacher": teacher_ref, "tasks": "problems", "samples": 0,
                   "max_new_tokens": 4, "top_k_logprobs": 4, "batch_size": 8},
    }


def _api(base_url: str, tokenizer: Path, **overrides) -> dict:
    cfg = {"backend": "openai", "base_url": base_url, "model": "arith", "api_key_env": "SH_TEST_API_KEY",
           "terms": "arith-terms", "token_ids": True, "tokenizer": str(tokenizer), "price": PRICE}
    return cfg | overrides


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A teacher that solves most training problems, served over loopback."""
    root = tmp_path_factory.mktemp("api-recipe")
    with module_env(root, threads=False):
        with one_thread():
            _train_teacher(root / "teacher")
        app = build_app(str(root / "teacher"), served_name="arith")
    with ServerThread(app) as url:
        yield {"root": root, "teacher": root / "teacher", "url": url, "stats": app.state.stats}


@pytest.fixture(scope="module")
def both_runs(served, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    with module_env(root) as mp:
        mp.setenv("SH_TEST_API_KEY", SECRET)
        local = run_recipe(_write(root / "local.yaml", {"name": "local", "models": {"teacher": str(served["teacher"])},
                                                        "stages": _stages("teacher")}), root / "ws-local")
        api_recipe = _write(root / "api.yaml", {"name": "api", "teachers": {"api": _api(served["url"], served["teacher"])},
                                                "stages": _stages("api")})
        api = run_recipe(api_recipe, root / "ws-api")
        requests_after_first = served["stats"]["requests"]
        rerun = run_recipe(api_recipe, root / "ws-api", force=True)
        rerun_requests = served["stats"]["requests"] - requests_after_first
    return {"root": root, "local": local, "api": api, "rerun": rerun, "rerun_requests": rerun_requests}


def test_api_teacher_gives_the_same_dataset_as_the_local_model(both_runs):
    local = read_rows(both_runs["local"]["traces"].file("data.parquet"))
    api = read_rows(both_runs["api"]["traces"].file("data.parquet"))
    assert len(local) >= 4  # the memorised teacher passes most problems
    keys = ("id", "prompt", "prompt_ids", "completion", "completion_ids", "passed", "topk_ids")
    assert [{k: r[k] for k in keys} for r in api] == [{k: r[k] for k in keys} for r in local]
    for a, b in zip(api, local):
        assert all(abs(x - y) < 1e-4 for ra, rb in zip(a["topk_logprobs"], b["topk_logprobs"]) for x, y in zip(ra, rb))


def test_api_manifest_has_lineage_usage_and_cost_but_no_key(both_runs):
    m = both_runs["api"]["traces"].manifest
    (teacher,) = m["teachers"]
    assert teacher["spec"] == "openai:arith" and teacher["license"] == "arith-terms"
    assert teacher["weights_sha256"] is None
    usage = m["metrics"]["teacher_usage"]["api"]
    n_problems = m["metrics"]["problems"]
    assert usage["responses"] == usage["requests"] == n_problems and usage["cached_responses"] == 0
    expected = (usage["prompt_tokens"] * PRICE["input_per_mtok"] + usage["completion_tokens"] * PRICE["output_per_mtok"]) / 1e6
    assert usage["cost_usd"] == pytest.approx(expected) and usage["cost_usd"] > 0
    for ws in (both_runs["root"],):  # workspaces, caches, recipes: the key is nowhere on disk
        for p in ws.rglob("*"):
            if p.is_file():
                assert SECRET.encode() not in p.read_bytes(), p


def test_rerun_of_api_stage_costs_no_request(both_runs):
    assert both_runs["rerun_requests"] == 0
    usage = both_runs["rerun"]["traces"].manifest["metrics"]["teacher_usage"]["api"]
    assert usage["requests"] == 0 and usage["cost_usd"] == 0 and usage["cached_responses"] > 0
    assert both_runs["rerun"]["traces"].id == both_runs["api"]["traces"].id


def _cli_run(recipe: Path, ws: Path, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["run", str(recipe), "-w", str(ws)])
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("stillhouse: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # progress lines may precede it
    return errors[0]


def _only_tasks_artifact(ws: Path) -> None:
    manifests = [json.loads(p.read_text()) for p in ws.rglob("manifest.json")]
    assert [m["stage"] for m in manifests] == ["tasks"]
    assert not [p for p in ws.rglob("*") if "partial" in p.name]


def test_missing_key_variable_is_one_line_and_writes_nothing(served, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SH_TEST_API_KEY", raising=False)
    recipe = _write(tmp_path / "r.yaml", {"name": "k", "teachers": {"api": _api(served["url"], served["teacher"])}, "stages": _stages("api")})
    err = _cli_run(recipe, tmp_path / "ws", capsys)
    assert "SH_TEST_API_KEY" in err and "not set" in err
    _only_tasks_artifact(tmp_path / "ws")


def test_dead_endpoint_is_one_line_and_writes_nothing(served, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SH_TEST_API_KEY", SECRET)
    dead = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there
    recipe = _write(tmp_path / "r.yaml", {"name": "d", "teachers": {"api": _api(dead, served["teacher"])}, "stages": _stages("api")})
    err = _cli_run(recipe, tmp_path / "ws", capsys)
    assert "cannot reach endpoint" in err and dead in err and SECRET not in err
    _only_tasks_artifact(tmp_path / "ws")


# -- the recipe schema ------------------------------------------------------------------
def _recipe(teachers: dict, stages: dict | None = None, **extra) -> dict:
    return {"name": "t", "teachers": teachers, "stages": stages or {"problems": _stages("x")["problems"]}, **extra}


def test_artifact_id_covers_api_endpoint_model_and_terms_not_limits(tiny_model_dir):
    def key(**kw):
        r = parse_recipe(_recipe({"api": _api(kw.pop("base_url", "http://127.0.0.1:1/v1"), tiny_model_dir, **kw)}, _stages("api")))
        runner = Runner(r, Path("/nonexistent"))
        runner.results["problems"] = type("A", (), {"id": "p" * 20})()
        return runner._key("traces")[0]

    base = key()
    assert key(max_concurrency=2, requests_per_minute=10) == base
    assert key(base_url="http://10.0.0.1:8000/v1") != base  # another server: another source (issue 14)
    assert key(model="other") != base
    assert key(terms="other-terms") != base


@pytest.mark.parametrize(
    "teachers,stages,expect",
    [
        ({"api": {"backend": "nope", "model": "m"}}, None, "teachers.api: unknown backend"),
        ({"api": {"model": "m"}}, None, "teachers.api: teacher needs a 'backend'"),
        ({"api": {"backend": "openai", "base_url": "ftp://x", "model": "m"}}, None, "teachers.api.base_url"),
        ({"api": {"backend": "openai", "base_url": "http://x/v1", "model": "m", "api_key_env": SECRET}}, None, "teachers.api.api_key_env"),
        ({"api": {"backend": "openai", "base_url": "http://x/v1", "model": "m", "rpm": 3}}, None, "teachers.api.rpm: unknown key"),
        ({"problems": {"backend": "hf", "model": "smollm2-135m-instruct"}}, None, "teachers.problems: name is also a stage"),
        ({"api": {"backend": "hf", "model": "./missing-dir"}}, None, "teachers.api.model: model path not found"),
    ],
)
def test_bad_teacher_declarations_are_one_line(teachers, stages, expect):
    with pytest.raises(StillhouseError) as e:
        parse_recipe(_recipe(teachers, stages), "r.yaml")
    msg = str(e.value)
    assert msg.startswith("r.yaml: ") and expect in msg and "\n" not in msg
    assert SECRET not in msg  # a key pasted in place of a variable name is not echoed


def test_api_teacher_cannot_feed_white_box_stages(tiny_model_dir):
    stages = _stages("api")
    stages["distilled"] = {"type": "train", "student": str(tiny_model_dir), "data": "traces", "teacher": "api", "teacher_signal": "online"}
    with pytest.raises(StillhouseError, match=r"stages\.distilled\.teacher: teacher 'api' \(openai\) only generates text"):
        parse_recipe(_recipe({"api": _api("http://127.0.0.1:1/v1", tiny_model_dir)}, stages))


def test_hf_teacher_declaration_is_a_model_everywhere(tiny_model_dir):
    r = parse_recipe(_recipe({"local": {"backend": "hf", "model": str(tiny_model_dir), "batch_size": 4}}, _stages("local")))
    runner = Runner(r, Path("/nonexistent"))
    assert runner.spec_of("local") == str(tiny_model_dir)
    t = runner.teacher("local")
    assert type(t).__name__ == "HFTeacher" and t.batch_size == 4
    assert runner.teacher("local", batch_size=2).batch_size == 2
    assert runner.teacher(str(tiny_model_dir)).tokenizer is not None  # a plain spec keeps working


def test_show_renders_an_api_teacher(both_runs, capsys):
    main(["show", str(both_runs["api"]["traces"].path)])
    out = capsys.readouterr().out
    assert "openai:arith" in out and "arith-terms" in out and "teacher_usage" in out
