"""A teacher endpoint is part of what identifies its answers, and URL credentials go nowhere.

Two fake OpenAI-compatible servers answer to the same model name with different answers; each
counts its requests and, when told to fail, answers 401 with every header it received echoed
in the error body (as some proxies do), so a leaked key or Basic credential would show up in
our error message if we did not scrub it.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from stillhouse.cli import main
from stillhouse.errors import StillhouseError
from stillhouse.lineage.cli import run_lineage
from stillhouse.recipe import parse_recipe
from stillhouse.runner import Runner
from stillhouse.teachers.base import SamplingParams
from stillhouse.teachers.endpoint import normalise, scrub, strip_userinfo
from stillhouse.teachers.openai import OpenAITeacher
from support import subprocess_env

KEY = "sk-" + secrets.token_hex(16)  # random: no piece of it occurs in a path or a traceback by chance
USER, PASSWORD = "alice", "hunter2-" + "p4ss" * 4
ONE = SamplingParams(max_new_tokens=4)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        srv = self.server
        srv.requests += 1
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if srv.fail:
            status, body = 401, {"error": {"message": "unauthorised; you sent: " + json.dumps(dict(self.headers.items()))}}
        else:
            status, body = 200, {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer from {srv.label}"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3},
            }
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


class FakeAPI:
    """An OpenAI-compatible chat endpoint on a free loopback port, in a thread."""

    def __init__(self, label: str, fail: bool = False):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.label, self.httpd.fail, self.httpd.requests = label, fail, 0
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def requests(self) -> int:
        return self.httpd.requests

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def two_servers():
    with FakeAPI("A") as a, FakeAPI("B") as b:
        yield a, b


def _ask(url: str, cache: Path, **kw) -> str:
    t = OpenAITeacher(url, "same-model", cache_path=cache, max_retries=0, connect_retries=0, jitter_seed=0, **kw)
    return t.generate([[{"role": "user", "content": "hi"}]], ONE)[0][0].text


# -- the endpoint in the cache key and the artifact id -----------------------------------
def test_two_servers_with_the_same_model_name_do_not_share_cached_answers(two_servers, tmp_path):
    a, b = two_servers
    cache = tmp_path / "responses"
    assert _ask(a.url, cache) == "answer from A"
    assert _ask(b.url, cache) == "answer from B" and b.requests == 1
    assert _ask(a.url + "/", cache) == "answer from A" and a.requests == 1  # the same endpoint: cached
    # a third server that refuses (401): the cache holds this model's answer twice, it gets neither
    with FakeAPI("C", fail=True) as c:
        with pytest.raises(StillhouseError, match="HTTP 401"):
            _ask(c.url, cache)
        assert c.requests == 1


def test_normalised_endpoint():
    assert normalise("HTTP://Host.Example/v1/") == "http://host.example:80/v1"
    assert normalise("https://api.example.com//v1") == "https://api.example.com:443/v1"
    assert normalise("http://127.0.0.1:8000/v1?x=1#f") == "http://127.0.0.1:8000/v1"
    assert normalise("http://u:p@h:1/v1") == "http://h:1/v1"


def _api(url: str, **kw) -> dict:
    return {"backend": "openai", "base_url": url, "model": "same-model", "api_key_env": "SH_EP_KEY", "max_retries": 0} | kw


def _recipe_file(tmp_path: Path, name: str, url: str) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(3)))
    recipe = {"name": name, "teachers": {"api": _api(url)},
              "stages": {"answers": {"type": "complete", "teacher": "api", "prompts_file": str(prompts), "max_new_tokens": 4}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_artifact_id_and_manifest_follow_the_endpoint(two_servers, tmp_path, monkeypatch):
    from stillhouse.api import run_recipe

    a, b = two_servers
    monkeypatch.setenv("SH_EP_KEY", KEY)
    ws = tmp_path / "ws"  # one workspace and one response cache for both runs
    run_a = run_recipe(_recipe_file(tmp_path, "a", a.url), ws)["answers"]
    run_b = run_recipe(_recipe_file(tmp_path, "b", b.url), ws)["answers"]
    assert run_a.id != run_b.id
    assert a.requests == 3 and b.requests == 3  # B answered B's run: nothing came from A's cache
    (teacher,) = run_b.manifest["teachers"]
    assert teacher["source"] == normalise(b.url) and teacher["spec"] == "openai:same-model"
    from stillhouse.records import read_rows

    assert {r["completion"] for r in read_rows(run_b.file("data.parquet"))} == {"answer from B"}


def test_artifact_id_ignores_spelling_of_the_same_endpoint_and_rate_limits():
    def key(url, **kw):
        stage = {"type": "complete", "teacher": "api", "prompts_file": __file__, "max_new_tokens": 4}
        r = parse_recipe({"name": "t", "teachers": {"api": _api(url, **kw)}, "stages": {"answers": stage}})
        return Runner(r, Path("/nonexistent"))._key("answers")[0]

    base = key("http://localhost:8000/v1")
    assert key("http://LocalHost:8000/v1/", max_concurrency=2, requests_per_minute=10) == base
    assert key("http://localhost:80/v1") == key("http://localhost/v1")
    assert key("http://localhost:8001/v1") != base
    assert key("http://127.0.0.2:8000/v1") != base
    assert key("http://localhost:8000/v2") != base
    assert key("http://localhost:8000/v1", model="other") != base


# -- credentials in a URL -----------------------------------------------------------------
def _pieces_of(secret: str, text: str, n: int = 8) -> list[str]:
    """Every n-character piece of `secret` found in `text` (a truncated leak is still a leak)."""
    return [secret[i:i + n] for i in range(len(secret) - n + 1) if secret[i:i + n] in text]


def _basic() -> str:
    return base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def test_credentials_in_base_url_are_refused_before_any_request(two_servers, tmp_path):
    a, _ = two_servers
    url = a.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    with pytest.raises(StillhouseError) as e:
        _ask(url, tmp_path / "c")
    msg = str(e.value)
    assert "api_key_env" in msg and "\n" not in msg
    assert PASSWORD not in msg and USER not in msg and _basic() not in msg
    assert a.requests == 0


def test_recipe_with_credentials_in_base_url_is_one_line_and_writes_nothing(two_servers, tmp_path, capsys, monkeypatch):
    a, _ = two_servers
    monkeypatch.setenv("SH_EP_KEY", KEY)
    recipe = _recipe_file(tmp_path, "creds", a.url.replace("http://", f"http://{USER}:{PASSWORD}@"))
    with pytest.raises(SystemExit) as e:
        main(["run", str(recipe), "-w", str(tmp_path / "ws")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "teachers.api.base_url" in lines[0] and "api_key_env" in lines[0]
    assert PASSWORD not in err and _basic() not in err
    assert a.requests == 0 and not list((tmp_path / "ws").rglob("manifest.json"))


def test_a_server_echoing_our_headers_does_not_leak_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SH_EP_KEY", KEY)
    with FakeAPI("E", fail=True) as e:
        with pytest.raises(StillhouseError) as err:
            _ask(e.url, tmp_path / "c", api_key_env="SH_EP_KEY")
        assert e.requests == 1
    msg = str(err.value)
    assert "HTTP 401" in msg and "authorization" in msg.lower()  # the echo did reach the message...
    assert not _pieces_of(KEY, msg) and "***" in msg  # ...scrubbed, and not cut through either
    # through the CLI, in its own process: the one-line error and everything else it prints
    with FakeAPI("E2", fail=True) as e2:
        recipe = _recipe_file(tmp_path, "echo", e2.url)
        r = subprocess.run([sys.executable, "-m", "stillhouse.cli", "run", str(recipe), "-w", str(tmp_path / "ws")],
                           capture_output=True, text=True, env=subprocess_env(SH_EP_KEY=KEY), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert not _pieces_of(KEY, r.stderr + r.stdout) and "HTTP 401" in r.stderr


def test_scrub_removes_userinfo_and_its_basic_form():
    url = f"http://{USER}:{PASSWORD}@host:8000/v1"
    text = f"failed at {url}: server saw Authorization: Basic {_basic()} (password {PASSWORD})"
    clean = scrub(text, url)
    assert PASSWORD not in clean and _basic() not in clean and f"{USER}:" not in clean
    assert "http://host:8000/v1" in clean
    assert strip_userinfo({"a": [f"see {url}"]}) == {"a": ["see http://host:8000/v1"]}


def test_lineage_never_prints_userinfo_from_an_old_manifest(two_servers, tmp_path, monkeypatch, capsys):
    """A manifest written before credentials were refused still holds the URL with userinfo:
    `stillhouse lineage` (tree and JSON) prints it without."""
    from stillhouse.api import run_recipe

    a, _ = two_servers
    monkeypatch.setenv("SH_EP_KEY", KEY)
    ws = tmp_path / "ws"
    art = run_recipe(_recipe_file(tmp_path, "old", a.url), ws)["answers"]
    manifest_path = art.path / "manifest.json"
    m = json.loads(manifest_path.read_text())
    m["teachers"][0]["source"] = a.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    manifest_path.write_text(json.dumps(m))
    capsys.readouterr()
    run_lineage(art.id, ws)
    run_lineage(art.id, ws, as_json=True)
    run_lineage(art.id, ws, prov=True)
    out = capsys.readouterr().out
    assert PASSWORD not in out and f"{USER}:" not in out
