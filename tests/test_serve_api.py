"""`stillhouse serve` against the official `openai` client and raw HTTP: streaming, the OpenAI
request formats, refusals in OpenAI's error shape, limits, continuous batching, cancellation."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from serve_support import LONG_CONTEXT, long_context_model, serving, stats, wait_for


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return long_context_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with serving(model_dir, tmp_path_factory, max_batch=8) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0)


def _chat(content="hi"):
    return [{"role": "user", "content": content}]


def test_openai_client_chat_whole_and_streamed(client):
    whole = client.chat.completions.create(model="tiny", messages=_chat(), max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    text = whole.choices[0].message.content
    stream = client.chat.completions.create(model="tiny", messages=_chat(), max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)  # the client parses every event and stops at `data: [DONE]`
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    # message content as a list of text parts is the same conversation
    parts = client.chat.completions.create(model="tiny", max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}])
    assert parts.choices[0].message.content == text


def test_openai_client_completions_text_token_ids_echo_and_stream(client, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = "The sum of 2 and 3 is"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    text = whole.choices[0].text
    by_ids = client.completions.create(model="tiny", prompt=tok(prompt)["input_ids"], max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == text and by_ids.usage.prompt_tokens == whole.usage.prompt_tokens
    two = client.completions.create(model="tiny", prompt=[tok("ab")["input_ids"], tok(prompt)["input_ids"]], max_tokens=10, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[1].text == text
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + text
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_echo_scores_the_prompt_like_generation_scores_its_tokens(client):
    """lm-eval's loglikelihood request (echo, max_tokens=0, logprobs): the prompt's own
    log-probs must equal what generation reported for the same tokens."""
    gen = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0, logprobs=2,
                                    extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    ids = [int(t.removeprefix("token_id:")) for t in gen.choices[0].logprobs.tokens]
    prompt_ids = [int(t.removeprefix("token_id:")) for t in client.completions.create(
        model="tiny", prompt="abc", max_tokens=0, echo=True, logprobs=0, extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs.tokens]
    scored = client.completions.create(model="tiny", prompt=prompt_ids + ids, max_tokens=0, echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt_ids) + len(ids)
    assert lp.token_logprobs[len(prompt_ids):] == pytest.approx(gen.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert scored.choices[0].finish_reason == "length" and scored.usage.completion_tokens == 0


@pytest.mark.parametrize("endpoint,extra,param", [
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, None),
    ("chat/completions", {"top_logprobs": 2}, None),  # without logprobs=true, as OpenAI
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content.0.type"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0.role"),
    ("chat/completions", {"audio": {"voice": "x"}}, "audio"),
    ("completions", {"best_of": 3}, None),
    ("completions", {"suffix": "x"}, "suffix"),
    ("completions", {"logit_bias": {"999999": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": 500}}, "logit_bias"),
    ("completions", {"made_up": 1}, "made_up"),
    ("completions", {"max_tokens": 0}, "max_tokens"),  # 0 is only for echo
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [[]]}, "prompt"),
    ("completions", {"prompt": [10**9]}, "prompt"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completions", {"n": 0}, "n"),
])
def test_unsupported_or_invalid_parameters_are_400_in_openai_shape(server, endpoint, extra, param):
    body = {"model": "tiny", "max_tokens": 2, **({"messages": _chat()} if endpoint.startswith("chat") else {"prompt": "a"}), **extra}
    r = httpx.post(f"{server}/{endpoint}", json=body, timeout=None)
    assert r.status_code == 400, r.text
    err = r.json()
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error" and "\n" not in err["error"]["message"]
    if param:
        assert err["error"]["param"] == param


def test_openai_client_sees_refusals_as_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny", messages=_chat(), tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="tiny", prompt="a", best_of=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="a")


@pytest.mark.parametrize("raw", [
    b"not json", b"[]", b"null", b'{"model": "tiny"}', b'{"model": "tiny", "prompt": "a", "seed": 1' + b"0" * 60 + b"}",
    b'{"model": "tiny", "prompt": "a", "seed": -5, "max_tokens": 1}', b'{"model": "tiny", "prompt": "a", "max_tokens": 1e30}',
    b'{"model": "tiny", "prompt": "a", "max_tokens": 2, "temperature": 2, "top_p": 1e-9, "n": 64}',
    b'{"model": "tiny", "prompt": "a", "max_tokens": 2, "stop": ["", "\\u0000"], "presence_penalty": 2, "frequency_penalty": -2}',
    b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 1}', b'{"model": "tiny", "prompt": [0], "max_tokens": 1, "echo": true, "logprobs": 20}',
])
def test_no_server_error_from_odd_bodies(server, raw):
    r = httpx.post(f"{server}/completions", content=raw, headers={"content-type": "application/json"}, timeout=None)
    assert r.status_code < 500, r.text
    assert "detail" not in r.json()


def test_prompt_over_the_context_is_refused_before_any_work(server):
    before = stats(server)
    huge = httpx.post(f"{server}/completions", json={"model": "tiny", "prompt": "x" * 1_000_000}, timeout=None)
    assert huge.status_code == 400 and "cannot fit the model's context of 4096 tokens" in huge.json()["error"]["message"]
    long = httpx.post(f"{server}/chat/completions", json={"model": "tiny", "messages": _chat("y" * LONG_CONTEXT)}, timeout=None)
    assert long.status_code == 400 and "the model's context is 4096 tokens" in long.json()["error"]["message"]
    ids = httpx.post(f"{server}/completions", json={"model": "tiny", "prompt": [5] * (LONG_CONTEXT + 1)}, timeout=None)
    assert ids.status_code == 400
    after = stats(server)
    assert (after["prompts"], after["steps"]) == (before["prompts"], before["steps"])  # the model never ran


def test_max_tokens_is_clamped_to_the_context(model_dir, tmp_path_factory):
    with serving(model_dir, tmp_path_factory, max_context=48) as (url, _):
        r = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": "abcdefghij", "max_tokens": 10**12, "ignore_eos": True}, timeout=None)
        body = r.json()
        assert r.status_code == 200 and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 38, "total_tokens": 48}


async def _long_stream(url: str, started: asyncio.Event, finished: asyncio.Event, client: httpx.AsyncClient):
    """A request for the whole context (it never stops on its own within the test)."""
    body = {"model": "tiny", "prompt": "a", "max_tokens": LONG_CONTEXT, "ignore_eos": True, "stream": True}
    async with client.stream("POST", f"{url}/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                started.set()
                if json.loads(line[6:])["choices"][0]["finish_reason"]:
                    finished.set()


def test_short_request_finishes_while_a_long_one_decodes_and_disconnect_cancels(server):
    before = stats(server)

    async def scenario():
        started, finished = asyncio.Event(), asyncio.Event()
        async with httpx.AsyncClient(timeout=None) as c:
            long = asyncio.create_task(_long_stream(server, started, finished, c))
            await started.wait()
            short = await c.post(f"{server}/chat/completions", json={"model": "tiny", "messages": _chat(), "max_tokens": 3})
            assert short.status_code == 200
            assert not finished.is_set()  # the short answer did not wait for the long one
            now = stats(server)
            assert now["running"] == 1 and now["in_flight"] == 1  # the long row is still decoding, and counted
            long.cancel()  # the client goes away mid-stream
            with pytest.raises(asyncio.CancelledError):
                await long

    asyncio.run(scenario())
    after = wait_for(lambda: (s := stats(server))["running"] == 0 and s["cancelled"] > before["cancelled"] and s, "the long row to be cancelled")
    assert after["cancelled"] == before["cancelled"] + 1
    wait_for(lambda: stats(server)["in_flight"] == 0, "the stream's slot to be freed")
    assert after["generated_tokens"] - before["generated_tokens"] < LONG_CONTEXT  # it stopped early
    settled = after["generated_tokens"]
    assert stats(server)["generated_tokens"] == settled  # and generates nothing more


def test_a_whole_response_request_is_cancelled_when_its_client_disconnects(server):
    before = stats(server)

    async def scenario():
        async with httpx.AsyncClient(timeout=None) as c:
            body = {"model": "tiny", "prompt": "a", "max_tokens": LONG_CONTEXT, "ignore_eos": True}
            req = asyncio.create_task(c.post(f"{server}/completions", json=body))
            await asyncio.to_thread(wait_for, lambda: stats(server)["running"] == 1, "the request to start decoding")
            req.cancel()
            with pytest.raises(asyncio.CancelledError):
                await req

    asyncio.run(scenario())
    after = wait_for(lambda: (s := stats(server))["running"] == 0 and s["cancelled"] > before["cancelled"] and s, "the row to be cancelled")
    assert after["disconnected"] == before["disconnected"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < LONG_CONTEXT


def test_requests_over_the_concurrency_bound_get_429(model_dir, tmp_path_factory):
    with serving(model_dir, tmp_path_factory, max_concurrent=1) as (url, _):

        async def scenario():
            async with httpx.AsyncClient(timeout=None) as c:
                body = {"model": "tiny", "prompt": "a", "max_tokens": LONG_CONTEXT, "ignore_eos": True}
                busy = asyncio.create_task(c.post(f"{url}/completions", json=body))
                await asyncio.to_thread(wait_for, lambda: stats(url)["in_flight"] == 1, "the first request to be in flight")
                r = await c.post(f"{url}/completions", json={**body, "max_tokens": 1})
                busy.cancel()
                return r

        r = asyncio.run(scenario())
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
        wait_for(lambda: stats(url)["in_flight"] == 0, "the slot to free")
        ok = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 1}, timeout=None)
        assert ok.status_code == 200


def test_seeded_sampling_does_not_depend_on_batch_neighbours(server):
    body = {"model": "tiny", "prompt": "seed test", "max_tokens": 8, "temperature": 1.0, "seed": 12345, "n": 2}

    async def together():
        async with httpx.AsyncClient(timeout=None) as c:
            others = [c.post(f"{server}/completions", json={**body, "seed": s}) for s in range(4)]
            rs = await asyncio.gather(c.post(f"{server}/completions", json=body), *others)
            return rs[0].json()

    alone = httpx.post(f"{server}/completions", json=body, timeout=None).json()
    crowded = asyncio.run(together())
    assert [c["text"] for c in alone["choices"]] == [c["text"] for c in crowded["choices"]]
    assert alone["choices"][0]["text"] != alone["choices"][1]["text"]  # two choices, two samples


def test_stop_strings_cut_whole_and_streamed_answers_alike(client):
    base = dict(model="tiny", prompt="stop test", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**base).choices[0].text
    stop = full[12:15]
    expected = full[: full.find(stop)]
    whole = client.completions.create(**base, stop=[stop, "\u0001never"]).choices[0]
    assert whole.text == expected and whole.finish_reason == "stop"
    chunks = list(client.completions.create(**base, stop=[stop, "\u0001never"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected  # held-back text never leaked the stop string
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streamed_choices_of_several_prompts_match_the_whole_answer(client):
    base = dict(model="tiny", prompt=["ab", "cd"], max_tokens=8, temperature=0.9, seed=7, n=2, logprobs=1)
    whole = client.completions.create(**base)
    texts = {c.index: "" for c in whole.choices}
    finish = {}
    for chunk in client.completions.create(**base, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices} and sorted(finish) == [0, 1, 2, 3]
    assert finish == {c.index: c.finish_reason for c in whole.choices}
