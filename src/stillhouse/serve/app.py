"""The OpenAI-compatible HTTP surface: /v1/chat/completions, /v1/completions, /v1/models.

Responses follow the OpenAI shapes, including `logprobs` (chat: `content` entries with
`top_logprobs`; completions: parallel `tokens`/`token_logprobs`/`top_logprobs` lists) and
vLLM's `return_tokens_as_token_ids` extension (tokens spelled `token_id:<id>`), which lets a
client recover exact token ids for the logit cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..teachers.base import Completion, SamplingParams
from ..teachers.hf import render_chat
from .batcher import Batcher, GenKey
from .faults import MALFORMED, Faults, account, malformed_body

MAX_TOP_LOGPROBS = 20  # the OpenAI limit


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, stream_options...) are ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    return_tokens_as_token_ids: bool = False


class ChatRequest(_Common):
    messages: list[dict]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class _Cut(Exception):
    """Raised inside a streamed body to drop the connection mid-response (fault injection)."""


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


def create_app(batcher: Batcher, served_name: str, faults: Faults | None = None, default_max_tokens: int = 256) -> FastAPI:
    tok = batcher.teacher.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="stillhouse serve", lifespan=lifespan)
    app.state.stats = {"requests": 0, "completed": 0, "faults": {}}
    stats = app.state.stats

    def token_str(tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else tok.decode([tid])

    def key_for(req: _Common, top: int) -> GenKey:
        params = SamplingParams(
            max_new_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
            temperature=req.temperature, top_p=req.top_p, n=req.n, seed=req.seed or 0,
        )
        return GenKey(params, top)

    async def generate(req: _Common, texts: list[str], top: int) -> list[list[Completion]]:
        outs = await batcher.submit(texts, key_for(req, top))
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if stops:
            for comps in outs:
                for c in comps:
                    apply_stop_strings(tok, c, stops)
        return outs

    def usage(texts_outs: list[list[Completion]]) -> dict:
        prompt = sum(comps[0].prompt_tokens for comps in texts_outs)
        completion = sum(len(c.token_ids) + (c.stop_token is not None) for comps in texts_outs for c in comps)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def scored(c: Completion) -> list[int]:
        return c.token_ids + ([c.stop_token] if c.stop_token is not None else [])

    def chat_logprobs(c: Completion, top: int, as_ids: bool) -> dict:
        content = []
        for i, tid in enumerate(scored(c)):
            entry = {"token": token_str(tid, as_ids), "logprob": c.extra["token_logprobs"][i], "top_logprobs": []}
            if top > 0:
                entry["top_logprobs"] = [
                    {"token": token_str(t, as_ids), "logprob": lp} for t, lp in zip(c.topk_ids[i][:top], c.topk_logprobs[i][:top])
                ]
            content.append(entry)
        return {"content": content}

    def completion_logprobs(c: Completion, top: int, as_ids: bool) -> dict:
        ids = scored(c)
        tokens = [token_str(t, as_ids) for t in ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += 0 if as_ids else len(t)
        tops = None
        if top > 0:
            tops = [
                {token_str(t, as_ids): lp for t, lp in zip(c.topk_ids[i][:top], c.topk_logprobs[i][:top])} for i in range(len(ids))
            ]
        return {"tokens": tokens, "token_logprobs": c.extra["token_logprobs"], "top_logprobs": tops, "text_offset": offsets}

    async def with_faults(handler, request: Request):
        stats["requests"] += 1
        fault = faults.draw() if faults else None
        if fault:
            stats["faults"][fault] = stats["faults"].get(fault, 0) + 1
        if fault == "429":
            return _error(429, "rate limited (injected fault)", "rate_limit_error", {"Retry-After": f"{faults.retry_after:g}"})
        if fault == "500":
            return _error(500, "internal error (injected fault)", "server_error")
        if fault == "slow":
            await asyncio.sleep(faults.slow_s)
        response = await handler()
        account(stats, fault, response.status_code, response.body)
        if fault in MALFORMED and response.status_code == 200:
            return Response(malformed_body(fault, response.body), media_type="application/json")
        if fault == "cut" and response.status_code == 200:
            body = response.body

            async def dropped():
                yield body[: len(body) // 2]
                raise _Cut("connection dropped mid-response (injected fault)")

            return StreamingResponse(dropped(), media_type="application/json")
        if response.status_code == 200:
            stats["completed"] += 1
        return response

    def check(req: _Common) -> JSONResponse | None:
        if req.model != served_name:
            return _error(404, f"model '{req.model}' not found (serving '{served_name}')", "not_found_error")
        if req.stream:
            return _error(400, "stream=true is not supported by stillhouse serve")
        return None

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        async def handle():
            if (bad := check(req)) is not None:
                return bad
            top = (req.top_logprobs or 0) if req.logprobs else -1
            try:
                text = render_chat(tok, req.messages)
            except Exception as e:  # the template rejects malformed messages
                return _error(400, f"cannot render messages: {e}")
            outs = await generate(req, [text], top)
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "logprobs": chat_logprobs(c, top, req.return_tokens_as_token_ids) if top >= 0 else None,
                }
                for i, c in enumerate(outs[0])
            ]
            return JSONResponse(_envelope("chat.completion", served_name, choices, usage(outs)))

        return await with_faults(handle, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        async def handle():
            if (bad := check(req)) is not None:
                return bad
            texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
            if not texts:
                return _error(400, "prompt is empty")
            top = req.logprobs if req.logprobs is not None else -1
            outs = await generate(req, texts, top)
            choices = []
            for comps in outs:
                for c in comps:
                    lp = completion_logprobs(c, top, req.return_tokens_as_token_ids) if top >= 0 else None
                    choices.append({"index": len(choices), "text": c.text, "finish_reason": c.finish_reason, "logprobs": lp})
            return JSONResponse(_envelope("text_completion", served_name, choices, usage(outs)))

        return await with_faults(handle, request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": 0, "owned_by": "stillhouse"}]}

    @app.get("/stillhouse/stats")
    async def server_stats():
        return {**stats, **batcher.stats}

    return app


def _envelope(obj: str, model: str, choices: list, usage: dict) -> dict:
    prefix = "chatcmpl" if obj == "chat.completion" else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": model, "choices": choices, "usage": usage}


def apply_stop_strings(tokenizer, c: Completion, stops: list[str]) -> None:
    """Cut a completion at the first stop string (the string itself is not returned)."""
    hits = [i for i in (c.text.find(s) for s in stops if s) if i >= 0]
    if not hits:
        return
    cut = min(hits)
    c.text = c.text[:cut]
    # keep the tokens up to the one that completed the stop string
    for k in range(1, len(c.token_ids) + 1):
        if len(tokenizer.decode(c.token_ids[:k], skip_special_tokens=True)) > cut:
            break
    n = min(k, len(c.token_ids)) if c.token_ids else 0
    c.token_ids = c.token_ids[:n]
    if c.topk_ids is not None:
        c.topk_ids, c.topk_logprobs = c.topk_ids[:n], c.topk_logprobs[:n]
    if "token_logprobs" in c.extra:
        c.extra["token_logprobs"] = c.extra["token_logprobs"][:n]
    c.finish_reason, c.stop_token = "stop", None
