"""`stillhouse serve` as a user runs it: a child process answering on loopback, one-line errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from stillhouse.apikeys import KeyStore
from stillhouse.cli import main
from support import free_port


def _cli(args, tmp_path, **kw):
    env = {**os.environ, "STILLHOUSE_CACHE": str(tmp_path / "cache"), "STILLHOUSE_QUIET": "1"}
    return subprocess.Popen([sys.executable, "-m", "stillhouse.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_serve_answers_openai_requests(tiny_model_dir, tmp_path):
    keys = tmp_path / "keys.json"
    _, key = KeyStore.load(keys, create=True).add()
    auth = {"Authorization": f"Bearer {key}"}
    port = free_port()
    proc = _cli(["serve", str(tiny_model_dir), "--port", str(port), "--served-name", "tiny", "--max-batch", "4", "--api-keys", str(keys)], tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        while True:  # wait on readiness (the process dying fails at once), however loaded the machine
            assert proc.poll() is None, proc.stderr.read()
            try:
                models = httpx.get(f"{url}/models", headers=auth, timeout=None).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == ["tiny"]
        assert httpx.get(f"{url}/models", timeout=None).status_code == 401
        r = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 5, "n": 2, "temperature": 0.8, "logprobs": True, "top_logprobs": 2},
                       headers=auth, timeout=None)  # no deadline on the answer: a loaded machine is slow, not broken
        body = r.json()
        assert r.status_code == 200 and body["object"] == "chat.completion" and len(body["choices"]) == 2
        lp = body["choices"][0]["logprobs"]["content"]
        assert 1 <= len(lp) <= 5 and all(len(e["top_logprobs"]) == 2 for e in lp)
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    finally:
        proc.terminate()
        proc.wait(timeout=300)


@pytest.mark.parametrize("args,culprit", [
    (["--faults", "429=0.5,500=0.9"], "--faults: rates add up to 1.40"),
    (["--faults", "boom=0.1"], "unknown fault 'boom'"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--max-concurrent", "0"], "--max-concurrent must be at least 1"),
    (["--max-context", "1"], "--max-context must be at least 2"),
    (["--api-keys", "/nonexistent/keys.json"], "/nonexistent/keys.json: no such key file"),
])
def test_serve_bad_options_are_one_line(tiny_model_dir, args, culprit, capsys, monkeypatch):
    err = _in_process(["serve", str(tiny_model_dir), "--port", str(free_port()), *args], capsys, monkeypatch)
    assert culprit in err


def test_serve_missing_model_and_busy_port_are_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    err = _in_process(["serve", str(tmp_path / "nope"), "--port", str(free_port())], capsys, monkeypatch)
    assert err == f"stillhouse: error: model path not found: {tmp_path / 'nope'}"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        err = _in_process(["serve", str(tiny_model_dir), "--port", str(busy.getsockname()[1])], capsys, monkeypatch)
    assert "cannot listen on 127.0.0.1:" in err


def _in_process(argv, capsys, monkeypatch) -> str:
    monkeypatch.setattr(os, "environ", os.environ.copy())  # serve() quiets progress bars process-wide
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("stillhouse: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in "".join(lines), lines
    return errors[0]
