"""The request bodies `stillhouse serve` accepts, and OpenAI's error shape.

Every field OpenAI defines that the server does not implement is refused, never ignored:
the models forbid extra fields (so `tools`, `functions`, `suffix`, `audio`... are a 400 naming
the parameter), and the few declared fields that are implemented only partly (`best_of`,
`response_format`) are checked by `unsupported()`. vLLM's extensions `ignore_eos` and
`return_tokens_as_token_ids` are implemented; `user` is accepted and unused (it only labels
the end user for the provider's abuse monitoring).
"""

from __future__ import annotations

import json
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import Field

from ..strict import Strict

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions allow 5, we allow the same 20
MAX_STOP = 4  # OpenAI's limit


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate from a request, echoed in a message or a
    completion, cannot make encoding the response fail."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error(status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
          code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """A response in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return SafeJSONResponse(body, status_code=status, headers=headers)


class Reject(Exception):
    """A request refused with `status` and a one-line message (the app turns it into `error()`)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk with `usage` and no choices


class ResponseFormat(Strict):
    type: str  # only "text" (the default) is implemented


class _Common(Strict):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)  # choices per prompt
    seed: int | None = None  # any integer; reduced modulo 2**63
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False  # server-sent events, ended by `data: [DONE]`
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    user: str | None = None  # accepted, unused
    ignore_eos: bool = False  # vLLM: generate until max_tokens even past the end token
    return_tokens_as_token_ids: bool = False  # vLLM: spell log-prob tokens as `token_id:<id>`
    # vLLM / llama.cpp sampler extensions: accepted only at their "off" values (what stillhouse's
    # openai backend sends explicitly so that no server default applies silently)
    top_k: int | None = None  # 0 or -1: the whole vocabulary
    min_p: float | None = None  # 0: no floor
    repetition_penalty: float | None = None  # 1: none (vLLM's name)
    repeat_penalty: float | None = None  # 1: none (llama.cpp's name)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None  # a string or a list of text parts
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None


class CompletionRequest(_Common):
    # a text, a list of texts, a token-id list, or a list of token-id lists
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only makes sense with echo (scoring a prompt)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # the prompt comes back before the completion (and its log-probs)
    best_of: int | None = Field(None, ge=1)  # only best_of == n (no reranking) is implemented


def unsupported(req: _Common) -> str | None:
    """Why a declared parameter's value is not implemented, or None."""
    for name, off in (("top_k", (0, -1)), ("min_p", (0.0,)), ("repetition_penalty", (1.0,)), ("repeat_penalty", (1.0,))):
        value = getattr(req, name)
        if value is not None and value not in off:
            return f"{name}={value} is not supported by stillhouse serve (only its 'off' value, {off[0]})"
    if isinstance(req, CompletionRequest) and req.best_of is not None and req.best_of != req.n:
        return "best_of other than n is not supported (no server-side reranking); drop it or set it to n"
    if isinstance(req, ChatRequest):
        if req.response_format is not None and req.response_format.type != "text":
            return f"response_format type '{req.response_format.type}' is not supported (only 'text')"
        if req.top_logprobs is not None and not req.logprobs:
            return "top_logprobs needs logprobs=true"
    return None


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "TextPart", "Message", "StreamOptions", "ResponseFormat"}


def param_of(loc: tuple) -> str:
    """`("body", "messages", 0, "content", "str")` -> `messages.0.content` (pydantic names the
    union member it tried; the client only needs the field)."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p or "-" in p))]
    return ".".join(parts) or "body"


def validation_message(errors: list[dict]) -> tuple[str, str]:
    """One line (and the parameter) for a request body's pydantic errors: the most specific
    one (a union reports one error per member; the deepest says what was wrong)."""
    err = max(errors, key=lambda e: len(e.get("loc", ())), default={})
    param = param_of(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"unsupported parameter '{param}': stillhouse serve does not implement it", param
    if kind in ("json_invalid", "json_type"):
        return "request body is not valid JSON", "body"
    if kind == "missing":
        return f"missing required parameter '{param}'", param
    return f"invalid value for '{param}': {err.get('msg', 'invalid')}", param
