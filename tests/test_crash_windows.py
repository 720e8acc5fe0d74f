"""Kill points placed deliberately in the windows a random kill rarely hits (crashpoints.py):
after the merge, between the manifest and the rename, after the rename, inside the clean-up.
Each is followed by a rerun that must give the uninterrupted result, accept finished work
instead of redoing it, and leave no half artifact, orphan or spent scratch behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from stillhouse import workspace
from stillhouse.api import run_recipe
from stillhouse.artifacts import MANIFEST, ArtifactStore
from stillhouse.errors import StillhouseError
from stillhouse.records import read_rows
from support import subprocess_env

N_PROMPTS, SHARD = 8, 2


class Killed(BaseException):
    """What a SIGKILL does to the code after it: nothing runs (no except StillhouseError handler)."""


def _recipe(tmp_path: Path, model_dir: Path, train: bool = False) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(N_PROMPTS)))
    stages = {"answers": {"type": "complete", "teacher": "teacher", "prompts_file": str(prompts), "samples": 2,
                          "temperature": 0.8, "max_new_tokens": 6, "batch_size": 4, "shard_size": SHARD}}
    if train:
        stages["student"] = {"type": "train", "student": "teacher", "data": "answers", "epochs": 2, "batch_size": 4,
                             "sft_weight": 1.0, "kd_weight": 0.0, "lr": 1e-3, "checkpoint_every": 1}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "windows", "models": {"teacher": str(model_dir)}, "stages": stages}))
    return path


def _visible(ws: Path) -> list[Path]:
    """Every non-hidden directory under a kind folder must be a complete artifact."""
    return [d for k in ("dataset", "model") if (ws / k).is_dir() for d in (ws / k).iterdir() if not d.name.startswith(".")]


def _kill_at(monkeypatch, point: str):
    monkeypatch.setenv("STILLHOUSE_CRASH_AT", point)

    def fake_kill(pid, sig):
        assert sig == signal.SIGKILL
        raise Killed(point)

    monkeypatch.setattr(os, "kill", fake_kill)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ref")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STILLHOUSE_CACHE", str(root / "cache"))
        mp.setenv("STILLHOUSE_QUIET", "1")
        rows = read_rows(run_recipe(_recipe(root, tiny_model_dir), root / "ws")["answers"].file("data.parquet"))
    assert len(rows) == 2 * N_PROMPTS
    return rows


@pytest.mark.parametrize("point", ["dataset-merged", "before-rename", "after-rename", "mid-tidy"])
def test_a_kill_in_each_finish_window_loses_nothing_and_wedges_nothing(tmp_path, tiny_model_dir, reference, monkeypatch, point):
    recipe, ws = _recipe(tmp_path, tiny_model_dir), tmp_path / "ws"
    with monkeypatch.context() as mp:
        _kill_at(mp, point)
        with pytest.raises(Killed):
            run_recipe(recipe, ws)
    for d in _visible(ws):  # never a half artifact in view
        assert (d / MANIFEST).is_file() and read_rows(d / "data.parquet") == reference
    # the rerun must not generate again when the work was finished: generation would hit this
    with monkeypatch.context() as mp:
        if point != "dataset-merged":
            _kill_at(mp, "dataset-merged")
        art = run_recipe(recipe, ws)["answers"]
    assert read_rows(art.file("data.parquet")) == reference  # 0 lost, 0 duplicated, same records
    assert art.manifest["counts"]["records"] == 2 * N_PROMPTS
    assert not (art.path / "shards").exists()
    assert [p.name for p in (ws / "dataset").iterdir()] == [art.id]  # no partial, no orphan


def test_a_killed_train_stage_keeps_its_checkpoints_and_a_finished_model_is_accepted(tmp_path, tiny_model_dir, monkeypatch):
    recipe, ws = _recipe(tmp_path, tiny_model_dir, train=True), tmp_path / "ws"
    ckpts = ws / "checkpoints"
    # killed after saving the model, before its manifest: the checkpoints must survive the kill
    with monkeypatch.context() as mp:
        _kill_at(mp, "model-saved")
        mp.setattr(workspace.shutil, "rmtree", lambda *a, **k: None)  # a SIGKILL runs no clean-up either
        import stillhouse.fsutil as fsutil

        mp.setattr(fsutil.shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(Killed):
            run_recipe(recipe, ws)
    assert any(ckpts.glob("student-*/*/step-*")), "the kill lost the training run's checkpoints"
    orphans = list((ws / "model").glob(".*.partial"))
    assert orphans and not _visible(ws)[1:]
    # killed again between the manifest and the rename: the rerun after must accept that model
    with monkeypatch.context() as mp:
        _kill_at(mp, "before-rename")
        mp.setattr(__import__("stillhouse.fsutil").fsutil.shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(Killed):
            run_recipe(recipe, ws, resume=True)
    with monkeypatch.context() as mp:
        _kill_at(mp, "model-saved")  # training again would hit this
        res = run_recipe(recipe, ws)
    model = res["student"]
    assert model.manifest["metrics"]["steps"] > 0 and (model.path / "model.safetensors").is_file()
    assert [p.name for p in (ws / "model").iterdir()] == [model.id]  # the orphans are gone
    assert not list(ckpts.glob("*")), "spent checkpoints were left behind"


def test_force_waits_for_the_writer_and_never_mixes_two_runs(tmp_path, tiny_model_dir, reference):
    """The race of issue 19: `run --force` while another run writes the same artifact."""
    recipe, ws = _recipe(tmp_path, tiny_model_dir), tmp_path / "ws"
    store = ArtifactStore(ws)
    first = run_recipe(recipe, ws)["answers"]
    aid = first.id
    # a "first run" holds the artifact's lock; a --force run must wait for it, not delete its work
    held, release = threading.Event(), threading.Event()

    def writer():
        with workspace.artifact_lock(store, "dataset", aid):
            held.set()
            release.wait()

    t = threading.Thread(target=writer)
    t.start()
    held.wait()
    proc = subprocess.Popen([sys.executable, "-m", "stillhouse.cli", "run", str(recipe), "-w", str(ws), "--force"],
                            env=subprocess_env(STILLHOUSE_CACHE=str(tmp_path / "c2")), stderr=subprocess.PIPE, text=True)
    err = ""
    while "waiting for it" not in err:  # waits on the lock, however long the start-up takes
        line = proc.stderr.readline()
        assert line or proc.poll() is None, f"--force did not wait for the lock: {err}"
        err += line
    assert (store.path_for("dataset", aid) / "data.parquet").is_file()  # nothing discarded while waiting
    release.set()
    t.join()
    _, rest = proc.communicate(timeout=600)
    assert proc.returncode == 0, err + rest
    assert read_rows(store.get("dataset", aid).file("data.parquet")) == reference


def test_finishing_refuses_a_dataset_whose_committed_units_are_not_its_units(tmp_path):
    from stillhouse.data.shards import Shards, run_units

    work = lambda u, items: ([{"id": str(x)} for x in items], {})  # noqa: E731
    units = [[0, 1], [2, 3]]
    run_units("s", tmp_path, units, work, "t")
    Shards(tmp_path).write(7, [{"id": "stray"}], {})  # a unit this stage does not have
    with pytest.raises(StillhouseError, match=r"wrong units .*1 unexpected"):
        run_units("s", tmp_path, units, work, "t")
    # a marker whose shard is gone (an older clean-up order) is redone, not trusted
    (tmp_path / "shards" / "unit-000007.json").unlink()
    (tmp_path / "shards" / "unit-000001.parquet").unlink()
    calls = []
    run_units("s", tmp_path, units, lambda u, i: calls.append(u) or work(u, i), "t")
    assert calls == [1] and Shards(tmp_path).records() == 4
