"""`stillhouse serve` as a user runs it: a child process answering on loopback, one-line errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from stillhouse.cli import main
from support import free_port


def _cli(args, tmp_path, **kw):
    env = {**os.environ, "STILLHOUSE_CACHE": str(tmp_path / "cache"), "STILLHOUSE_QUIET": "1"}
    return subprocess.Popen([sys.executable, "-m", "stillhouse.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_serve_answers_openai_requests(tiny_model_dir, tmp_path):
    port = free_port()
    proc = _cli(["serve", str(tiny_model_dir), "--port", str(port), "--served-name", "tiny", "--max-batch", "4"], tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        give_up = time.monotonic() + 900  # only a safety net against a hang: a slow start is waited for
        while True:  # ready when it answers (or it died)
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < give_up, "server never answered"
            try:
                models = httpx.get(f"{url}/models", timeout=None).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == ["tiny"]
        r = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 5, "n": 2, "temperature": 0.8, "logprobs": True, "top_logprobs": 2},
                       timeout=None)  # generation on a loaded machine: wait for the answer
        body = r.json()
        assert r.status_code == 200 and body["object"] == "chat.completion" and len(body["choices"]) == 2
        lp = body["choices"][0]["logprobs"]["content"]
        assert 1 <= len(lp) <= 5 and all(len(e["top_logprobs"]) == 2 for e in lp)
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("args,culprit", [
    (["--faults", "429=0.5,500=0.9"], "--faults: rates add up to 1.40"),
    (["--faults", "boom=0.1"], "unknown fault 'boom'"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
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
