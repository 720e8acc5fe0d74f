"""The openai backend driven for real against `stillhouse serve` over loopback.

A tiny random llama is served by uvicorn in a background thread; the client is the real
OpenAITeacher (httpx, asyncio). Fault injection makes the server answer 429, 500, slow or
cut-off responses; every prompt must still complete exactly once, with the same answer.
"""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest

from stillhouse import models
from stillhouse.errors import StillhouseError
from stillhouse.serve import ServerThread, build_app
from stillhouse.serve.faults import parse_faults
from stillhouse.teachers.base import SamplingParams
from stillhouse.teachers.hf import HFTeacher, render_chat
from stillhouse.teachers.openai import OpenAITeacher
from support import free_port, module_env

QUESTIONS = ["2+2?", "Sum 1, 2 and 3.", "x", "What is 13 - 5?", "Subtract 7 from 40.", "hi", "abc def", "7*6?"]
GREEDY = SamplingParams(max_new_tokens=6)


def _msgs(questions=QUESTIONS):
    return [[{"role": "user", "content": q}] for q in questions]


def isolated(tmp_path_factory):
    """For module fixtures (set up before the per-test isolation): a temp cache, no progress bars."""
    return module_env(tmp_path_factory.mktemp("module"), threads=False)


@contextlib.contextmanager
def serving(model_dir, tmp_path_factory, **kwargs):
    """A live server on a free loopback port; yields (base_url, stats dict)."""
    with isolated(tmp_path_factory):
        app = build_app(str(model_dir), served_name="tiny", **kwargs)
    with ServerThread(app) as url:
        yield url, app.state.stats


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with serving(tiny_model_dir, tmp_path_factory, max_batch=8) as s:
        yield s


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, tmp_path_factory):
    """In-process greedy answers of the same model: what every run over HTTP must reproduce."""
    with isolated(tmp_path_factory):
        lm = models.load(str(tiny_model_dir))
        t = HFTeacher(lm.model, lm.tokenizer)
        return t.generate(_msgs(), GREEDY, top_k_logprobs=3), lm.tokenizer


def _client(url, tmp_path, **kw):
    kw.setdefault("cache_path", tmp_path / "responses")
    return OpenAITeacher(url, "tiny", jitter_seed=0, **kw)


def test_chat_greedy_matches_in_process_generation(server, baseline, tmp_path):
    url, _ = server
    expected, tok = baseline
    t = _client(url, tmp_path, token_ids=True, tokenizer=tok)
    out = t.generate(_msgs(), GREEDY, top_k_logprobs=3)
    assert len(out) == len(QUESTIONS) and all(len(c) == 1 for c in out)
    for (got,), (exp,) in zip(out, expected):
        assert got.text == exp.text
        assert got.token_ids == exp.token_ids and got.stop_token == exp.stop_token
        assert got.finish_reason == exp.finish_reason
        assert got.topk_ids == exp.topk_ids
        flat = lambda rows: [x for row in rows for x in row]  # noqa: E731
        assert flat(got.topk_logprobs) == pytest.approx(flat(exp.topk_logprobs), abs=1e-4)
        assert got.prompt_tokens == exp.prompt_tokens
    u = t.usage_metrics()
    assert u["responses"] == len(QUESTIONS) and u["retries"] == 0
    assert u["completion_tokens"] == sum(len(c.token_ids) + (c.stop_token is not None) for (c,) in out)


def test_completions_endpoint_with_rendered_text_and_n_samples(server, baseline, tmp_path):
    url, _ = server
    _, tok = baseline
    texts = [render_chat(tok, m) for m in _msgs()[:3]]
    t = _client(url, tmp_path)  # no tokenizer, no token ids: tokens stay text
    out = t.generate_text(texts, SamplingParams(max_new_tokens=5, temperature=1.0, n=3, seed=7), top_k_logprobs=2)
    assert [len(c) for c in out] == [3, 3, 3]
    for comps in out:
        for c in comps:
            assert c.token_ids == [] and c.topk_ids is None  # ids unknown: not invented
            assert len(c.extra["tokens"]) == len(c.extra["token_logprobs"]) == len(c.extra["top_logprobs"])
            assert c.text in "".join(c.extra["tokens"])  # special tokens show in tokens, not in text
            assert all(len(top) == 2 and top[0][1] >= top[1][1] for top in c.extra["top_logprobs"])
    # a sampled token's own log-prob is exact even when it is outside the top-k
    assert all(lp <= 0 for comps in out for c in comps for lp in c.extra["token_logprobs"])


