"""A teacher behind any OpenAI-compatible endpoint (vLLM, llama.cpp server, Ollama, hosted APIs).

Same interface as `HFTeacher`: `generate(messages, params)` uses `/chat/completions`,
`generate_text(rendered_texts, params)` uses `/completions`; both return `params.n`
completions per prompt, in prompt order. Requests run concurrently (asyncio + httpx) under
an adaptive concurrency limit and optional requests/tokens-per-minute buckets; 429, 5xx,
timeouts and dropped connections are retried with jittered exponential backoff, honouring
Retry-After. Every answer is cached on disk, so rerunning the same requests sends none.

Sampling is sent in full: besides temperature and top_p, top_k, min_p and the penalties go in
every request (as "off" unless set), so a server's own sampler defaults (llama.cpp: top_k 40,
min_p 0.05, repeat_penalty 1.1) never apply unrecorded. `sampler_params="standard"` sends only
the OpenAI-spec fields, for hosted APIs that reject the others, and refuses settings it cannot
send. A server that ignores `n` (llama.cpp's) gets n separate requests with seeds seed+0..n-1.

The API key is read from the environment variable the recipe names. It is held only in the
request header: never in a cache key, a manifest, a log line or an error message.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..errors import StillhouseError
from ..models import ModelIdentity, cache_dir
from ..progress import progress
from .base import Completion, Messages, SamplingParams
from .cache import ResponseCache, response_key
from .config import Price
from .endpoint import normalise, refuse_userinfo, scrub
from .ratelimit import AdaptiveLimit, TokenBucket, backoff_delay, parse_retry_after
from .tokens import end_of_turn_ids

_TOKEN_ID = re.compile(r"token_id:(\d+)")


@dataclass
class Usage:
    """What a run cost: HTTP traffic, tokens billed and received, tokens served from the cache, money."""

    requests: int = 0  # HTTP requests sent, retries included
    responses: int = 0  # successful answers received
    cached: int = 0  # answers served from the on-disk cache (no request)
    retries: int = 0
    failures: dict = field(default_factory=dict)  # "429" | "5xx" | "timeout" | "dropped" | "connect" | "malformed" -> count
    prompt_tokens: int = 0  # received: the usage of the answers accepted
    completion_tokens: int = 0
    # billed: the usage the server reported on every answer, accepted or rejected as malformed
    # (a cut connection, a timeout or a non-JSON body report none, though a metered API may bill them)
    billed_prompt_tokens: int = 0
    billed_completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    cost_usd: float = 0.0  # the price of the billed tokens
    waited_s: float = 0.0  # time spent waiting on rate limits and backoff

    def add(self, delta: dict) -> None:
        """Add a change (field -> amount; failures: kind -> count)."""
        for k, v in delta.items():
            if k == "answer":  # the id of a billed answer, kept in the ledger only (reconciling with an invoice)
                continue
            if k == "failures":
                for kind, n in v.items():
                    self.failures[kind] = self.failures.get(kind, 0) + n
            else:
                setattr(self, k, getattr(self, k) + v)

    @classmethod
    def replay(cls, ledger: Path) -> "Usage":
        """The sum of a usage ledger: every process's changes, one JSON line each (a line cut
        short by a kill is skipped: its request is counted again by the rerun that redoes it)."""
        total = cls()
        for line in ledger.read_text(encoding="utf-8").splitlines() if ledger.is_file() else []:
            try:
                delta = json.loads(line)
            except json.JSONDecodeError:
                continue
            total.add(delta)
        return total


class _Retryable(Exception):
    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


class OpenAITeacher:
    backend = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        name: str | None = None,
        api_key_env: str | None = None,
        terms: str = "unknown",
        max_concurrency: int = 8,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        price: Price | dict | None = None,
        cache: bool = True,
        cache_path: str | Path | None = None,
        timeout: float = 120.0,
        max_retries: int = 8,
        connect_retries: int = 2,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_retry_after: float = 120.0,
        token_ids: bool = False,
        tokenizer=None,
        jitter_seed: int | None = None,
        sampler_params: str = "extended",
    ):
        self.name = name or f"openai:{model}"
        refuse_userinfo(base_url, f"teacher '{self.name}'")
        self.base_url = base_url.rstrip("/")
        self.endpoint = normalise(base_url)  # in cache keys and lineage: which server answered
        self.model = model
        self.terms = terms
        self.api_key_env = api_key_env
        self._key = _read_key(api_key_env, self.name)
        self.limit = AdaptiveLimit(max_concurrency)
        self.rpm = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.tpm = TokenBucket(tokens_per_minute) if tokens_per_minute else None
        self.price = Price(**price) if isinstance(price, dict) else (price or Price())
        self.cache = ResponseCache(Path(cache_path) if cache_path else cache_dir() / "responses") if cache else None
        self.timeout = timeout
        self.max_retries = max_retries
        self.connect_retries = connect_retries
        self.backoff_base, self.backoff_cap, self.max_retry_after = backoff_base, backoff_cap, max_retry_after
        self.token_ids = token_ids  # ask for ids (vLLM's `return_tokens_as_token_ids`; `stillhouse serve` too)
        self.tokenizer = tokenizer  # optional: the served model's tokenizer (stop tokens, re-encoding)
        self._rng = random.Random(jitter_seed)
        if sampler_params not in SAMPLER_PARAMS:
            raise StillhouseError(f"teacher '{self.name}': sampler_params must be one of {', '.join(SAMPLER_PARAMS)}")
        self.sampler_params = sampler_params
        self.server_ignores_n = False  # learnt from the first answer with fewer choices than asked
        self.usage = Usage()  # this process's share
        # when set (by the stage), every change is also appended here, so a stage resumed after a
        # kill accounts for the requests of every process that worked on it
        self.ledger: Path | None = None
        self.stats = {"generated_tokens": 0, "seconds": 0.0}  # same keys as HFTeacher.stats

    @classmethod
    def from_config(cls, cfg, name: str | None = None, loader=None) -> "OpenAITeacher":
        """The teacher a `teachers:` entry declares (config.OpenAITeacherConfig); `loader` is unused
        (the served model's tokenizer, when declared, is read alone)."""
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        return cls(
            cfg.base_url, cfg.model, name=name, api_key_env=cfg.api_key_env, terms=cfg.terms,
            max_concurrency=cfg.max_concurrency, requests_per_minute=cfg.requests_per_minute,
            tokens_per_minute=cfg.tokens_per_minute, price=cfg.price, cache=cfg.cache,
            cache_path=cfg.cache_dir, timeout=cfg.timeout, max_retries=cfg.max_retries,
            token_ids=cfg.token_ids, tokenizer=tokenizer, sampler_params=cfg.sampler_params,
        )

    def __repr__(self) -> str:  # never the key
        return f"OpenAITeacher(model={self.model!r}, base_url={self.base_url!r})"

    def identity(self) -> ModelIdentity:
        """What lineage records: the API model name and its terms; no weights hash exists."""
        return ModelIdentity(spec=f"openai:{self.model}", weights_sha256=None, license=self.terms, source=self.endpoint)

    # -- the Teacher interface ------------------------------------------------------------
    def generate(
        self, prompts: list[Messages | str], params: SamplingParams, description: str = "Generating", top_k_logprobs: int = 0
    ) -> list[list[Completion]]:
        """Chat messages go to /chat/completions (the server applies its template); strings to /completions."""
        jobs = [("completions", p) if isinstance(p, str) else ("chat/completions", p) for p in prompts]
        return self._run_sync(jobs, params, top_k_logprobs, description)

    def generate_text(
        self, texts: list[str], params: SamplingParams, description: str = "Generating", top_k_logprobs: int = 0
    ) -> list[list[Completion]]:
        """Already-rendered prompt texts (chat template applied here), sent to /completions."""
        return self._run_sync([("completions", t) for t in texts], params, top_k_logprobs, description)

    def _count(self, **delta) -> None:
        delta = {k: v for k, v in delta.items() if v}
        if not delta:
            return
        self.usage.add(delta)
        if self.ledger is not None:
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            with open(self.ledger, "a", encoding="utf-8") as f:  # one short line: a kill cuts at most this one
                f.write(json.dumps(delta) + "\n")

    def usage_metrics(self) -> dict:
        """Token and cost accounting for a stage manifest (no URL, no key): the ledger's total
        (every process of a resumed stage) when there is one, else this process's."""
        u = Usage.replay(self.ledger) if self.ledger is not None else self.usage
        return {
            "backend": self.backend,
            "model": self.model,
            "requests": u.requests,
            "responses": u.responses,
            "cached_responses": u.cached,
            "retries": u.retries,
            "failures": dict(u.failures),
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "billed_prompt_tokens": u.billed_prompt_tokens,
            "billed_completion_tokens": u.billed_completion_tokens,
            "cached_prompt_tokens": u.cached_prompt_tokens,
            "cached_completion_tokens": u.cached_completion_tokens,
            "cost_usd": round(u.cost_usd, 6),
            "waited_s": round(u.waited_s, 2),
            "server_ignores_n": self.server_ignores_n,
        }

    # -- running requests -----------------------------------------------------------------
    def _run_sync(self, jobs, params, top_k, description) -> list[list[Completion]]:
        start = time.perf_counter()
        coro_fn = lambda: self._run(jobs, params, top_k, description)  # noqa: E731
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            out = asyncio.run(coro_fn())
        else:  # called from inside an event loop (a notebook): run ours in a thread
            box: dict = {}

            def target():
                try:
                    box["out"] = asyncio.run(coro_fn())
                except BaseException as e:  # re-raised in the caller's thread
                    box["err"] = e

            t = threading.Thread(target=target)
            t.start()
            t.join()
            if "err" in box:
                raise box["err"]
            out = box["out"]
        self.stats["seconds"] += time.perf_counter() - start
        return out

    async def _run(self, jobs, params: SamplingParams, top_k: int, description: str):
        # asyncio primitives belong to one event loop; each run has its own loop
        self.limit.rebind()
        for b in (self.rpm, self.tpm):
            if b is not None:
                b.rebind()
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        limits = httpx.Limits(max_connections=self.limit.maximum, max_keepalive_connections=self.limit.maximum)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout, limits=limits) as client:
            with progress(description, total=len(jobs)) as advance:

                async def one(endpoint, prompt):
                    comps = await self._one(client, endpoint, prompt, params, top_k)
                    advance(1, info=f"{self.usage.cached} cached, {self.usage.retries} retries")
                    return comps

                return list(await asyncio.gather(*(one(e, p) for e, p in jobs)))

    def _body(self, endpoint: str, prompt, params: SamplingParams, top_k: int) -> dict:
        body = {
            "model": self.model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
            "seed": params.seed,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
        }
        if self.sampler_params == "extended":
            # the extensions vLLM, llama.cpp and SGLang read; llama.cpp spells the penalty repeat_penalty
            body.update(top_k=params.top_k, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                        repeat_penalty=params.repetition_penalty)
        else:
            refused = params.unsupported({"presence_penalty", "frequency_penalty"})
            if refused:
                raise StillhouseError(f"teacher '{self.name}': sampler_params is 'standard', so {', '.join(refused)} "
                                      "cannot be sent; use sampler_params: extended or leave them off")
        want_logprobs = top_k > 0 or self.token_ids
        if endpoint == "chat/completions":
            body["messages"] = prompt
            if want_logprobs:
                body.update(logprobs=True, top_logprobs=top_k)
        else:
            body["prompt"] = prompt
            if want_logprobs:
                body["logprobs"] = top_k
        if self.token_ids:
            body["return_tokens_as_token_ids"] = True
        return body

    async def _one(self, client, endpoint: str, prompt, params: SamplingParams, top_k: int) -> list[Completion]:
        body = self._body(endpoint, prompt, params, top_k)
        # everything in the body but the prompt and model is a sampling parameter
        key_params = {k: v for k, v in body.items() if k not in ("model", "messages", "prompt")}
        key = response_key(self.model, f"{self.endpoint}/{endpoint}", prompt, key_params)
        data = self.cache.get(key) if self.cache is not None else None
        if data is not None:
            u = data.get("usage") or {}
            self._count(cached=1, cached_prompt_tokens=u.get("prompt_tokens", 0), cached_completion_tokens=u.get("completion_tokens", 0))
        else:
            answers = await self._answers(client, endpoint, body, prompt, params)
            for a in answers:  # cost is counted when billed (_attempt), rejected answers included
                u = a.get("usage") or {}
                self._count(responses=1, prompt_tokens=u.get("prompt_tokens", 0), completion_tokens=u.get("completion_tokens", 0))
            data = _merge_answers(answers)
            u = data["usage"]
            if self.cache is not None:
                self.cache.put(key, data)
        comps = [self._completion(c, data) for c in sorted(data["choices"], key=lambda c: c.get("index", 0))]
        self.stats["generated_tokens"] += sum(len(c.token_ids) for c in comps)
        return comps

    async def _answers(self, client, endpoint: str, body: dict, prompt, params: SamplingParams) -> list[dict]:
        """The server's answers holding `params.n` choices: one request, or n when the server ignores `n`."""
        est = _estimate_tokens(prompt, params)
        if params.n > 1 and self.server_ignores_n:
            return await self._separately(client, endpoint, body, params, range(params.n), est)
        data = await self._post(client, endpoint, body, est)
        got = len(data.get("choices") or [])
        if got == 1 and params.n > 1:  # the server ignored n: ask for the others one by one
            self.server_ignores_n = True
            return [data] + await self._separately(client, endpoint, body, params, range(1, params.n), est)
        if got != params.n:
            raise StillhouseError(f"teacher '{self.name}': {self.base_url} returned {got} choices, asked for n={params.n}")
        return [data]

    async def _separately(self, client, endpoint, body, params, samples, est) -> list[dict]:
        one = lambda i: {**body, "n": 1, "seed": params.seed + i}  # noqa: E731  distinct seeds: distinct samples
        return list(await asyncio.gather(*(self._post(client, endpoint, one(i), est // params.n + 1) for i in samples)))

    async def _post(self, client: httpx.AsyncClient, endpoint: str, body: dict, est_tokens: int) -> dict:
        connect_failures = 0
        last = ""
        for attempt in range(self.max_retries + 1):
            for bucket, n in ((self.rpm, 1), (self.tpm, est_tokens)):
                if bucket is not None:
                    self._count(waited_s=await bucket.acquire(n))
            try:
                async with self.limit:
                    return await self._attempt(client, endpoint, body)
            except _Retryable as e:
                self._count(failures={e.kind: 1})
                last = f"{e.kind}: {e.detail}"
                if e.kind == "connect":
                    connect_failures += 1
                    if connect_failures > self.connect_retries:
                        raise StillhouseError(self._scrub(f"teacher '{self.name}': cannot reach endpoint {self.base_url} ({e.detail})")) from None
                else:
                    self.limit.decrease()
                if attempt == self.max_retries:
                    break
                self._count(retries=1)
                delay = backoff_delay(attempt, self.backoff_base, self.backoff_cap, self._rng)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, self.max_retry_after))
                self._count(waited_s=delay)
                await asyncio.sleep(delay)
        raise StillhouseError(self._scrub(f"teacher '{self.name}': {self.base_url} kept failing after {self.max_retries + 1} attempts (last: {last})"))

    async def _attempt(self, client: httpx.AsyncClient, endpoint: str, body: dict) -> dict:
        self._count(requests=1)
        t0 = time.monotonic()
        try:
            r = await client.post(f"/{endpoint}", json=body)
        except httpx.ConnectError as e:
            raise _Retryable("connect", _first_line(e) or type(e).__name__) from None
        except httpx.TimeoutException as e:
            raise _Retryable("timeout", type(e).__name__) from None
        except httpx.TransportError as e:  # the connection dropped mid-request or mid-response
            raise _Retryable("dropped", type(e).__name__) from None
        if r.status_code == 429:
            raise _Retryable("429", "rate limited", parse_retry_after(r.headers.get("retry-after")))
        if r.status_code >= 500:
            raise _Retryable("5xx", f"HTTP {r.status_code}", parse_retry_after(r.headers.get("retry-after")))
        if r.status_code != 200:
            raise StillhouseError(self._scrub(
                f"teacher '{self.name}': {self.base_url}/{endpoint} answered HTTP {r.status_code} for model '{self.model}': {_error_message(r, self._scrub)}"
            ))
        try:
            data = r.json()
        except ValueError:
            raise _Retryable("malformed", "truncated or non-JSON body") from None
        if not isinstance(data, dict):
            raise _Retryable("malformed", "a JSON body that is not an object")
        self._bill(data.get("usage"), data.get("id"))  # what the server says it served, whether or not the answer is usable
        choices = data.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise _Retryable("malformed", "response without a list of choices")
        # one choice for n > 1: a server that ignores `n` (llama.cpp's), which _answers makes up for
        if len(choices) != body["n"] and not (len(choices) == 1 and body["n"] > 1):
            raise _Retryable("malformed", f"{len(choices)} choices, asked for n={body['n']}")
        tokens = (data.get("usage") or {}).get("completion_tokens", 1)
        self.limit.on_success(time.monotonic() - t0, tokens, budget=body.get("max_tokens"))
        return data

    def _bill(self, usage, answer_id=None) -> None:
        if not isinstance(usage, dict):
            return
        p, c = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        if isinstance(p, int) and isinstance(c, int):
            answer = {"answer": answer_id[:100]} if isinstance(answer_id, str) and (p or c) else {}
            self._count(billed_prompt_tokens=p, billed_completion_tokens=c, cost_usd=self.price.cost(p, c), **answer)

    def _scrub(self, text: str) -> str:
        """Messages may quote a server's body, which may echo our headers: no key, no userinfo."""
        text = text.replace(self._key, "***") if self._key else text
        return scrub(text, self.base_url)

    # -- parsing answers ------------------------------------------------------------------
    def _completion(self, choice: dict, data: dict) -> Completion:
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content") or ""
        finish = choice.get("finish_reason") or "stop"
        entries = _logprob_entries(choice.get("logprobs"))
        # n separate requests each billed the prompt once
        prompt_tokens = (data.get("usage") or {}).get("prompt_tokens", 0) // data.get("requests", 1)
        c = Completion(text=text, token_ids=[], finish_reason=finish, prompt_tokens=prompt_tokens)
        ids = [_token_id(tok) for tok, _, _ in entries] if entries else []
        if entries and all(i is not None for i in ids):
            topk = [[_token_id(t) for t, _ in top] for _, _, top in entries]
            topk_lp = [[lp for _, lp in top] for _, _, top in entries]
            stops = end_of_turn_ids(self.tokenizer)
            if finish == "stop" and ids and ids[-1] in stops:
                c.stop_token = ids[-1]
                c.token_ids = ids[:-1]
            else:
                c.token_ids = ids
            if any(topk) and all(i is not None for row in topk for i in row):
                c.topk_ids, c.topk_logprobs = topk, topk_lp
            c.extra["token_logprobs"] = [lp for _, lp, _ in entries]
        elif entries:  # the endpoint gives tokens as text only: keep them as text
            c.extra.update(
                tokens=[t for t, _, _ in entries],
                token_logprobs=[lp for _, lp, _ in entries],
                top_logprobs=[[[t, lp] for t, lp in top] for _, _, top in entries],
            )
        if not c.token_ids and self.tokenizer is not None and text:
            c.token_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            c.extra["token_ids_source"] = "re-encoded"
        return c



SAMPLER_PARAMS = ("extended", "standard")


def _merge_answers(answers: list[dict]) -> dict:
    """One answer with every choice (re-indexed in request order) and the summed usage."""
    if len(answers) == 1:
        return {"choices": answers[0]["choices"], "usage": answers[0].get("usage") or {}}
    choices, usage = [], {}
    for a in answers:
        for c in sorted(a["choices"], key=lambda c: c.get("index", 0)):
            choices.append({**c, "index": len(choices)})
        for k, v in (a.get("usage") or {}).items():
            if isinstance(v, (int, float)):
                usage[k] = usage.get(k, 0) + v
    return {"choices": choices, "usage": usage, "requests": len(answers)}


def _read_key(env: str | None, name: str) -> str | None:
    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise StillhouseError(f"teacher '{name}': environment variable {env} (named by api_key_env) is not set")
    return key


def _estimate_tokens(prompt, params: SamplingParams) -> int:
    """A conservative token count for the tokens-per-minute bucket (about 4 characters a token)."""
    chars = len(prompt) if isinstance(prompt, str) else sum(len(str(m.get("content", ""))) for m in prompt)
    return chars // 4 + 1 + params.max_new_tokens * params.n


def _token_id(token: str) -> int | None:
    m = _TOKEN_ID.fullmatch(token) if isinstance(token, str) else None
    return int(m.group(1)) if m else None


def _logprob_entries(lp) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """(token, logprob, [(top token, logprob), ...]) per generated token, for both API shapes."""
    if not lp:
        return []
    if "content" in lp:  # chat: [{token, logprob, top_logprobs: [{token, logprob}]}]
        return [
            (e["token"], e["logprob"], [(t["token"], t["logprob"]) for t in e.get("top_logprobs") or []])
            for e in lp["content"] or []
        ]
    # completions: parallel lists; top_logprobs is a list of {token: logprob} dicts
    tops = lp.get("top_logprobs") or [None] * len(lp.get("tokens", []))
    return [
        (t, l, sorted((top or {}).items(), key=lambda kv: -kv[1]))
        for t, l, top in zip(lp.get("tokens", []), lp.get("token_logprobs", []), tops)
    ]


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _error_message(r: httpx.Response, scrub) -> str:
    """The server's error text, scrubbed BEFORE it is cut short: a cut through an echoed key
    would leave a prefix of it that no later replace() could find."""
    try:
        err = r.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else (err or r.json().get("detail"))
    except (ValueError, AttributeError):
        msg = r.text
    return scrub(" ".join(str(msg or "").split()))[:200]
