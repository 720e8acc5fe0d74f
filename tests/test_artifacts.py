"""Artifact ids, the atomic artifact store, and atomic file writes."""

from __future__ import annotations

import json
import os

import pytest

from stillhouse import __version__
from stillhouse.artifacts import MANIFEST, Artifact, ArtifactStore, artifact_id
from stillhouse.errors import StillhouseError
from stillhouse.fsutil import atomic_dir, write_json_atomic, write_text_atomic


def _all_entries(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_artifact_id_is_stable():
    a = artifact_id("dataset", "tasks", {"size": 4, "nested": {"x": 1, "y": [1, 2]}}, ["p1", "p2"])
    b = artifact_id("dataset", "tasks", {"nested": {"y": [1, 2], "x": 1}, "size": 4}, ["p1", "p2"])
    assert a == b  # key order does not matter
    assert artifact_id("dataset", "tasks", {"size": 4, "nested": {"x": 1, "y": [1, 2]}}, ["p2", "p1"]) == a
    assert len(a) == 20 and all(ch in "0123456789abcdef" for ch in a)


def test_artifact_id_changes_with_inputs():
    base = artifact_id("dataset", "tasks", {"size": 4}, ["p1"])
    assert artifact_id("dataset", "tasks", {"size": 5}, ["p1"]) != base
    assert artifact_id("dataset", "tasks", {"size": 4}, ["p2"]) != base
    assert artifact_id("dataset", "tasks", {"size": 4}, ["p1", "p2"]) != base
    assert artifact_id("dataset", "tasks", {"size": 4}, []) != base
    assert artifact_id("model", "tasks", {"size": 4}, ["p1"]) != base
    assert artifact_id("dataset", "rejection", {"size": 4}, ["p1"]) != base
    assert artifact_id("dataset", "tasks", {"size": 4}, ["p1"], code_version="999") != base


def test_artifact_id_rejects_unknown_kind():
    with pytest.raises(ValueError):
        artifact_id("banana", "tasks", {}, [])


def test_create_writes_manifest_with_documented_fields(tmp_path):
    store = ArtifactStore(tmp_path)
    cfg = {"task": "chain_sum", "train": {"size": 4}}
    aid = artifact_id("dataset", "tasks", cfg, ["parent1"])
    with store.create("dataset", aid, stage="tasks", name="problems", config=cfg, parents=["parent1"], recipe="r") as w:
        assert w.path.exists() and w.path != store.path_for("dataset", aid)
        (w.path / "data.txt").write_text("payload")
        w.counts["train"] = 4
        w.metrics["coverage"] = 0.5
        w.warnings.append("careful")
        w.teachers.append({"spec": "t", "license": "mit"})
        w.extra["task"] = {"name": "chain_sum"}
    final = tmp_path / "dataset" / aid
    assert (final / "data.txt").read_text() == "payload"
    m = json.loads((final / MANIFEST).read_text())
    for key in ("id", "kind", "stage", "config", "parents", "created_at", "stillhouse_version",
                "teachers", "counts", "metrics", "warnings"):
        assert key in m, key
    assert m["id"] == aid
    assert m["kind"] == "dataset"
    assert m["stage"] == "tasks"
    assert m["name"] == "problems"
    assert m["recipe"] == "r"
    assert m["config"] == cfg
    assert m["parents"] == ["parent1"]
    assert m["stillhouse_version"] == __version__
    assert m["code_version"].startswith(__version__ + "+")
    assert m["teachers"] == [{"spec": "t", "license": "mit"}]
    assert m["counts"] == {"train": 4}
    assert m["metrics"] == {"coverage": 0.5}
    assert m["warnings"] == ["careful"]
    assert m["task"] == {"name": "chain_sum"}
    from datetime import datetime

    assert datetime.fromisoformat(m["created_at"]).tzinfo is not None
    # nothing but the final directory is left behind
    assert [p.name for p in (tmp_path / "dataset").iterdir()] == [aid]
    art = store.get("dataset", aid)
    assert art is not None and art.id == aid and art.kind == "dataset" and art.file("data.txt") == final / "data.txt"


def test_exception_inside_create_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    aid = artifact_id("model", "prune", {}, [])
    with pytest.raises(RuntimeError, match="boom"):
        with store.create("model", aid, stage="prune", name="pruned", config={}, parents=[]) as w:
            (w.path / "weights.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert not store.path_for("model", aid).exists()
    assert store.get("model", aid) is None
    leftovers = [e for e in _all_entries(tmp_path) if "partial" in e or aid in e]
    assert leftovers == []
    assert not any((tmp_path / "model").iterdir())


def test_keyboard_interrupt_inside_create_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with store.create("dataset", "abc", stage="tasks", name="n", config={}, parents=[]) as w:
            (w.path / "f").write_text("x")
            raise KeyboardInterrupt
    assert list((tmp_path / "dataset").iterdir()) == []


def _make(store, kind, aid, stage="tasks"):
    with store.create(kind, aid, stage=stage, name=stage, config={}, parents=[]):
        pass
    return store.path_for(kind, aid)


def test_find_by_path_id_and_prefix(tmp_path):
    store = ArtifactStore(tmp_path)
    p1 = _make(store, "dataset", "aaaa1111")
    _make(store, "dataset", "aaaa2222")
    p3 = _make(store, "model", "bbbb3333", stage="prune")
    assert store.find(str(p1)).id == "aaaa1111"
    assert store.find("aaaa1111").path == p1
    assert store.find("bbbb3333").kind == "model"
    assert store.find("bbb").path == p3  # unique prefix
    with pytest.raises(StillhouseError, match="ambiguous"):
        store.find("aaaa")
    with pytest.raises(StillhouseError) as ei:
        store.find("cccc")
    assert "cccc" in str(ei.value)
    assert [a.id for a in store.all()] == ["aaaa1111", "aaaa2222", "bbbb3333"]


def test_find_in_missing_workspace_raises(tmp_path):
    with pytest.raises(StillhouseError):
        ArtifactStore(tmp_path / "nowhere").find("abc")


def test_open_rejects_non_artifacts(tmp_path):
    with pytest.raises(StillhouseError, match="manifest"):
        Artifact.open(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(StillhouseError, match="corrupt"):
        Artifact.open(tmp_path)


def test_write_text_atomic_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    write_json_atomic(tmp_path / "sub" / "x.json", {"a": 1})
    assert target.read_text() == "two"
    assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path / "sub")) == ["file.txt", "x.json"]


def test_write_text_atomic_failure_keeps_old_content(tmp_path):
    target = tmp_path / "file.txt"
    write_text_atomic(target, "old")

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        write_text_atomic(target, Boom())  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"]


def test_atomic_dir_replaces_and_cleans(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(final)) == ["b"]
    with pytest.raises(ValueError):
        with atomic_dir(final) as tmp:
            (tmp / "c").write_text("3")
            raise ValueError
    assert sorted(os.listdir(final)) == ["b"]
    assert os.listdir(tmp_path) == ["out"]