def test_rerun_is_served_from_cache_with_zero_requests(server, tmp_path):
    url, stats = server
    first = _client(url, tmp_path).generate(_msgs(), GREEDY)
    before = stats["requests"]
    again = _client(url, tmp_path)
    second = again.generate(_msgs(), GREEDY)
    assert stats["requests"] == before  # the server saw nothing
    assert again.usage.requests == 0 and again.usage.cached == len(QUESTIONS)
    assert [c[0].text for c in second] == [c[0].text for c in first]
    # any sampling parameter is part of the key: a longer answer is a new request
    third = _client(url, tmp_path)
    third.generate(_msgs()[:2], SamplingParams(max_new_tokens=7))
    assert third.usage.requests == 2 and stats["requests"] == before + 2


def test_faults_every_prompt_completes_once_with_the_fault_free_answer(tiny_model_dir, tmp_path_factory, baseline, tmp_path):
    expected, tok = baseline
    # a slow answer (8 s) outlives the client's timeout (4 s) however fast the machine; on a
    # loaded machine a cut or normal answer may outlive it too (then it counts as a timeout)
    spec = "429=0.15,500=0.15,cut=0.15,slow=0.1,retry_after=0,slow_s=8"
    questions = QUESTIONS * 2  # 16 prompts, 8 distinct: duplicates must not collapse or double
    with serving(tiny_model_dir, tmp_path_factory, faults=spec, seed=3, max_batch=4) as (url, stats):
        t = _client(url, tmp_path, token_ids=True, tokenizer=tok, timeout=4, backoff_base=0.01, max_retries=30, cache=False)
        out = t.generate(_msgs(questions), GREEDY)
    assert len(out) == len(questions) and all(len(c) == 1 for c in out)
    for (got,), (exp,) in zip(out, expected + expected):
        assert (got.text, got.token_ids, got.stop_token) == (exp.text, exp.token_ids, exp.stop_token)
    f = t.usage.failures
    assert stats["faults"].get("429") and stats["faults"].get("500") and stats["faults"].get("cut")
    assert f.get("429") == stats["faults"]["429"] and f.get("5xx") == stats["faults"]["500"]
    assert f.get("dropped", 0) <= stats["faults"]["cut"]  # a cut is dropped, or timed out first on a slow machine
    assert stats["faults"].get("slow") and f.get("timeout")  # a slow answer outlives the client's timeout
    assert f.get("dropped", 0) + f["timeout"] >= stats["faults"]["cut"] + stats["faults"]["slow"]
    assert t.usage.responses == len(questions)  # exactly one accepted answer per prompt
    assert t.usage.requests == len(questions) + t.usage.retries


def test_malformed_complete_answers_are_retried_and_billed_tokens_match_the_server(tiny_model_dir, tmp_path_factory, baseline, tmp_path):
    """A 200 that is HTML, has no choices, or the wrong number of them: retried, counted, never a crash;
    the tokens billed (every usage the server reported) equal the server's own count, and two
    processes writing one ledger sum up."""
    expected, tok = baseline
    spec = "nonjson=0.15,nochoices=0.15,wrongn=0.15,cut=0.1,500=0.05"
    kinds = {"nonjson", "nochoices", "wrongn", "cut"}
    seed = next(s for s in range(1000) if kinds <= {f.draw() for f in [parse_faults(spec, s)] for _ in range(8)})
    with serving(tiny_model_dir, tmp_path_factory, faults=spec, seed=seed, max_batch=4) as (url, stats):
        ledger = tmp_path / "usage.jsonl"
        first = _client(url, tmp_path, token_ids=True, tokenizer=tok, backoff_base=0.01, max_retries=40, cache=False,
                        price={"input_per_mtok": 1.0, "output_per_mtok": 2.0})
        first.ledger = ledger
        out = first.generate(_msgs()[:4], GREEDY)
        second = _client(url, tmp_path, token_ids=True, tokenizer=tok, backoff_base=0.01, max_retries=40, cache=False,
                         price={"input_per_mtok": 1.0, "output_per_mtok": 2.0})
        second.ledger = ledger  # the rerun of a killed stage: same ledger, a new process
        out += second.generate(_msgs()[4:], GREEDY)
    for (got,), (exp,) in zip(out, expected):
        assert (got.text, got.token_ids) == (exp.text, exp.token_ids)
    assert all(stats["faults"].get(k) for k in ("nonjson", "nochoices", "wrongn"))
    m = second.usage_metrics()  # both processes
    assert m["failures"]["malformed"] == sum(stats["faults"][k] for k in ("nonjson", "nochoices", "wrongn"))
    assert m["failures"]["dropped"] == stats["faults"]["cut"]
    assert m["responses"] == len(QUESTIONS) and m["requests"] == stats["requests"]
    assert (m["billed_prompt_tokens"], m["billed_completion_tokens"]) == (stats["reported_prompt_tokens"], stats["reported_completion_tokens"])
    assert m["billed_completion_tokens"] > m["completion_tokens"]  # rejected answers were billed too
    assert stats["served_completion_tokens"] > stats["reported_completion_tokens"]  # cut ones: billed, unreported
    assert m["cost_usd"] == pytest.approx((m["billed_prompt_tokens"] + 2 * m["billed_completion_tokens"]) / 1e6)
    assert second.usage.responses == len(QUESTIONS) - 4  # its own share stays its own


