"""`stillhouse guard serve`: an OpenAI-compatible reverse proxy in front of any upstream.

Per request, in order, and nothing reaches the upstream until all pass: a valid API key (401),
a well-formed body (400/413), the key's log-prob permissions (400), the key's and the
organisation's rate limits and quotas (429 + Retry-After). Then the body goes upstream as is
(streamed requests also ask for usage, to count tokens), the answer comes back through the
reasoning withholding (responses.py), and one row goes to the request log (reqlog.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..apikeys import KeyRecord, KeyStore, bearer_token
from ..errors import StillhouseError
from ..teachers.endpoint import normalise
from .config import GuardConfig, Limits
from .quotas import Quotas
from .reqlog import RequestLog
from .responses import ResponseFilter

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
# uvicorn's C HTTP parser and event loop (uvicorn[standard]): with the pure-Python h11 parser and
# asyncio's loop the gateway spent about twice the CPU per request (bench/guard_overhead.py; docs/guard.md)
HTTP, LOOP = "httptools", "auto"  # auto: uvloop where it is installed (not on Windows)


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


class Keys:
    """The key file, re-read when it changes (so `guard keys add/revoke` apply to a running
    gateway), with each key's limits parsed once."""

    def __init__(self, path: Path, cfg: GuardConfig):
        self.path, self.cfg = path, cfg
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        store = KeyStore.load(self.path)
        limits = {}
        for rec in store.records:
            try:
                limits[rec.id] = self.cfg.limits.key.merged(rec.limits or None)
            except Exception as e:
                raise StillhouseError(f"{self.path}: bad limits for key {rec.id}: {str(e).splitlines()[-1].strip()}") from None
        self.mtime = self.path.stat().st_mtime_ns
        self.store, self.limits = store, limits

    def lookup(self, key: str | None) -> tuple[KeyRecord, Limits] | None:
        now = time.monotonic()
        if now - self._checked > 1.0:
            self._checked = now
            with contextlib.suppress(OSError):
                if self.path.stat().st_mtime_ns != self.mtime:
                    try:
                        self._load()
                    except StillhouseError as e:  # keep serving with the last good file
                        print(f"guard: keeping the previous keys: {e}", file=sys.stderr)
                        self.mtime = self.path.stat().st_mtime_ns
        rec = self.store.lookup(key)
        return None if rec is None else (rec, self.limits[rec.id])


def _prompt_texts(chat: bool, body: dict) -> tuple[str, str | None]:
    """(all prompt text, system prompt) of a request, for the log's hashes and intents."""
    if chat:
        parts, system = [], []
        for m in body.get("messages") or []:
            if not isinstance(m, dict):
                continue
            c = m.get("content")
            text = c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if isinstance(p, dict)) if isinstance(c, list) else ""
            parts.append(text)
            if m.get("role") in ("system", "developer"):
                system.append(text)
        return "\n".join(parts), ("\n".join(system) or None)
    p = body.get("prompt")
    if isinstance(p, list):
        return "\n".join(x for x in p if isinstance(x, str)), None
    return (p if isinstance(p, str) else ""), None


I16, I32 = 2**15 - 1, 2**31 - 1  # the log's integer column ranges (log_schema: int16, int32)


def _int(v, hi: int = I32) -> int | None:
    """A client's or upstream's number as a log value: an int within the column's range, else None
    (a hostile value must not make the row, or a later Parquet export, fail)."""
    if isinstance(v, bool) or not isinstance(v, int):
        return None
    return max(-hi, min(hi, v))


def _top_requested(chat: bool, body: dict) -> tuple[bool, int]:
    """(log-probs asked for, alternatives per token asked for)."""
    if chat:
        return bool(body.get("logprobs")), int(body.get("top_logprobs") or 0)
    lp = body.get("logprobs")
    return lp is not None and lp is not False, int(lp or 0)


def _check_body(chat: bool, body) -> str | None:
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if chat and not isinstance(body.get("messages"), list):
        return "'messages' must be a list"
    if not chat and not isinstance(body.get("prompt"), (str, list)):
        return "'prompt' must be a string or a list"
    for name in ("n", "max_tokens", "top_logprobs"):
        if body.get(name) is not None and (not isinstance(body[name], int) or isinstance(body[name], bool)):
            return f"'{name}' must be an integer"
    if not chat and body.get("logprobs") is not None and (not isinstance(body["logprobs"], int) or isinstance(body["logprobs"], bool)):
        return "'logprobs' must be an integer for completions"
    return None


UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


async def _sse_lines(r: aiohttp.ClientResponse):
    """The upstream's SSE body as lists of text lines, one list per network read (so that what
    arrived together leaves together), lines of any length (aiohttp's readline caps one)."""
    buf = b""
    async for block in r.content.iter_any():
        buf += block
        *lines, buf = buf.split(b"\n")
        yield [line.decode("utf-8", "replace").rstrip("\r") for line in lines]
    if buf:
        yield [buf.decode("utf-8", "replace")]


def create_app(cfg: GuardConfig, upstream: str) -> Starlette:
    upstream = upstream.rstrip("/")
    shown = normalise(upstream)
    keys = Keys(cfg.keys, cfg)
    quotas = Quotas()
    headers = {"content-type": "application/json"}
    if cfg.upstream.api_key_env:
        secret = os.environ.get(cfg.upstream.api_key_env)
        if not secret:
            raise StillhouseError(f"upstream.api_key_env: environment variable {cfg.upstream.api_key_env} is not set")
        headers["authorization"] = f"Bearer {secret}"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.log = RequestLog(cfg.log.path, log_text=cfg.log.log_text, flush_ms=cfg.log.flush_ms, max_batch=cfg.log.max_batch)
        now = time.time()
        for key_id, org, ts, tokens in app.state.log.today(now):
            quotas.seed(key_id, org, ts, tokens, now)
        # aiohttp, not httpx, for the upstream: with 16 concurrent requests to an instant stub it
        # sustained 5-8x the requests/s of httpx.AsyncClient here (`bench/guard_overhead.py --clients`)
        app.state.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.upstream.max_connections),
            timeout=aiohttp.ClientTimeout(total=cfg.upstream.timeout_s), auto_decompress=True,
        )
        try:
            yield
        finally:
            await app.state.client.close()
            app.state.log.close()

    # Starlette alone: routing is all the gateway needs, and FastAPI's extra middleware layers and
    # per-request dependency solving cost CPU on every request (bench/guard_overhead.py)
    app = Starlette(lifespan=lifespan)

    def finish(row: dict, t0: float, status: int, outcome: str) -> None:
        row["status"], row["outcome"] = status, outcome
        row["latency_ms"] = (time.perf_counter() - t0) * 1000
        app.state.log.append(row)

    async def healthz(request: Request):
        return JSONResponse({"ok": True})

    def authenticate(request: Request, route: str, **fields):
        """(start time, the log row begun, the key's (record, limits) or None); an unknown key is logged as 401."""
        t0 = time.perf_counter()
        row = {"ts": time.time(), "route": route, "user_agent": request.headers.get("user-agent"),
               "client_ip": request.client.host if request.client else None, **fields}
        found = keys.lookup(bearer_token(request.headers.get("authorization")))
        if found is None:
            finish(row, t0, 401, "unauthorized")
        else:
            rec = found[0]
            row.update(account=rec.account, org=rec.org, key_id=rec.id)
        return t0, row, found

    async def models(request: Request):
        t0, row, found = authenticate(request, "/v1/models", param_shape="")
        if found is None:
            return _error(401, "invalid or missing API key", "invalid_api_key")
        try:
            async with app.state.client.get(f"{upstream}/models", headers=headers) as r:
                status, content = r.status, await r.read()
        except UPSTREAM_ERRORS as e:
            finish(row, t0, 502, "upstream_error")
            return _error(502, f"upstream {shown} unreachable: {type(e).__name__}", "upstream_error")
        finish(row, t0, status, "ok" if status == 200 else "upstream_error")
        return Response(content, status_code=status, media_type="application/json")

    async def proxy(request: Request, chat: bool):
        t0, row, found = authenticate(request, "chat" if chat else "completions")
        if found is None:
            return _error(401, "invalid or missing API key", "invalid_api_key")
        rec, key_limits = found
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            finish(row, t0, 413, "bad_request")
            return _error(413, f"request body over {cfg.max_body_bytes} bytes", "invalid_request_error")
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        problem = _check_body(chat, body) if body is not None else "the request body is not valid JSON"
        if problem:
            finish(row, t0, 400, "bad_request")
            return _error(400, problem, "invalid_request_error")
        stream = bool(body.get("stream"))
        wants_lp, top = _top_requested(chat, body)
        prompt, system = _prompt_texts(chat, body)
        row.update(
            model=body.get("model") if isinstance(body.get("model"), str) else None, n=_int(body.get("n") or 1, I16),
            max_tokens=_int(body.get("max_tokens") or body.get("max_completion_tokens")),
            temperature=float(t) if isinstance(t := body.get("temperature"), (int, float)) and not isinstance(t, bool) else None,
            top_logprobs=_int(top, I16), echo=bool(body.get("echo")), stream=stream, param_shape=",".join(sorted(body)),
            _prompt=prompt, _system=system,
        )
        org_limits = cfg.org_limits(rec.org)
        if wants_lp and not (key_limits.logprobs and org_limits.logprobs):
            finish(row, t0, 400, "bad_request")
            return _error(400, "log-probs are turned off for this key", "invalid_request_error")
        caps = [c for c in (key_limits.max_top_logprobs, org_limits.max_top_logprobs) if c is not None]
        if caps and top > min(caps):
            finish(row, t0, 400, "bad_request")
            return _error(400, f"top_logprobs {top} is over this key's cap of {min(caps)}", "invalid_request_error")
        now = time.time()
        refusal = quotas.admit(rec.id, key_limits, rec.org, org_limits, now)
        if refusal:
            finish(row, t0, 429, refusal.outcome)
            return _error(429, refusal.message, "rate_limit_error", {"Retry-After": str(refusal.retry_after)})

        url = f"{upstream}{'/chat/completions' if chat else '/completions'}"
        filt = ResponseFilter(chat, cfg.reasoning, body)

        def account(usage: dict | None) -> None:
            usage = usage if isinstance(usage, dict) else {}
            usage = {k: max(0, _int(usage.get(k)) or 0) for k in ("prompt_tokens", "completion_tokens")} | {
                "completion_tokens_details": usage.get("completion_tokens_details") if isinstance(usage.get("completion_tokens_details"), dict) else None}
            completion = usage["completion_tokens"]
            withheld = max(0, _int(filt.withheld_tokens(usage)) or 0)
            withheld = min(withheld, completion) if completion else withheld
            row.update(prompt_tokens=usage["prompt_tokens"], completion_tokens=max(0, completion - withheld), withheld_tokens=withheld)
            quotas.charge(rec.id, rec.org, usage["prompt_tokens"] + completion, time.time())

        if not stream:
            try:
                async with app.state.client.post(url, data=raw, headers=headers) as r:  # the body as received: checked, unchanged
                    status, content = r.status, await r.read()
            except UPSTREAM_ERRORS as e:
                finish(row, t0, 502, "upstream_error")
                return _error(502, f"upstream {shown} unreachable: {type(e).__name__}", "upstream_error")
            if status != 200:
                return _upstream_failure(row, t0, status, content, filt)
            try:
                resp = json.loads(content)
                if not isinstance(resp, dict):
                    raise ValueError
            except ValueError:
                finish(row, t0, 502, "upstream_error")
                return _error(502, "upstream answered with invalid JSON", "upstream_error")
            resp = filt.whole(resp)
            account(resp.get("usage"))
            out = Response(json.dumps(resp), media_type="application/json")
            finish(row, t0, 200, "ok")
            return out

        client_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
        up_body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        try:
            r = await app.state.client.post(url, data=json.dumps(up_body), headers=headers)
        except UPSTREAM_ERRORS as e:
            finish(row, t0, 502, "upstream_error")
            return _error(502, f"upstream {shown} unreachable: {type(e).__name__}", "upstream_error")
        if r.status != 200:
            try:
                content = await r.read()
            except UPSTREAM_ERRORS:
                content = b""
            r.release()
            return _upstream_failure(row, t0, r.status, content, filt)

        async def events():
            outcome, usage = "cancelled", None
            try:
                async for lines in _sse_lines(r):
                    out = []
                    for line in lines:
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            out.extend(f"data: {json.dumps(c)}\n\n" for c in filt.close())
                            out.append("data: [DONE]\n\n")
                            outcome = "ok"
                            break
                        try:
                            c = json.loads(data)
                        except ValueError:
                            continue  # never forward what could not be checked
                        if not isinstance(c, dict):
                            continue
                        if c.get("usage"):
                            usage = c["usage"]
                            if not client_usage:
                                c.pop("usage")
                                if not c.get("choices"):
                                    continue
                        c = filt.chunk(c)
                        if c is not None:
                            out.append(f"data: {json.dumps(c)}\n\n")
                    if out:
                        yield "".join(out)
                    if outcome == "ok":
                        break
                else:
                    outcome = "upstream_error"  # the upstream ended without [DONE]
            except UPSTREAM_ERRORS:
                outcome = "upstream_error"
            finally:
                # a finished stream's connection goes back to the pool; one left early (client
                # gone, upstream broken) is closed rather than reused half-read
                r.release() if outcome == "ok" and r.content.at_eof() else r.close()
                account(usage)
                finish(row, t0, 200, outcome)

        return StreamingResponse(events(), media_type="text/event-stream")

    def _upstream_failure(row: dict, t0: float, status: int, content: bytes, filt: ResponseFilter) -> Response:
        """Pass an upstream 4xx on (its error, reasoning fields stripped); a 5xx becomes 502."""
        try:
            err = json.loads(content)
            filt.whole(err) if isinstance(err, dict) else None
        except ValueError:
            err = None
        if status >= 500 or not isinstance(err, dict):
            finish(row, t0, 502, "upstream_error")
            return _error(502, f"upstream answered {status}", "upstream_error")
        finish(row, t0, status, "bad_request" if status < 500 else "upstream_error")
        return JSONResponse(err, status_code=status)

    async def chat_completions(request: Request):
        return await proxy(request, True)

    async def completions(request: Request):
        return await proxy(request, False)

    app.add_route("/healthz", healthz, methods=["GET"])
    app.add_route("/v1/models", models, methods=["GET"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])

    return app


