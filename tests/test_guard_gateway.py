"""The guard gateway: the official openai client through it, keys (401), limits and quotas
(429 + Retry-After), log-prob caps, and what the request log records. No request that is
refused may reach the upstream: each check counts the stub's calls."""

from __future__ import annotations

import sqlite3
import time

import httpx
import openai
import pytest

from guard_support import ANSWER, HIDDEN, gateway_server, guard_config, make_keys, post, upstream_server, wait_rows
from stillhouse.apikeys import KeyStore
from stillhouse.guard import log_schema as L

U = [{"role": "user", "content": "Show your full reasoning: what is six times seven?"}]


@pytest.fixture()
def upstream():
    with upstream_server() as (app, url):
        yield app, url


def test_official_client_works_unchanged(upstream, tmp_path):
    up_app, up_url = upstream
    [key] = make_keys(tmp_path / "keys.json", {"account": "alice", "org": "acme"})
    with gateway_server(guard_config(tmp_path), up_url) as (_, url):
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        r = client.chat.completions.create(model="inline", messages=U, n=2, logprobs=True, top_logprobs=2)
        assert [c.message.content for c in r.choices] == [ANSWER, ANSWER]
        assert r.choices[0].logprobs.content and all(len(e.top_logprobs) == 2 for e in r.choices[0].logprobs.content)
        assert r.usage.prompt_tokens == 7

        chunks = list(client.chat.completions.create(model="inline", messages=U, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        no_usage = list(client.chat.completions.create(model="inline", messages=U, stream=True))
        assert all(c.usage is None for c in no_usage)  # the gateway asked upstream for usage, not the client

        c = client.completions.create(model="inline", prompt="Q: 6*7?\nA:", logprobs=2, echo=True, stop=["\n\n"])
        assert c.choices[0].text == "Q: 6*7?\nA:" + ANSWER and c.choices[0].logprobs.tokens
        streamed = "".join(x.choices[0].text for x in client.completions.create(model="inline", prompt="x", stream=True) if x.choices)
        assert streamed == ANSWER

        t = client.chat.completions.create(model="tool", messages=U, tools=[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}])
        call = t.choices[0].message.tool_calls[0]
        assert call.function.name == "weather" and '"notes": "The answer is 42."' in call.function.arguments
        assert [m.id for m in client.models.list().data] == ["stub"]

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="sh-00000000-" + "x" * 43, max_retries=0).chat.completions.create(model="inline", messages=U)


def test_keys_401_without_upstream_call(upstream, tmp_path):
    up_app, up_url = upstream
    [key, other] = make_keys(tmp_path / "keys.json", {}, {})
    with gateway_server(guard_config(tmp_path), up_url) as (_, url):
        for bad in (None, "nope", key[:-1] + ("A" if key[-1] != "A" else "B"), "Bearer"):
            r = post(url, "/chat/completions", bad, {"model": "inline", "messages": U})
            assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_api_key"
        assert httpx.get(url + "/models").status_code == 401
        assert up_app.state.calls == 0
        assert post(url, "/chat/completions", other, {"model": "inline", "messages": U}).status_code == 200
        # revoking in the key file takes effect in the running gateway (it re-reads a changed file)
        store = KeyStore.load(tmp_path / "keys.json")
        store.revoke(store.records[1].id)
        deadline = time.monotonic() + 300  # a bound for a broken reload, not a speed test
        while post(url, "/chat/completions", other, {"model": "inline", "messages": U}).status_code != 401:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        calls = up_app.state.calls
        assert post(url, "/chat/completions", other, {"model": "inline", "messages": U}).status_code == 401
        assert up_app.state.calls == calls
    rows = _rows(tmp_path / "log.sqlite")
    assert {r["outcome"] for r in rows if r["status"] == 401} == {"unauthorized"}
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("log.sqlite*"))
    assert key.encode() not in blob and other.encode() not in blob  # keys never reach the log


def test_rate_limits_and_quotas_429_without_upstream_call(upstream, tmp_path):
    up_app, up_url = upstream
    keys = make_keys(tmp_path / "keys.json",
                     {"account": "k1", "org": "acme", "limits": {"requests_per_minute": 2}},
                     {"account": "k2", "org": "acme"}, {"account": "k3", "org": "acme"},
                     {"account": "t", "org": "solo", "limits": {"tokens_per_minute": 10}})
    cfg = guard_config(tmp_path, limits={"orgs": {"acme": {"requests_per_day": 4}}})
    body = {"model": "inline", "messages": U}
    with gateway_server(cfg, up_url) as (_, url):
        assert [post(url, "/chat/completions", keys[0], body).status_code for _ in range(2)] == [200, 200]
        calls = up_app.state.calls
        r = post(url, "/chat/completions", keys[0], body)
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60 and "per minute" in r.json()["error"]["message"]
        assert up_app.state.calls == calls
        # the organisation's day quota counts all its keys: 2 + 2 = 4, then every acme key is refused
        assert [post(url, "/chat/completions", keys[1], body).status_code for _ in range(2)] == [200, 200]
        r = post(url, "/chat/completions", keys[2], body, )
        assert r.status_code == 429 and "org 'acme'" in r.json()["error"]["message"] and int(r.headers["retry-after"]) <= 86_400
        # tokens: the first response uses more than 10 tokens, so the next request in the minute is refused
        assert post(url, "/chat/completions", keys[3], {**body, "stream": True}).status_code == 200
        r = post(url, "/chat/completions", keys[3], body)
        assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]
        assert up_app.state.calls == calls + 3
    outcomes = [r["outcome"] for r in _rows(tmp_path / "log.sqlite")]
    assert outcomes.count("rate_limited") == 2 and outcomes.count("quota_exceeded") == 1
    # a restarted gateway replays today's log: the organisation's day quota is still used up
    with gateway_server(cfg, up_url) as (_, url):
        assert post(url, "/chat/completions", keys[1], body).status_code == 429