def _seed_where(spec: str, first: str | None, second: str | None) -> int:
    for s in range(1000):
        f = parse_faults(spec, s)
        if (f.draw(), f.draw()) == (first, second):
            return s
    raise AssertionError("no seed")


@pytest.mark.parametrize("cap", [None, 0.2])
def test_retry_after_is_honoured_and_bounded(tiny_model_dir, tmp_path_factory, tmp_path, cap):
    spec = "429=0.5,retry_after=1"
    seed = _seed_where(spec, "429", None)  # the first request is refused, the retry is not
    with serving(tiny_model_dir, tmp_path_factory, faults=spec, seed=seed) as (url, stats):
        kw = {"max_retry_after": cap} if cap else {}
        t = _client(url, tmp_path, backoff_base=0.001, cache=False, **kw)
        start = time.perf_counter()
        out = t.generate(_msgs()[:1], GREEDY)
        elapsed = time.perf_counter() - start
    assert len(out) == 1 and t.usage.failures == {"429": 1} and t.usage.retries == 1
    # what the client chose to wait (not wall time, which a loaded machine stretches)
    if cap is None:
        assert t.usage.waited_s >= 1.0 and elapsed >= 1.0  # waited what the server asked
    else:
        assert t.usage.waited_s < 0.25  # a client-side cap bounds what a server may ask for


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


def test_dead_endpoint_is_one_line_error(tmp_path):
    url = _dead_url()
    t = _client(url, tmp_path, backoff_base=0.01)
    with pytest.raises(StillhouseError) as e:
        t.generate(_msgs()[:3], GREEDY)
    msg = str(e.value)
    assert "cannot reach endpoint" in msg and url in msg and "\n" not in msg


def test_missing_key_variable_and_key_never_leaks(server, tmp_path, monkeypatch):
    url, _ = server
    monkeypatch.delenv("SH_TEST_KEY", raising=False)
    with pytest.raises(StillhouseError, match=r"environment variable SH_TEST_KEY .* is not set"):
        _client(url, tmp_path, api_key_env="SH_TEST_KEY")
    secret = "sk-test-" + "Z9" * 12
    monkeypatch.setenv("SH_TEST_KEY", secret)
    t = _client(url, tmp_path, api_key_env="SH_TEST_KEY")
    assert secret not in repr(t)
    # a client error echoing the request must not echo the key either
    t.model = "no-such-model"
    with pytest.raises(StillhouseError) as e:
        t.generate(_msgs()[:1], GREEDY)
    assert "HTTP 404" in str(e.value) and secret not in str(e.value)


def test_server_answers_models_and_rejects_bad_requests(server):
    url, _ = server
    assert httpx.get(f"{url}/models").json()["data"][0]["id"] == "tiny"
    r = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "a"}], "tools": []})
    assert r.status_code == 400 and "'tools'" in r.json()["error"]["message"]  # refused, never ignored
    r = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": "a", "max_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 8, "stop": ["x"], "temperature": 0})
    assert r.status_code == 200 and "x" not in r.json()["choices"][0]["text"]


def test_concurrent_requests_share_batches(server, tmp_path):
    url, _ = server
    before = httpx.get(url.removesuffix("/v1") + "/stillhouse/stats").json()
    t = _client(url, tmp_path, max_concurrency=8, cache=False)
    t.generate(_msgs([f"question {i}" for i in range(16)]), GREEDY)
    after = httpx.get(url.removesuffix("/v1") + "/stillhouse/stats").json()
    prompts, batches = after["prompts"] - before["prompts"], after["batches"] - before["batches"]
    assert prompts == 16 and batches < 16  # some requests were generated together
