"""Helpers for the guard gateway tests: a stub OpenAI upstream whose hidden reasoning carries a
canary, and a gateway wired to it (not a test file: pytest collects only test_*.py).

The stub is a naive reasoning server, the worst case for the gateway: its raw output is
`<think>REASONING</think>ANSWER`, and it reports log-probs, top alternatives, echo and usage
for every token, hidden or not. Its reasoning is written only in the letters of HIDDEN
(Cyrillic), which no answer, prompt or marker uses: a response leaks iff one of them appears.
Tokens are 1-5 characters in a fixed cycle, so markers are split across tokens and chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from stillhouse.apikeys import KeyStore
from stillhouse.guard.config import GuardConfig
from stillhouse.guard.gateway import create_app
from stillhouse.serve import ServerThread

HIDDEN = "ЖЯЮ"
CANARY = "ЖЯЮЯЖЮЖЖЯЮ"
ANSWER = "The answer is 42."
SIZES = [1, 2, 3, 5, 4]


def reasoning(i: int = 0) -> str:
    return f"{CANARY} ЯЖЮ ЮЖЯ{'Ж' * (i + 1)} ЖЮЯ ЯЯЖ ЮЮЮ"


def tokens(text: str) -> list[str]:
    out, pos, k = [], 0, 0
    while pos < len(text):
        n = SIZES[k % len(SIZES)]
        out.append(text[pos : pos + n])
        pos, k = pos + n, k + 1
    return out


def hidden_in(obj) -> bool:
    """Whether any string (key or value) anywhere in a parsed JSON value has a hidden letter."""
    if isinstance(obj, str):
        return any(c in obj for c in HIDDEN)
    if isinstance(obj, dict):
        return any(hidden_in(k) or hidden_in(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(hidden_in(v) for v in obj)
    return False


def _alts(tok: str, k: int) -> list[tuple[str, float]]:
    fill = "Ж" if any(c in HIDDEN for c in tok) else "x"
    return [(fill * (j + 1), -1.0 - j) for j in range(k)]


def _raw(style: str, tail: str | None, i: int) -> str:
    r = reasoning(i)
    if (tail or "").endswith("<think>") or style == "r1":
        return f"{r}</think>{ANSWER}"  # the prompt or the template opened the block
    if style == "multi":
        return f"<think>{r}</think>Part one. <think>{r}</think>Part two."
    return f"<think>{r}</think>{ANSWER}"


def stub_upstream() -> FastAPI:
    """Model names choose the style: inline (default), field (reasoning_content), r1 (no open
    marker), multi (two blocks), tool (reasoning inside tool-call arguments), slow (inline,
    streamed 50 ms a token)."""
    app = FastAPI()
    app.state.calls = 0
    app.state.raw = []  # every raw output generated: the canary IS there upstream

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

    async def generate(request: Request, chat: bool):
        app.state.calls += 1
        body = await request.json()
        style = body.get("model", "inline")
        n = body.get("n") or 1
        if not 1 <= n <= 64:  # as OpenAI-compatible servers do
            return JSONResponse({"error": {"message": "n must be between 1 and 64", "type": "invalid_request_error"}}, status_code=400)
        if chat:
            msgs = body["messages"]
            tail = msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else None
            prompts = [tail]
        else:
            p = body["prompt"]
            prompts = p if isinstance(p, list) else [p]
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        top = (body.get("top_logprobs") or 0) if chat else (body.get("logprobs") or 0)
        want_lp = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
        choices = []
        for pi, prompt in enumerate(prompts):
            for j in range(n):
                idx = pi * n + j
                raw = _raw(style, prompt, idx)
                app.state.raw.append(raw)
                reason = "stop"
                for s in stops:
                    if s in raw:
                        raw, reason = raw[: raw.index(s)], "stop"
                toks = tokens(raw)
                if body.get("max_tokens") and len(toks) > body["max_tokens"]:
                    toks, reason = toks[: body["max_tokens"]], "length"
                prefix = prompt if body.get("echo") and prompt else ""
                choices.append((idx, prefix, toks, reason))
        usage = {"prompt_tokens": 7, "completion_tokens": sum(len(t) for _, _, t, _ in choices), "total_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("stream"):
            return StreamingResponse(_stream(chat, style, choices, want_lp, top, usage, body), media_type="text/event-stream")
        out = []
        for idx, prefix, toks, reason in choices:
            all_toks = (tokens(prefix) if prefix else []) + toks
            if chat:
                out.append(_chat_choice(style, idx, toks, reason, want_lp, top, prefix))
            else:
                out.append({"index": idx, "text": "".join(all_toks), "finish_reason": reason,
                            "logprobs": _comp_lp(all_toks, top, 0) if want_lp else None})
        return {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0,
                "model": style, "choices": out, "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, False)

    return app


def _chat_lp(toks: list[str], top: int) -> list[dict]:
    return [{"token": t, "logprob": -0.5, "bytes": list(t.encode()),
             "top_logprobs": [{"token": a, "logprob": lp, "bytes": list(a.encode())} for a, lp in _alts(t, top)]} for t in toks]


def _comp_lp(toks: list[str], top: int, start: int) -> dict:
    offs, pos = [], start
    for t in toks:
        offs.append(pos)
        pos += len(t)
    return {"tokens": toks, "token_logprobs": [-0.5] * len(toks),
            "top_logprobs": [dict(_alts(t, top)) for t in toks] if top else None, "text_offset": offs}


def _split_field(toks: list[str]) -> tuple[str, str]:
    raw = "".join(toks)
    if "</think>" in raw:
        r, _, a = raw.partition("</think>")
        return r.replace("<think>", ""), a
    return raw.replace("<think>", ""), ""


def _tool_args(raw: str) -> str:
    return json.dumps({"city": "Paris", "notes": raw}, ensure_ascii=False)


def _chat_choice(style, idx, toks, reason, want_lp, top, prefix) -> dict:
    raw = prefix + "".join(toks)
    msg = {"role": "assistant", "content": raw}
    lp = {"content": _chat_lp(tokens(prefix) + toks, top)} if want_lp else None
    if style == "field":
        r, a = _split_field(toks)
        msg = {"role": "assistant", "content": a, "reasoning_content": r}
    if style == "tool":
        msg = {"role": "assistant", "content": None,
               "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": _tool_args(raw)}}]}
        reason = "tool_calls"
    return {"index": idx, "message": msg, "finish_reason": reason, "logprobs": lp}


async def _stream(chat, style, choices, want_lp, top, usage, body):
    base = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0, "model": style}
    seqs = []
    for idx, prefix, toks, reason in choices:
        seqs.append((idx, (tokens(prefix) if prefix else []) + toks, reason))
    if chat:
        for idx, _, _ in seqs:
            yield f"data: {json.dumps({**base, 'choices': [{'index': idx, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}]})}\n\n"
    if style == "field":  # reasoning tokens in their own field (with their log-probs), then the answer
        split = [(idx, _split_field(toks), reason) for idx, toks, reason in seqs]
        seqs = [(idx, [("reasoning_content", t) for t in tokens(r)] + [("content", t) for t in tokens(a)], reason)
                for idx, (r, a), reason in split]
    else:
        seqs = [(idx, [("content", t) for t in toks], reason) for idx, toks, reason in seqs]
    longest = max(len(t) for _, t, _ in seqs)
    offsets = {idx: 0 for idx, _, _ in seqs}
    for k in range(longest + 1):
        for idx, toks, reason in seqs:
            if k > len(toks):
                continue
            if k == len(toks):
                ch = {"index": idx, "finish_reason": "tool_calls" if style == "tool" else reason}
                ch.update({"delta": {}} if chat else {"text": ""})
            else:
                field, t = toks[k]
                if chat:
                    delta = {field: t}
                    if style == "tool":
                        delta = {"tool_calls": [{"index": 0, **({"id": "call_1", "type": "function"} if k == 0 else {}),
                                                 "function": {**({"name": "weather"} if k == 0 else {}), "arguments": t}}]}
                    ch = {"index": idx, "delta": delta, "finish_reason": None,
                          "logprobs": {"content": _chat_lp([t], top)} if want_lp else None}
                else:
                    ch = {"index": idx, "text": t, "finish_reason": None,
                          "logprobs": _comp_lp([t], top, offsets[idx]) if want_lp else None}
                    offsets[idx] += len(t)
            yield f"data: {json.dumps({**base, 'choices': [ch]}, ensure_ascii=False)}\n\n"
            if style == "slow":  # a long generation: the client can leave in the middle
                await asyncio.sleep(0.05)
    if (body.get("stream_options") or {}).get("include_usage"):
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


@contextlib.contextmanager
def upstream_server():
    app = stub_upstream()
    with ServerThread(app) as url:
        yield app, url


def make_keys(path: Path, *specs: dict) -> list[str]:
    """Keys for (account, org, limits) specs; returns the plaintext keys."""
    store = KeyStore.load(path, create=True)
    return [store.add(account=s.get("account", "a"), org=s.get("org", "o"), limits=s.get("limits"))[1] for s in specs]


def guard_config(tmp: Path, **over) -> GuardConfig:
    data = {"keys": str(tmp / "keys.json"), "log": {"path": str(tmp / "log.sqlite"), "flush_ms": 10}}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return GuardConfig.model_validate(data)


@contextlib.contextmanager
def gateway_server(cfg: GuardConfig, upstream_url: str):
    app = create_app(cfg, upstream_url)
    with ServerThread(app) as url:
        yield app, url


def wait_rows(path: Path, n: int, timeout: float = 300) -> int:
    """Wait (on completion, bounded) until the log holds n committed rows; return the count."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(path)) as con:
            try:
                (count,) = con.execute("SELECT count(*) FROM requests").fetchone()
            except sqlite3.OperationalError:
                count = 0
        if count >= n or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def sse_events(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            out.append(json.loads(line[5:]))
    return out


def post(url: str, path: str, key: str | None, body: dict) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=300)  # a bound for a hung server, not a speed test