def test_logprob_caps_per_key_and_org(upstream, tmp_path):
    up_app, up_url = upstream
    capped, off, free = make_keys(tmp_path / "keys.json", {"limits": {"max_top_logprobs": 2}}, {"limits": {"logprobs": False}}, {"org": "big"})
    cfg = guard_config(tmp_path, limits={"org": {"max_top_logprobs": 5}, "orgs": {"big": {"max_top_logprobs": 20}}})
    chat = {"model": "inline", "messages": U, "logprobs": True}
    with gateway_server(cfg, up_url) as (_, url):
        assert post(url, "/chat/completions", capped, {**chat, "top_logprobs": 2}).status_code == 200
        calls = up_app.state.calls
        r = post(url, "/chat/completions", capped, {**chat, "top_logprobs": 3})
        assert r.status_code == 400 and "cap of 2" in r.json()["error"]["message"]
        assert post(url, "/completions", capped, {"model": "inline", "prompt": "x", "logprobs": 3}).status_code == 400
        assert post(url, "/chat/completions", off, chat).status_code == 400
        assert post(url, "/completions", off, {"model": "inline", "prompt": "x", "logprobs": 0}).status_code == 400
        assert up_app.state.calls == calls
        assert post(url, "/chat/completions", off, {"model": "inline", "messages": U}).status_code == 200
        assert post(url, "/chat/completions", free, {**chat, "top_logprobs": 20}).status_code == 200


def test_log_rows_follow_the_schema(upstream, tmp_path):
    _, up_url = upstream
    [key] = make_keys(tmp_path / "keys.json", {"account": "alice", "org": "acme"})
    for log_text in (False, True):
        cfg = guard_config(tmp_path, log={"log_text": log_text, "path": str(tmp_path / f"log{log_text}.sqlite")})
        with gateway_server(cfg, up_url) as (_, url):
            msgs = [{"role": "system", "content": "Be terse."}] + U
            post(url, "/chat/completions", key, {"model": "inline", "messages": msgs, "logprobs": True, "top_logprobs": 3,
                                                 "temperature": 0.5, "max_tokens": 200}).raise_for_status()
            post(url, "/completions", key, {"model": "inline", "prompt": "hello there world", "stream": True, "echo": True}).raise_for_status()
            post(url, "/completions", None, {"model": "inline", "prompt": "x"})
        rows = _rows(cfg.log.path)
        assert len(rows) == 3
        chat, comp, bad = rows
        assert (chat["account"], chat["org"], chat["route"], chat["status"], chat["outcome"]) == ("alice", "acme", "chat", 200, "ok")
        assert chat["probe"] == "reasoning" and chat["top_logprobs"] == 3 and chat["temperature"] == 0.5 and chat["max_tokens"] == 200
        assert chat["prompt_sha256"] == L.prompt_sha256("Be terse.\n" + U[0]["content"]) and chat["system_sha256"] == L.prompt_sha256("Be terse.")
        assert len(chat["prompt_sig"]) == 4 * L.SIGNATURE_PERM and chat["param_shape"] == "logprobs,max_tokens,messages,model,temperature,top_logprobs"
        assert chat["withheld_tokens"] > 0 and chat["prompt_tokens"] == 7 and 0 < chat["completion_tokens"]
        assert comp["stream"] == 1 and comp["echo"] == 1 and comp["route"] == "completions" and comp["withheld_tokens"] > 0
        assert chat["user_agent"].startswith("python-httpx") and chat["client_ip"] == "127.0.0.1" and chat["latency_ms"] > 0
        assert (bad["status"], bad["outcome"], bad["account"]) == (401, "unauthorized", None)
        assert (chat["prompt_text"] is not None) == log_text and (comp["prompt_text"] == "hello there world") == log_text
        assert not any(c in str(rows) for c in HIDDEN)


def test_bad_requests_and_unreachable_upstream(tmp_path):
    [key] = make_keys(tmp_path / "keys.json", {})
    with gateway_server(guard_config(tmp_path), "http://user:hunter2@127.0.0.1:9/v1") as (_, url):
        r = httpx.post(url + "/chat/completions", content=b"{not json", headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert post(url, "/chat/completions", key, {"model": "m", "messages": "hi"}).status_code == 400
        r = post(url, "/chat/completions", key, {"model": "m", "messages": U})
        assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"] and "hunter2" not in r.text
    assert [r["outcome"] for r in _rows(tmp_path / "log.sqlite")] == ["bad_request", "bad_request", "upstream_error"]


def _rows(path) -> list[dict]:
    wait_rows(path, 0)
    con = sqlite3.connect(path)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM requests ORDER BY id")]
    finally:
        con.close()


def test_client_leaving_a_stream_is_logged_once_as_cancelled(upstream, tmp_path):
    _, up_url = upstream
    [key] = make_keys(tmp_path / "keys.json", {})
    with gateway_server(guard_config(tmp_path), up_url) as (_, url):
        with httpx.stream("POST", url + "/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=300,
                          json={"model": "slow", "messages": U, "stream": True}) as r:
            next(r.iter_lines())  # the first event, then hang up
        assert wait_rows(tmp_path / "log.sqlite", 1) == 1
        # the gateway goes on serving
        assert post(url, "/chat/completions", key, {"model": "inline", "messages": U}).status_code == 200
    rows = _rows(tmp_path / "log.sqlite")
    assert [r["outcome"] for r in rows] == ["cancelled", "ok"]
