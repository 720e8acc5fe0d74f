"""The `stillhouse` command in a subprocess: user errors are one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stillhouse.verify.reasoning_gym import problems

# Five-digit operands: every answer has at least 5 characters, so a completion of at most
# 4 tokens (one character each with the tiny tokenizer) can never be correct.
HARD_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 5, "max_digits": 5}
TRAIN = {"size": 4, "seed": 1}
EVAL = {"size": 4, "seed": 100}
MAX_NEW = 4


def _env(cache: Path) -> dict:
    env = os.environ.copy()
    env.update(STILLHOUSE_CACHE=str(cache), STILLHOUSE_QUIET="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_cli(args, cwd: Path, cache: Path, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stillhouse.cli", *args],
        cwd=cwd, env=_env(cache), capture_output=True, text=True, timeout=timeout,
    )


def _artifact_dirs(ws: Path) -> list[Path]:
    return [p.parent for p in ws.rglob("manifest.json")] if ws.exists() else []


def _partials(ws: Path) -> list[Path]:
    return [p for p in ws.rglob("*") if "partial" in p.name] if ws.exists() else []


def assert_user_error(proc, *culprits, only_line=True):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("stillhouse: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    if only_line:
        assert lines == errors, f"expected exactly one stderr line, got:\n{proc.stderr}"
    else:
        assert lines[-1] == errors[0], proc.stderr
    for c in culprits:
        assert c in errors[0], (c, errors[0])
    return errors[0]


def tasks_stage(task="chain_sum", config=HARD_SUM):
    return {"type": "tasks", "task": task, "config": config, "train": TRAIN, "eval": EVAL}


def write_recipe(path: Path, models: dict, stages: dict, name="tiny") -> Path:
    path.write_text(yaml.safe_dump({"name": name, "models": models, "stages": stages}, sort_keys=False))
    return path


@pytest.fixture
def cache(tmp_path) -> Path:
    c = tmp_path / "cache"
    c.mkdir()
    return c


def test_missing_recipe_file(tmp_path, cache):
    proc = run_cli(["run", "absent.yaml", "-w", "ws"], tmp_path, cache)
    assert_user_error(proc, "absent.yaml")
    assert not (tmp_path / "ws").exists()


def test_malformed_recipe(tmp_path, cache):
    (tmp_path / "broken.yaml").write_text("name: x\nstages:\n  a: {type: tasks\n")
    proc = run_cli(["run", "broken.yaml", "-w", "ws"], tmp_path, cache)
    assert_user_error(proc, "broken.yaml", "malformed YAML")
    assert _artifact_dirs(tmp_path / "ws") == []


def test_unknown_task(tmp_path, cache, tiny_model_dir):
    write_recipe(tmp_path / "r.yaml", {"teacher": str(tiny_model_dir)}, {"problems": tasks_stage(task="no_such_task")})
    proc = run_cli(["run", "r.yaml", "-w", "ws"], tmp_path, cache)
    assert_user_error(proc, "r.yaml", "stages.problems.task", "no_such_task")
    assert _artifact_dirs(tmp_path / "ws") == []


@pytest.mark.parametrize("where", ["models", "stage"])
@pytest.mark.parametrize("spec", ["./no-such-model", "ABS"])
def test_teacher_is_a_missing_model_path(tmp_path, cache, where, spec):
    spec = str(tmp_path / "gone" / "model") if spec == "ABS" else spec
    rejection = {"type": "rejection", "teacher": "teacher" if where == "models" else spec, "tasks": "problems"}
    models = {"teacher": spec} if where == "models" else {}
    write_recipe(tmp_path / "r.yaml", models, {"problems": tasks_stage(), "traces": rejection})
    proc = run_cli(["run", "r.yaml", "-w", "ws"], tmp_path, cache)
    key = "models.teacher" if where == "models" else "stages.traces.teacher"
    assert_user_error(proc, "r.yaml", key, spec)
    assert _artifact_dirs(tmp_path / "ws") == []


def test_validate(tmp_path, cache, tiny_model_dir):
    write_recipe(tmp_path / "r.yaml", {"teacher": str(tiny_model_dir)},
                 {"problems": tasks_stage(), "traces": {"type": "rejection", "teacher": "teacher", "tasks": "problems"}})
    proc = run_cli(["validate", "r.yaml"], tmp_path, cache)
    assert proc.returncode == 0, proc.stderr
    assert "problems -> traces" in proc.stdout


def test_show_unknown_artifact(tmp_path, cache):
    proc = run_cli(["show", "deadbeef", "-w", "ws"], tmp_path, cache)
    assert_user_error(proc, "deadbeef")


# -- a real run with the tiny model that fails verification ---------------------------------
@pytest.fixture(scope="module")
def failed_run(tmp_path_factory, tiny_model_dir):
    answers = [r["answer"] for r in problems("chain_sum", HARD_SUM, TRAIN["size"], TRAIN["seed"])]
    assert all(len(a) > MAX_NEW for a in answers), answers  # a correct answer is impossible
    root = tmp_path_factory.mktemp("cli-run")
    cache = root / "cache"
    cache.mkdir()
    stages = {
        "problems": tasks_stage(),
        "traces": {"type": "rejection", "teacher": "teacher", "tasks": "problems", "samples": 1,
                   "max_new_tokens": MAX_NEW, "batch_size": 8},
    }
    write_recipe(root / "tiny.yaml", {"teacher": str(tiny_model_dir)}, stages)
    proc = run_cli(["run", "tiny.yaml", "-w", "ws"], root, cache)
    return {"root": root, "ws": root / "ws", "cache": cache, "proc": proc}


def test_run_that_fails_verification(failed_run):
    proc, ws = failed_run["proc"], failed_run["ws"]
    err = assert_user_error(proc, "traces", "verification", only_line=False)
    assert "4 problems" in err
    arts = _artifact_dirs(ws)
    assert len(arts) == 1, arts  # the completed tasks stage is kept, nothing else
    m = json.loads((arts[0] / "manifest.json").read_text())
    assert m["stage"] == "tasks" and m["kind"] == "dataset" and m["name"] == "problems"
    assert arts[0] == ws / "dataset" / m["id"]
    assert m["counts"]["train"] == 4 and m["counts"]["eval"] == 4
    assert (arts[0] / "train.parquet").is_file() and (arts[0] / "eval.parquet").is_file()
    assert sorted(p.name for p in (ws / "dataset").iterdir()) == [m["id"]]
    assert _partials(ws) == []
    assert _partials(failed_run["root"]) == []


def test_rerun_reuses_the_tasks_artifact(failed_run):
    ws = failed_run["ws"]
    # files only: the failing stage's temp dir comes and goes inside ws/dataset
    # (the per-artifact lock files in .locks/ record each run's pid: not artifacts)
    before = {p: p.stat().st_mtime_ns for p in ws.rglob("*") if p.is_file() and ".locks" not in p.parts}
    proc = run_cli(["run", "tiny.yaml", "-w", "ws"], failed_run["root"], failed_run["cache"])
    assert_user_error(proc, "verification", only_line=False)
    after = {p: p.stat().st_mtime_ns for p in ws.rglob("*") if p.is_file() and ".locks" not in p.parts}
    assert after == before


def _tasks_manifest(failed_run) -> dict:
    (mf,) = list(failed_run["ws"].rglob("manifest.json"))
    return json.loads(mf.read_text())


def test_show_prints_stage_and_id(failed_run):
    m = _tasks_manifest(failed_run)
    for ref in (m["id"], m["id"][:8], str(failed_run["ws"] / "dataset" / m["id"])):
        proc = run_cli(["show", ref, "-w", "ws"], failed_run["root"], failed_run["cache"])
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout + proc.stderr
        assert m["id"] in out
        assert "tasks" in out and "problems" in out
        assert "Traceback" not in out


def test_show_writes_to_stdout(failed_run):
    """`stillhouse show ID > file` must capture the manifest: it is the command's output."""
    m = _tasks_manifest(failed_run)
    proc = run_cli(["show", m["id"], "-w", "ws"], failed_run["root"], failed_run["cache"])
    assert proc.returncode == 0, proc.stderr
    assert m["id"] in proc.stdout and "tasks" in proc.stdout, f"stdout={proc.stdout!r} stderr={proc.stderr!r}"


def test_show_json(failed_run):
    m = _tasks_manifest(failed_run)
    proc = run_cli(["show", "--json", m["id"], "-w", "ws"], failed_run["root"], failed_run["cache"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data == m
