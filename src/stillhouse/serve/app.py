"""The OpenAI-compatible HTTP surface: /v1/chat/completions, /v1/completions, /v1/models.

Responses follow the OpenAI shapes, streamed (server-sent events ending in `data: [DONE]`) or
whole, including `logprobs` (chat: `content` entries with `top_logprobs`; completions: parallel
`tokens`/`token_logprobs`/`top_logprobs`/`text_offset` lists) and vLLM's
`return_tokens_as_token_ids` extension (tokens spelled `token_id:<id>`), which lets a client
recover exact token ids for the logit cache.

Safety, in the order a request meets it: API key (`limits.py`, before the body is read), body
size, the in-flight bound (429), body validation (400 in OpenAI's shape), the prompt against
the model's context (400, before any model work), `max_tokens` clamped to what the context
has left. A client that disconnects cancels its rows at the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..teachers.hf import render_chat
from .engine import Engine, Job, Sampling, Seq, wait_all
from .faults import MALFORMED, Faults, account, malformed_body
from .limits import GuardMiddleware, KeyCheck, PromptLimits
from .protocol import ChatRequest, CompletionRequest, Reject, SafeJSONResponse, _Common, error, unsupported, validation_message
from .stream import deltas, sse_response


@dataclass(frozen=True)
class ServeConfig:
    served_name: str
    context: int  # tokens a prompt plus its completion may use (the model's, or less)
    default_max_tokens: int = 256  # when a request names no max_tokens (then clamped to the context)
    max_concurrent: int = 64  # requests in flight at once; more get 429 (a client should retry)
    max_choices: int = 256  # prompts x n in one request; more is a 400
    max_body_bytes: int = 8 << 20  # request bodies larger than this get 413 before being parsed


class _Cut(Exception):
    """Raised inside a streamed body to drop the connection mid-response (fault injection)."""


def create_app(engine: Engine, cfg: ServeConfig, faults: Faults | None = None, keys: KeyCheck | None = None) -> FastAPI:
    tok = engine.tok
    vocab = engine.model.get_input_embeddings().num_embeddings
    limits = PromptLimits(tok, cfg.context)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="stillhouse serve", lifespan=lifespan, default_response_class=SafeJSONResponse)
    app.add_middleware(GuardMiddleware, keys=keys, max_body_bytes=cfg.max_body_bytes)
    app.state.stats = {"requests": 0, "completed": 0, "faults": {}, "in_flight": 0, "rejected_busy": 0, "disconnected": 0}
    stats = app.state.stats

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):  # a bug; the fuzz test keeps this unreachable
        return error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.exception_handler(Reject)
    async def _rejected(request: Request, exc: Reject):
        return error(exc.status, exc.message, param=exc.param)

    # -- turning a request into engine jobs --------------------------------------------------
    def check(req: _Common) -> None:
        if req.model != cfg.served_name:
            raise Reject(404, f"model '{req.model}' not found (serving '{cfg.served_name}')", "model")
        if (why := unsupported(req)) is not None:
            raise Reject(400, why)
        for tid, bias in (req.logit_bias or {}).items():
            if not tid.isdigit() or int(tid) >= vocab:
                raise Reject(400, f"logit_bias: '{tid[:40]}' is not a token id of this model (0..{vocab - 1})", "logit_bias")
            if not -100 <= bias <= 100:
                raise Reject(400, f"logit_bias: bias {bias} for token {tid} is outside [-100, 100]", "logit_bias")

    def sampling(req: _Common, requested: int | None, prompt_len: int, top: int, stream: bool) -> Sampling:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        room = cfg.context - prompt_len
        return Sampling(
            max_new_tokens=max(0, min(requested if requested is not None else cfg.default_max_tokens, room)),
            temperature=req.temperature, top_p=req.top_p, seed=req.seed, top_logprobs=top,
            logit_bias=tuple((int(t), b) for t, b in (req.logit_bias or {}).items()),
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            ignore_eos=req.ignore_eos, stop=tuple(s for s in stops if s), track_text=stream or any(stops),
        )

    async def run(request: Request, handle):
        """Faults, the in-flight bound and stats around one generation request."""
        stats["requests"] += 1
        if stats["in_flight"] >= cfg.max_concurrent:
            stats["rejected_busy"] += 1
            return error(429, f"server busy: {cfg.max_concurrent} requests in flight (--max-concurrent); retry later",
                         "rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
        fault = faults.draw() if faults else None
        if fault:
            stats["faults"][fault] = stats["faults"].get(fault, 0) + 1
        if fault == "429":
            return error(429, "rate limited (injected fault)", "rate_limit_error", headers={"Retry-After": f"{faults.retry_after:g}"})
        if fault == "500":
            return error(500, "internal error (injected fault)", "server_error")
        stats["in_flight"] += 1
        response = None
        try:
            if fault == "slow":
                await asyncio.sleep(faults.slow_s)
            response = await handle()
        finally:
            if not getattr(response, "holds_slot", False):  # a stream frees its slot when it ends
                stats["in_flight"] -= 1
        if isinstance(response, JSONResponse):
            account(stats, fault, response.status_code, response.body, log_answers=faults is not None)
            if fault in MALFORMED and response.status_code == 200:
                return Response(malformed_body(fault, response.body), media_type="application/json")
        if fault == "cut" and isinstance(response, JSONResponse) and response.status_code == 200:
            body = response.body

            async def dropped():
                yield body[: len(body) // 2]
                raise _Cut("connection dropped mid-response (injected fault)")

            return StreamingResponse(dropped(), media_type="application/json")
        if response.status_code == 200 and not isinstance(response, StreamingResponse):
            stats["completed"] += 1
        return response

    async def finished(jobs: list[Job], updates: asyncio.Queue, request: Request) -> bool:
        """Wait for the jobs; if the client disconnects first, cancel them and return False."""
        waiter = asyncio.ensure_future(wait_all(jobs, updates))
        watcher = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not waiter.done():
            stats["disconnected"] += 1
            for j in jobs:
                j.cancel()
            waiter.cancel()
            return False
        waiter.result()  # a failed decode step raises here
        return True

    # -- response pieces ---------------------------------------------------------------------
    def token_str(tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else tok.decode([tid])

    def final_text(s: Seq) -> str:
        if s.stop_at >= 0:
            return s.text.text[: s.stop_at]
        return tok.decode(s.token_ids, skip_special_tokens=True)

    def chat_logprobs(s: Seq, a: int, b: int, as_ids: bool) -> dict:
        top = s.sampling.top_logprobs
        content = []
        for i in range(a, min(b, len(s.logprobs))):
            entry = {"token": token_str(s.ids[i], as_ids), "logprob": s.logprobs[i], "bytes": None, "top_logprobs": []}
            if top > 0:
                entry["top_logprobs"] = [{"token": token_str(t, as_ids), "logprob": lp, "bytes": None}
                                         for t, lp in zip(s.topk_ids[i], s.topk_logprobs[i])]
            content.append(entry)
        return {"content": content}

    def completion_logprobs(ids, lps, tops_ids, tops_lps, top: int, as_ids: bool, start: int = 0) -> dict:
        tokens = [token_str(t, as_ids) for t in ids]
        offsets, pos = [], start
        for t in tokens:
            offsets.append(pos)
            pos += 0 if as_ids else len(t)
        tops = None
        if top > 0:
            tops = [None if ti is None else {token_str(t, as_ids): lp for t, lp in zip(ti, tl)} for ti, tl in zip(tops_ids, tops_lps)]
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": tops, "text_offset": offsets}

    def usage(jobs: list[Job]) -> dict:
        prompt = sum(len(j.seqs[0].prompt_ids) for j in jobs)
        completion = sum(len(s.ids) for j in jobs for s in j.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # -- chat ----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        async def handle():
            check(req)
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
            try:
                text = render_chat(tok, messages)
            except Exception as e:  # the template rejects some conversations (e.g. roles out of order)
                raise Reject(400, f"cannot render messages with the model's chat template: {str(e)[:200]}", "messages") from None
            ids = limits.encode(text, "messages")
            top = (req.top_logprobs or 0) if req.logprobs else -1
            sp = sampling(req, req.max_completion_tokens or req.max_tokens, len(ids), top, req.stream)
            updates: asyncio.Queue = asyncio.Queue()
            job = engine.submit(ids, sp, req.n, updates)
            as_ids = req.return_tokens_as_token_ids
            if req.stream:
                return sse_response(stream_chat(job, updates, as_ids, req.stream_options), [job], stats)
            if not await finished([job], updates, request):
                return error(499, "client disconnected")
            choices = [
                {
                    "index": s.index,
                    "message": {"role": "assistant", "content": final_text(s)},
                    "finish_reason": s.finish_reason,
                    "logprobs": chat_logprobs(s, 0, len(s.ids), as_ids) if top >= 0 else None,
                }
                for s in job.seqs
            ]
            return SafeJSONResponse(_envelope("chat.completion", cfg.served_name, choices, usage([job])))

        return await run(request, handle)

    async def stream_chat(job: Job, updates: asyncio.Queue, as_ids: bool, opts):
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices, **extra):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": cfg.served_name,
                    "choices": choices, **extra}

        yield chunk([{"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                     for s in job.seqs])
        async for s, delta, a, b in deltas([job], updates, final_text):
            lp = chat_logprobs(s, a, b, as_ids) if s.sampling.top_logprobs >= 0 and b > a else None
            if delta or lp:
                yield chunk([{"index": s.index, "delta": {"content": delta}, "logprobs": lp, "finish_reason": None}])
            if s.done:
                yield chunk([{"index": s.index, "delta": {}, "logprobs": None, "finish_reason": s.finish_reason}])
        if opts is not None and opts.include_usage:
            yield chunk([], usage=usage([job]))

    # -- completions ---------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        async def handle():
            check(req)
            prompts = _prompt_list(req.prompt)
            if not prompts:
                raise Reject(400, "prompt is empty", "prompt")
            if len(prompts) * req.n > cfg.max_choices:
                raise Reject(400, f"{len(prompts)} prompts x n={req.n} is more than {cfg.max_choices} choices in one request", "prompt")
            encoded = [limits.check_ids(p, vocab) if isinstance(p, list) else limits.encode(p, "prompt", allow_full=req.echo)
                       for p in prompts]
            top = req.logprobs if req.logprobs is not None else -1
            if req.echo and req.stream and top >= 0:
                raise Reject(400, "echo with logprobs is not supported when streaming", "echo")
            for ids in encoded:
                if req.max_tokens != 0 and len(ids) >= cfg.context:
                    raise Reject(400, f"prompt is {len(ids)} tokens; the model's context is {cfg.context} tokens and needs room for at least one new token", "prompt")
            if req.max_tokens == 0 and not req.echo:
                raise Reject(400, "max_tokens=0 generates nothing; it is only useful with echo=true", "max_tokens")
            as_ids = req.return_tokens_as_token_ids
            scored = None
            if req.echo and top >= 0:  # the prompt's own log-probs, computed between decode steps
                scored = [await asyncio.wrap_future(engine.call(lambda ids=ids: engine.score_prompt(ids, top))) for ids in encoded]
            updates: asyncio.Queue = asyncio.Queue()
            jobs = []
            for ids in encoded:
                sp = sampling(req, req.max_tokens, len(ids), top, req.stream)
                jobs.append(engine.submit(ids, sp, req.n, updates) if sp.max_new_tokens > 0 else _empty_job(ids, sp, req.n, updates))
            if req.stream:
                return sse_response(stream_completions(jobs, updates, encoded, req, as_ids), jobs, stats)
            if not await finished(jobs, updates, request):
                return error(499, "client disconnected")
            choices = []
            for p, (job, ids) in enumerate(zip(jobs, encoded)):
                head = tok.decode(ids, skip_special_tokens=False) if req.echo else ""
                for s in job.seqs:
                    lp = None
                    if top >= 0:
                        gen = (s.ids[: len(s.logprobs)], s.logprobs, s.topk_ids, s.topk_logprobs)
                        if scored is not None:
                            lps, tids, tlps = scored[p]
                            gen = (ids + gen[0], [None] + lps + gen[1], [None] + tids + gen[2], [None] + tlps + gen[3])
                        lp = completion_logprobs(*gen, top, as_ids)
                    choices.append({"index": p * req.n + s.index, "text": head + final_text(s), "finish_reason": s.finish_reason, "logprobs": lp})
            return SafeJSONResponse(_envelope("text_completion", cfg.served_name, choices, usage(jobs)))

        return await run(request, handle)

    async def stream_completions(jobs: list[Job], updates: asyncio.Queue, encoded, req: CompletionRequest, as_ids: bool):
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        first = {id(j): p for p, j in enumerate(jobs)}
        sent = {}  # characters already sent per choice (text_offset of the next token)

        def chunk(choices, **extra):
            return {"id": cid, "object": "text_completion", "created": created, "model": cfg.served_name, "choices": choices, **extra}

        if req.echo:
            for p, (j, ids) in enumerate(zip(jobs, encoded)):
                head = tok.decode(ids, skip_special_tokens=False)
                for s in j.seqs:
                    sent[(p, s.index)] = len(head)
                    yield chunk([{"index": p * req.n + s.index, "text": head, "logprobs": None, "finish_reason": None}])
        async for s, delta, a, b in deltas(jobs, updates, final_text):
            p = first[id(s.job)]
            lp = None
            if s.sampling.top_logprobs >= 0 and b > a:
                lp = completion_logprobs(s.ids[a:b], s.logprobs[a:b], s.topk_ids[a:b], s.topk_logprobs[a:b],
                                         s.sampling.top_logprobs, as_ids, sent.get((p, s.index), 0))
            sent[(p, s.index)] = sent.get((p, s.index), 0) + len(delta)
            if delta or lp or s.done:
                yield chunk([{"index": p * req.n + s.index, "text": delta, "logprobs": lp, "finish_reason": s.finish_reason}])
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], usage=usage(jobs))

    # -- the rest ------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.served_name, "object": "model", "created": 0, "owned_by": "stillhouse"}]}

    @app.get("/stillhouse/stats")
    async def server_stats():
        return {**stats, **engine.stats}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def _prompt_list(prompt) -> list:
    """The prompts of a completions request: texts and/or token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


def _empty_job(ids: list[int], sp: Sampling, n: int, updates: asyncio.Queue) -> Job:
    """A job that generates nothing (echo with max_tokens=0): finished at once."""
    from .engine import generators_for

    job = Job(asyncio.get_running_loop(), ids, sp, generators_for(0, n), updates)
    for s in job.seqs:
        s.finish_reason = "length"
        job._notify(s)
    return job


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone away (the body was read already, so only a disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _envelope(obj: str, model: str, choices: list, usage: dict) -> dict:
    prefix = "chatcmpl" if obj == "chat.completion" else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": model, "choices": choices, "usage": usage}
