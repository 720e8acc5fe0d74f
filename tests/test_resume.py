"""Resumable generation for real: `stillhouse run` on a tiny model, killed with SIGKILL mid-way,
interrupted with Ctrl-C (SIGINT), then rerun; the final dataset equals an uninterrupted run's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stillhouse.api import run_recipe
from stillhouse.artifacts import ArtifactStore
from stillhouse.data.shards import Shards, run_units
from stillhouse.records import read_rows
from serve_support import wait_for
from support import subprocess_env

N_PROMPTS, SHARD = 96, 4
UNITS = N_PROMPTS // SHARD


def _recipe(tmp_path: Path, model_dir: Path) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about the number {i}."}) + "\n" for i in range(N_PROMPTS)))
    recipe = {
        "name": "resume",
        "models": {"teacher": str(model_dir)},
        "stages": {"answers": {"type": "complete", "teacher": "teacher", "prompts_file": str(prompts), "samples": 2,
                               "temperature": 0.8, "max_new_tokens": 24, "batch_size": 8, "shard_size": SHARD,
                               "system_prompt": "Be brief."}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _spawn(recipe: Path, ws: Path) -> subprocess.Popen:
    # an ignored SIGINT is inherited across exec: a suite started in the background (a shell's `&`
    # ignores it) would give the child a Ctrl-C it cannot see. A handler is reset to the default.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return subprocess.Popen([sys.executable, "-m", "stillhouse.cli", "run", str(recipe), "-w", str(ws)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _partial(ws: Path) -> Path | None:
    hits = list((ws / "dataset").glob(".*.partial")) if (ws / "dataset").exists() else []
    return hits[0] if hits else None


def _wait_for_units(proc: subprocess.Popen, ws: Path, at_least: int, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        part = _partial(ws)
        done = len(list((part / "shards").glob("unit-*.json"))) if part and (part / "shards").exists() else 0
        if done >= at_least:
            return done
        assert proc.poll() is None, f"run ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no shard was written in time")


def test_kill_and_ctrl_c_then_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir)
    reference = read_rows(run_recipe(recipe, tmp_path / "ref")["answers"].file("data.parquet"))
    assert len(reference) == 2 * N_PROMPTS

    ws = tmp_path / "ws"
    proc = _spawn(recipe, ws)
    _wait_for_units(proc, ws, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    part = _partial(ws)
    killed_at = len(list((part / "shards").glob("unit-*.json")))
    assert 2 <= killed_at < UNITS
    assert all(p.name.endswith(".partial") for p in (ws / "dataset").iterdir())  # no finished artifact

    proc = _spawn(recipe, ws)
    _wait_for_units(proc, ws, killed_at + 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Run the same command again to continue" in err
    kept = Shards(part).markers()
    assert killed_at + 2 <= len(kept) < UNITS, "Ctrl-C lost or never wrote finished shards"

    proc = _spawn(recipe, ws)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    art = ArtifactStore(ws).all()[0]
    rows = read_rows(art.file("data.parquet"))
    assert [r["id"] for r in rows] == [r["id"] for r in reference]
    assert len({r["id"] for r in rows}) == len(rows)  # nothing duplicated
    assert rows == reference  # same completions, token ids and provenance: resume changed nothing
    assert _partial(ws) is None and not (art.path / "shards").exists()
    assert art.manifest["counts"]["records"] == 2 * N_PROMPTS


def test_run_units_skips_committed_units_and_keeps_them_on_ctrl_c(tmp_path):
    calls = []

    def work(u, items):
        calls.append(u)
        if u == 3 and len(calls) < 5:
            raise KeyboardInterrupt
        return [{"id": f"r{x}", "value": x, "maybe": None if u % 2 else [x]} for x in items], {"n": len(items)}

    units = [list(range(i, i + 3)) for i in range(0, 15, 3)]
    with pytest.raises(KeyboardInterrupt):
        run_units("s", tmp_path, units, work, "t")
    assert calls == [0, 1, 2, 3] and Shards(tmp_path).records() == 9
    shards = run_units("s", tmp_path, units, work, "t")
    assert calls == [0, 1, 2, 3, 3, 4]  # only the unfinished units ran again
    n = shards.merge(tmp_path / "data.parquet", keep=lambda r: r["value"] != 7)
    rows = read_rows(tmp_path / "data.parquet")
    assert n == 14 and [r["value"] for r in rows] == [x for x in range(15) if x != 7]
    assert rows[0]["maybe"] == [0] and rows[3]["maybe"] is None  # null-typed shard columns unified
    assert [s["n"] for s in shards.stats()] == [3] * 5


def test_resumable_artifact_keeps_its_work_dir_across_a_failure(tmp_path):
    store = ArtifactStore(tmp_path)
    kw = dict(stage="complete", name="x", config={}, parents=[], resumable=True)
    with pytest.raises(RuntimeError):
        with store.create("dataset", "abc", **kw) as out:
            (out.path / "progress.txt").write_text("half")
            raise RuntimeError("crash")
    assert (store.partial_path("dataset", "abc") / "progress.txt").read_text() == "half"
    assert store.get("dataset", "abc") is None
    with store.create("dataset", "abc", **kw) as out:
        assert (out.path / "progress.txt").read_text() == "half"  # continued, not restarted
    assert store.get("dataset", "abc") is not None and not store.partial_path("dataset", "abc").exists()
    # non-resumable stages still discard a failed attempt
    with pytest.raises(RuntimeError):
        with store.create("dataset", "def", stage="s", name="y", config={}, parents=[]) as out:
            raise RuntimeError
    assert list((tmp_path / "dataset").iterdir()) == [tmp_path / "dataset" / "abc"]


def test_a_second_run_of_the_same_stage_is_refused_while_the_first_writes(tmp_path):
    from stillhouse.errors import StillhouseError

    def work(u, items):
        with pytest.raises(StillhouseError, match="being written by another stillhouse run"):
            run_units("s", tmp_path, [[1]], lambda u, i: ([], {}), "t")
        return [{"id": str(x)} for x in items], {}

    run_units("s", tmp_path, [[1, 2]], work, "t")
    assert Shards(tmp_path).records() == 2


def test_user_errors_discard_the_work_dir_unless_raised_while_generating(tmp_path):
    from stillhouse.errors import EmptyDatasetError, StillhouseError

    store = ArtifactStore(tmp_path)
    kw = dict(stage="complete", name="x", config={}, parents=[], resumable=True)
    with pytest.raises(EmptyDatasetError):
        with store.create("dataset", "empty", **kw) as out:
            run_units("s", out.path, [[1]], lambda u, i: ([], {}), "t")
            raise EmptyDatasetError("nothing left")  # a rerun would fail the same way
    assert not store.partial_path("dataset", "empty").exists()

    def dead_endpoint(u, items):
        if u == 1:
            raise StillhouseError("endpoint http://localhost:1 unreachable")
        return [{"id": str(u)}], {}

    with pytest.raises(StillhouseError, match="unreachable"):
        with store.create("dataset", "dead", **kw) as out:
            run_units("s", out.path, [[1], [2]], dead_endpoint, "t")
    assert Shards(store.partial_path("dataset", "dead")).records() == 1  # kept for the rerun

    with pytest.raises(StillhouseError, match="unreachable"):
        with store.create("dataset", "never", **kw) as out:
            run_units("s", out.path, [[1], [2]], lambda u, i: dead_endpoint(1, i), "t")
    assert not store.partial_path("dataset", "never").exists()  # nothing committed: nothing left


N_API = 32


def test_ctrl_c_with_api_requests_in_flight_abandons_them_cleanly(tmp_path, tiny_model_dir, monkeypatch):
    """SIGINT while a stage waits on an OpenAI-compatible endpoint: the exit does not wait for the
    requests in flight, the message says how to continue, no traceback; the rerun asks only for
    what was not yet kept. Nothing here depends on the machine's speed: a slow answer never comes
    (an hour) and the client would wait 10 minutes for it, so waiting on it cannot pass."""
    from stillhouse.serve import ServerThread, build_app
    from stillhouse.serve.faults import parse_faults

    spec = "slow=0.1,slow_s=3600"
    # the fault of the k-th request is the k-th seeded draw and a unit's requests go out together:
    # pick a seed with no slow answer in the first 2 units (8 requests) and one in the third, which
    # then hangs until the signal
    draws = lambda s: [f.draw() for f in [parse_faults(spec, s)] for _ in range(12)]  # noqa: E731
    seed = next(s for s in range(1000) if "slow" not in draws(s)[:8] and "slow" in draws(s)[8:])
    monkeypatch.setenv("STILLHOUSE_CACHE", str(tmp_path / "server-cache"))
    app = build_app(str(tiny_model_dir), served_name="tiny", faults=spec, seed=seed)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(N_API)))
    srv = ServerThread(app)
    with srv as url:
        recipe = tmp_path / "api.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": "api-resume",
            "teachers": {"api": {"backend": "openai", "base_url": url, "model": "tiny", "max_concurrency": 4,
                                 "terms": "apache-2.0", "timeout": 600}},
            "stages": {"answers": {"type": "complete", "teacher": "api", "prompts_file": str(prompts),
                                   "max_new_tokens": 8, "shard_size": SHARD}},
        }))
        ws = tmp_path / "ws"
        monkeypatch.setenv("STILLHOUSE_CACHE", str(tmp_path / "client-cache"))
        proc = _spawn(recipe, ws)
        _wait_for_units(proc, ws, 2)
        wait_for(lambda: app.state.stats["faults"].get("slow"), "the third unit's slow answer")  # hanging now
        sent_before = app.state.stats["requests"]
        proc.send_signal(signal.SIGINT)
        # a client that waited for the hanging answer would still be waiting when this bound
        # (only there so a broken build cannot hang CI) runs out
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 130, err[-2000:]
        assert app.state.stats["in_flight"] >= 1  # the slow answer was abandoned, not waited for
        assert "Run the same command again to continue" in err
        assert "Traceback" not in err, err[-2000:]
        kept = len(Shards(_partial(ws)).markers())
        assert kept == 2  # the third unit waits on the slow answer

        sent_at_stop = app.state.stats["requests"]
        assert sent_at_stop >= sent_before
        app.state.faults.rates.clear()  # the rerun need not wait out slow answers
        proc = _spawn(recipe, ws)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        rerun_requests = app.state.stats["requests"] - sent_at_stop
        srv.server.force_exit = True  # do not wait for the abandoned hour-long answers on the way out
    rows = read_rows(ArtifactStore(ws).all()[0].file("data.parquet"))
    assert len(rows) == N_API and len({r["id"] for r in rows}) == N_API
    # kept shards are not asked for again; answers finished before the signal come from the cache
    assert rerun_requests <= N_API - kept * SHARD


def test_sigterm_is_handled_like_ctrl_c(tmp_path, tiny_model_dir):
    """A scheduler's SIGTERM (a pre-empted job): exit 143, committed shards kept, rerun continues.
    (Temporary directories of non-resumable stages go on KeyboardInterrupt: test_artifacts.)"""
    recipe = _recipe(tmp_path, tiny_model_dir)
    ws = tmp_path / "ws"
    proc = _spawn(recipe, ws)
    _wait_for_units(proc, ws, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Run the same command again to continue" in err and "terminated" in err
    assert "Traceback" not in err, err[-2000:]
    kept = len(Shards(_partial(ws)).markers())
    assert 2 <= kept < UNITS
    proc = _spawn(recipe, ws)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    rows = read_rows(ArtifactStore(ws).all()[0].file("data.parquet"))
    assert len(rows) == 2 * N_PROMPTS and len({r["id"] for r in rows}) == len(rows)
