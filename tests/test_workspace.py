"""Bad workspaces and bad inputs: a one-line error and exit 2, never a traceback, nothing
half-written; a full disk keeps earlier work and the rerun continues when space is back."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from stillhouse.api import run_recipe
from stillhouse.artifacts import ArtifactStore
from stillhouse.cli import main
from stillhouse.records import read_rows

TASKS = {"type": "tasks", "task": "chain_sum", "train": {"size": 4, "seed": 1}, "eval": {"size": 2, "seed": 100}}


def cli(capsys, *args) -> tuple[int, str]:
    """Run the CLI in this process; (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


def one_line_error(code: int, err: str, *culprits: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("stillhouse: error:"), (code, err)
    for c in culprits:
        assert c in lines[0], (c, lines[0])
    return lines[0]


def recipe(tmp_path: Path, stages: dict, models: dict | None = None, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"name": "ws", "models": models or {}, "stages": stages}))
    return p


@contextlib.contextmanager
def tmpfs(path: Path, size: str, ro: bool = False):
    """A small real file system (root only: the caller falls back to another real means)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_workspace_that_is_a_file_or_read_only(tmp_path, capsys):
    r = recipe(tmp_path, {"problems": TASKS})
    afile = tmp_path / "ws.txt"
    afile.write_text("not a directory")
    one_line_error(*cli(capsys, "run", r, "-w", afile), "ws.txt", "not a directory")
    ro = tmp_path / "ro"
    if os.geteuid() == 0:  # root ignores permissions: a read-only mount
        with tmpfs(ro, "1m", ro=True):
            one_line_error(*cli(capsys, "run", r, "-w", ro), "not writable")
    else:
        ro.mkdir()
        ro.chmod(0o555)
        one_line_error(*cli(capsys, "run", r, "-w", ro), "not writable")
        ro.chmod(0o755)


@pytest.mark.parametrize("bad", ["[1, 2]", '{"id": "x"', '{"id": 3, "kind": "dataset"}', ""])
def test_a_corrupt_manifest_is_never_reused_and_force_replaces_it(tmp_path, capsys, bad):
    r, ws = recipe(tmp_path, {"problems": TASKS}), tmp_path / "ws"
    art = run_recipe(r, ws)["problems"]
    good = art.manifest
    (art.path / "manifest.json").write_text(bad)
    one_line_error(*cli(capsys, "show", art.id[:8], "-w", ws), f"dataset/{art.id}", "--force")
    one_line_error(*cli(capsys, "run", r, "-w", ws), f"dataset/{art.id}", "--force")
    assert cli(capsys, "run", r, "-w", ws, "--force")[0] == 0
    again = ArtifactStore(ws).get("dataset", art.id)
    assert again.manifest["counts"] == good["counts"]


def test_validate_checks_model_directories_and_prompt_files_without_loading(tmp_path, capsys, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    nocfg = tmp_path / "model"
    nocfg.mkdir()
    (nocfg / "model.safetensors").write_bytes(b"")
    stage = {"type": "complete", "teacher": "t", "prompts_file": str(prompts)}
    one_line_error(*cli(capsys, "validate", recipe(tmp_path, {"a": stage}, {"t": str(nocfg)})), "stages.a.teacher", "config.json")
    one_line_error(*cli(capsys, "validate", recipe(tmp_path, {"a": {**stage, "prompts_file": str(empty)}}, {"t": str(tiny_model_dir)})),
                   "stages.a", "empty.jsonl", "empty")
    # run refuses the same way before any model loads
    one_line_error(*cli(capsys, "run", recipe(tmp_path, {"a": {**stage, "prompts_file": str(empty)}}, {"t": str(tiny_model_dir)}),
                        "-w", tmp_path / "ws"), "empty")
    assert cli(capsys, "validate", recipe(tmp_path, {"a": stage}, {"t": str(tiny_model_dir)}))[0] == 0


def test_an_over_long_prompt_is_refused_or_truncated_as_the_recipe_says(tmp_path, capsys, tiny_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": "long " * 200}) + "\n")  # > 512 tokens
    stage = {"type": "complete", "teacher": "t", "prompts_file": str(prompts), "max_new_tokens": 4}
    r = recipe(tmp_path, {"a": stage}, {"t": str(tiny_model_dir)})
    one_line_error(*cli(capsys, "run", r, "-w", tmp_path / "ws"), "context of 512 tokens", "too_long: truncate")
    assert not ArtifactStore(tmp_path / "ws").all()
    art = run_recipe(recipe(tmp_path, {"a": {**stage, "too_long": "truncate"}}, {"t": str(tiny_model_dir)}), tmp_path / "ws")["a"]
    rows = read_rows(art.file("data.parquet"))
    assert art.manifest["counts"]["truncated_prompts"] == 1 and "truncated" in art.manifest["warnings"][0]
    assert len(rows) == 2 and max(len(r["prompt_ids"]) for r in rows) + 4 <= 512


def _fill(ws: Path, leave: int) -> Path:
    """Fill a file system until `leave` bytes are free."""
    st = os.statvfs(ws)
    filler = ws / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_disk_full_keeps_earlier_work_and_the_rerun_continues(tmp_path, capsys, tiny_model_dir, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(12)))
    first = {"type": "complete", "teacher": "t", "prompts_file": str(prompts), "max_new_tokens": 8, "shard_size": 2}
    second = {**first, "seed": 1, "samples": 4, "max_new_tokens": 24}
    models = {"t": str(tiny_model_dir)}
    ref = read_rows(run_recipe(recipe(tmp_path, {"a": first, "b": second}, models), tmp_path / "ref")["b"].file("data.parquet"))
    ws = tmp_path / "ws"
    with tmpfs(ws, "4m") if os.geteuid() == 0 else contextlib.nullcontext(ws.mkdir()):
        run_recipe(recipe(tmp_path, {"a": first}, models), ws)
        if os.geteuid() == 0:  # a real full disk: a few KB left, less than stage b needs
            filler = _fill(ws, 24 * 1024)
        else:  # no mount without root: the file system's answer, injected after two shards
            import pyarrow.parquet as pq

            real, calls = pq.write_table, []

            def full(*a, **k):
                calls.append(1)
                if len(calls) > 2:
                    raise OSError(errno.ENOSPC, "No space left on device", str(a[1]))
                return real(*a, **k)

            monkeypatch.setattr(pq, "write_table", full)
        both = recipe(tmp_path, {"a": first, "b": second}, models)
        line = one_line_error(*cli(capsys, "run", both, "-w", ws), "stage 'b'", "no space left on device", "1 finished artifacts",
                              "run the same command to continue")
        store = ArtifactStore(ws)
        assert len(store.all()) == 1 and read_rows(store.all()[0].file("data.parquet"))  # stage a intact
        assert not [p for p in ws.rglob("*.tmp")], "a stray temporary file holds space"
        kept = list(ws.glob("dataset/.*.partial/shards/unit-*.json"))
        assert kept, line  # the shards written before the disk filled are kept
        if os.geteuid() == 0:
            filler.unlink()  # space is back
        else:
            monkeypatch.undo()
        assert cli(capsys, "run", both, "-w", ws)[0] == 0
        rows = read_rows(ArtifactStore(ws).find(run_recipe(both, ws)["b"].id).file("data.parquet"))
    assert rows == ref
