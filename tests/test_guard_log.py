"""The request log: no committed row lost when the gateway process is killed with SIGKILL, none
lost or doubled on a graceful stop, Parquet export by day; and one-line errors for a broken
guard file, an unreachable upstream and a corrupt log (exit 2, nothing touched)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from guard_support import make_keys, upstream_server
from stillhouse.cli import main
from stillhouse.guard import log_schema as L
from stillhouse.guard.reqlog import RequestLog, export_parquet
from support import free_port, subprocess_env


def _start_gateway(tmp_path, up_url, port):
    proc = subprocess.Popen(
        [sys.executable, "-m", "stillhouse.cli", "guard", "serve", "--upstream", up_url, "--config", str(tmp_path / "guard.yaml"), "--port", str(port)],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.1)


def _snapshot(path) -> list[tuple]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("SELECT id, ts, key_id, status, outcome, prompt_sha256 FROM requests ORDER BY id").fetchall()
    finally:
        con.close()


def test_committed_rows_survive_kill_9(tmp_path):
    [key] = make_keys(tmp_path / "keys.json", {})
    log = tmp_path / "log.sqlite"
    (tmp_path / "guard.yaml").write_text(yaml.safe_dump({"keys": "keys.json", "log": {"path": "log.sqlite", "flush_ms": 20}}))
    with upstream_server() as (_, up_url):
        port = free_port()
        proc = _start_gateway(tmp_path, up_url, port)
        stop, sent = threading.Event(), []

        def load(i):
            with httpx.Client(timeout=300) as c:
                while not stop.is_set():
                    try:
                        r = c.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                   json={"model": "inline", "messages": [{"role": "user", "content": f"q {i} {len(sent)}"}], "stream": len(sent) % 2 == 0})
                        sent.append(r.status_code)
                    except httpx.TransportError:
                        return

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 120
            while len(before := _snapshot(log) if log.exists() else []) < 60:  # committed rows, as any reader sees them
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)  # mid-traffic: requests are in flight and rows queued
            proc.wait(timeout=300)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        after = _snapshot(log)
        con = sqlite3.connect(log)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
        assert after[: len(before)] == before  # every row committed before the kill is still there, unchanged
        assert [r[0] for r in after] == list(range(1, len(after) + 1))
        assert len(after) <= len(sent)

        # the killed gateway's log opens again; a graceful stop commits every answered request once
        proc = _start_gateway(tmp_path, up_url, port)
        n0 = len(after)
        with httpx.Client(timeout=300) as c:
            for i in range(20):
                c.post(f"http://127.0.0.1:{port}/v1/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "inline", "prompt": f"graceful {i}"}).raise_for_status()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, 143), proc.stderr.read()  # 143: the CLI reports SIGTERM after uvicorn shut down
        rows = _snapshot(log)
        assert len(rows) == n0 + 20 and len({r[5] for r in rows[n0:]}) == 20


def test_export_parquet_by_day(tmp_path):
    import duckdb
    import pyarrow.dataset as ds

    log = RequestLog(tmp_path / "log.sqlite", flush_ms=5)
    day1, day2 = 1_780_000_000.0, 1_780_000_000.0 + 86_400
    for i in range(5):
        log.append({"ts": day1 + i + 0.123456, "route": "chat", "status": 200, "outcome": "ok", "account": f"a{i}", "stream": bool(i % 2), "_prompt": f"p {i}"})
    for i in range(3):
        log.append({"ts": day2 + i, "route": "completions", "status": 429, "outcome": "rate_limited", "echo": True, "_prompt": "same"})
    log.close()
    out = tmp_path / "parquet"
    assert export_parquet(tmp_path / "log.sqlite", out) == 8
    days = sorted(p.name for p in out.iterdir())
    assert days == [f"day={time.strftime('%Y-%m-%d', time.gmtime(d))}" for d in (day1, day2)]
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 8 and table.schema.names[: len(L.NAMES)] == L.NAMES
    assert table.schema.field("prompt_sig").type == L.ARROW_SCHEMA.field("prompt_sig").type
    counts = duckdb.sql(f"SELECT day, count(*), sum(echo::INT) FROM read_parquet('{out}/*/*.parquet', hive_partitioning=true) GROUP BY day ORDER BY day").fetchall()
    assert [(c[1], c[2]) for c in counts] == [(5, None), (3, 3)]  # echo unset on the first day: null
    assert export_parquet(tmp_path / "log.sqlite", out) == 8  # a second export replaces the first
    assert ds.dataset(out, format="parquet", partitioning="hive").count_rows() == 8


# --- bad input: one line naming the culprit, exit 2 -------------------------------------------


def _one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("stillhouse: error:") and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("text,culprit", [
    ("keys: k.json\nlimits: [oops", "guard file is not valid YAML (line 2)"),
    ("keys: k.json\nlimits: {key: {requests_per_minut: 5}}", "bad guard file at limits.key.requests_per_minut: Extra inputs are not permitted"),
    ("keys: k.json\nlog: {flush_ms: -1}", "bad guard file at log.flush_ms"),
    ("limits: {}", "bad guard file at keys: Field required"),
    ("keys: missing.json", "missing.json: no such key file"),
    ("- just\n- a list", "guard file must be a mapping"),
])
def test_broken_guard_file(tmp_path, capsys, text, culprit):
    (tmp_path / "guard.yaml").write_text(text)
    err = _one_line_error(["guard", "serve", "--upstream", "http://127.0.0.1:9/v1", "--config", str(tmp_path / "guard.yaml"), "--port", str(free_port())], capsys)
    assert culprit in err and str(tmp_path) in err


def test_unreachable_upstream_corrupt_log_and_bad_keys(tmp_path, capsys):
    make_keys(tmp_path / "keys.json", {})
    (tmp_path / "guard.yaml").write_text("keys: keys.json\nlog: {path: log.sqlite}\n")
    argv = ["guard", "serve", "--config", str(tmp_path / "guard.yaml"), "--port", str(free_port()), "--upstream"]
    port = free_port()
    err = _one_line_error(argv + [f"http://admin:s3cret@127.0.0.1:{port}/v1"], capsys)
    assert err == f"stillhouse: error: upstream http://127.0.0.1:{port}/v1 unreachable: ConnectError"
    assert "must be an http(s) URL" in _one_line_error(argv + ["localhost:8000"], capsys)
    (tmp_path / "guard2.yaml").write_text("keys: keys.json\nupstream: {api_key_env: GUARD_TEST_UNSET_KEY}\n")
    argv2 = ["guard", "serve", "--config", str(tmp_path / "guard2.yaml"), "--port", str(free_port()), "--upstream", f"http://127.0.0.1:{port}/v1"]
    assert "environment variable GUARD_TEST_UNSET_KEY is not set" in _one_line_error(argv2, capsys)

    garbage = b"this is not a database, but someone's precious file\n" * 100
    (tmp_path / "log.sqlite").write_bytes(garbage)
    with upstream_server() as (_, up_url):
        assert "log.sqlite: not a readable request log (file is not a database)" in _one_line_error(argv + [up_url], capsys)
    assert "not a readable request log" in _one_line_error(["guard", "export", str(tmp_path / "log.sqlite"), str(tmp_path / "out")], capsys)
    assert (tmp_path / "log.sqlite").read_bytes() == garbage and not (tmp_path / "out").exists()
    assert "no such request log" in _one_line_error(["guard", "export", str(tmp_path / "nope.sqlite"), str(tmp_path / "out")], capsys)

    assert "limit requests_per_minute" in _one_line_error(["guard", "keys", "add", str(tmp_path / "k2.json"), "--rpm", "-1"], capsys)
    assert not (tmp_path / "k2.json").exists()
    store = __import__("json").loads((tmp_path / "keys.json").read_text())
    store["keys"][0]["limits"] = {"requests_per_hour": 5}
    (tmp_path / "keys.json").write_text(__import__("json").dumps(store))
    (tmp_path / "log.sqlite").unlink()
    with upstream_server() as (_, up_url):
        err = _one_line_error(argv + [up_url], capsys)
    assert f"bad limits for key {store['keys'][0]['id']}" in err


def test_keys_cli_round_trip(tmp_path, capsys):
    f = tmp_path / "keys.json"
    main(["guard", "keys", "add", str(f), "--account", "bob", "--org", "acme", "--rpm", "5", "--max-top-logprobs", "0"])
    key = capsys.readouterr().out.strip()
    assert key.startswith("sh-") and key not in f.read_text()
    main(["guard", "keys", "list", str(f)])
    line = capsys.readouterr().out.strip()
    key_id = line.split("\t")[0]
    assert line == f'{key_id}\tbob\tacme\tactive\t{{"max_top_logprobs": 0, "requests_per_minute": 5}}'
    main(["guard", "keys", "revoke", str(f), key_id])
    main(["guard", "keys", "list", str(f)])
    assert "\trevoked\t" in capsys.readouterr().out


def test_hostile_field_values_still_log_and_export(tmp_path):
    """Numbers out of the columns' ranges or of the wrong type become bounded or null, so one
    client cannot make its row, or the day's Parquet export, fail."""
    from guard_support import gateway_server, guard_config, post

    [key] = make_keys(tmp_path / "keys.json", {})
    with upstream_server() as (_, up_url), gateway_server(guard_config(tmp_path), up_url) as (_, url):
        body = {"model": 5, "messages": [{"role": "user", "content": "hi"}], "n": 1, "max_completion_tokens": 10**12,
                "temperature": "hot", "top_logprobs": 0}
        assert post(url, "/chat/completions", key, body).status_code == 200
        r = post(url, "/chat/completions", key, {**body, "n": 10**9})  # the upstream refuses it; the gateway passes that on
        assert r.status_code == 400 and "n must be" in r.json()["error"]["message"]
    assert export_parquet(tmp_path / "log.sqlite", tmp_path / "out") == 2
    import pyarrow.dataset as ds

    t = ds.dataset(tmp_path / "out", format="parquet", partitioning="hive").to_table().to_pylist()
    assert [r["n"] for r in t] == [1, 2**15 - 1] and t[0]["max_tokens"] == 2**31 - 1
    assert t[0]["model"] is None and t[0]["temperature"] is None