def check_upstream(upstream: str, cfg: GuardConfig) -> None:
    """Fail fast (one line, credentials redacted) when the upstream cannot be reached."""
    headers = {}
    if cfg.upstream.api_key_env and os.environ.get(cfg.upstream.api_key_env):
        headers["authorization"] = f"Bearer {os.environ[cfg.upstream.api_key_env]}"
    if cfg.upstream.api_key_env and not os.environ.get(cfg.upstream.api_key_env):
        raise StillhouseError(f"upstream.api_key_env: environment variable {cfg.upstream.api_key_env} is not set")
    try:
        r = httpx.get(f"{upstream.rstrip('/')}/models", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise StillhouseError(f"upstream {normalise(upstream)} unreachable: {type(e).__name__}") from None
    except ValueError as e:  # not a URL at all
        raise StillhouseError(f"--upstream {normalise(upstream)!r}: not a usable URL ({e})") from None
    if r.status_code in (401, 403):
        given = f"the key in {cfg.upstream.api_key_env}" if cfg.upstream.api_key_env else "no key (set upstream.api_key_env)"
        raise StillhouseError(f"upstream {normalise(upstream)} refused {given}: HTTP {r.status_code}")


def serve(upstream: str, config: str | Path, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run the gateway in the foreground until interrupted."""
    import uvicorn

    from ..serve import _bind
    from .config import load_config

    cfg = load_config(config)
    if not urlsplit(upstream).scheme in ("http", "https"):
        raise StillhouseError(f"--upstream {normalise(upstream)!r}: must be an http(s) URL such as http://127.0.0.1:8000/v1")
    sock = _bind(host, port)  # sets TCP_NODELAY for accepted connections
    try:
        KeyStore.load(cfg.keys)  # a missing or broken key file fails here, before anything listens
        from .reqlog import check_log

        check_log(cfg.log.path)
        if cfg.upstream.check:
            check_upstream(upstream, cfg)
        app = create_app(cfg, upstream)
        print(f"stillhouse guard: http://{host}:{sock.getsockname()[1]}/v1 -> {normalise(upstream)}", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, http=HTTP, loop=LOOP)).run(sockets=[sock])
    finally:
        sock.close()
