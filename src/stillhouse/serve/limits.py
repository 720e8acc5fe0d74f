"""What a request must pass before the server does work for it: API key, body size, prompt length.

API keys are `apikeys.KeyStore`'s (the one key mechanism, shared with the guard gateway). The
key file is re-read when it changes on disk, so `stillhouse keys revoke` takes effect on a
running server. Both checks run as ASGI middleware, before the body is read or parsed, so an
unauthenticated client cannot make the server parse a large body.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..apikeys import KeyStore, bearer_token
from ..errors import StillhouseError
from ..teachers.hf import encode_prompt
from .protocol import Reject

OPEN_PATHS = ("/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


class KeyCheck:
    """Hashed keys from a key file, reloaded when the file's mtime or size changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.store = KeyStore.load(self.path)  # a missing or bad file fails at startup, one line
        if not any(r.active for r in self.store.records):
            raise StillhouseError(f"{self.path}: no active key (add one with `stillhouse keys add {self.path}`)")
        self._seen = self._stamp()

    def _stamp(self):
        try:
            st = os.stat(self.path)
            return (st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def allows(self, authorization: str | None) -> bool:
        stamp = self._stamp()
        if stamp != self._seen:
            try:
                self.store = KeyStore.load(self.path)
            except StillhouseError:
                pass  # keep the last good keys; a half-edited file must not open the server
            self._seen = stamp
        return self.store.lookup(bearer_token(authorization)) is not None


def _json_error(status: int, message: str, kind: str, code: str | None, headers: list | None = None):
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    return body, hdrs


class GuardMiddleware:
    """401 without a valid key (OpenAI's shape); 413 for a body over the size limit."""

    def __init__(self, app, keys: KeyCheck | None, max_body_bytes: int):
        self.app = app
        self.keys = keys
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.keys is not None and scope["path"] not in OPEN_PATHS and not self.keys.allows(headers.get("authorization")):
            msg = ("missing API key: send `Authorization: Bearer <key>`" if not headers.get("authorization")
                   else "incorrect API key provided")
            return await _send(send, 401, *_json_error(401, msg, "invalid_request_error", "invalid_api_key",
                                                        [(b"www-authenticate", b"Bearer")]))
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await _send(send, 413, *_json_error(413, f"request body is larger than {self.max_body} bytes", "invalid_request_error", "body_too_large"))
        if scope["method"] in ("POST", "PUT", "PATCH") and not length.isdigit():
            # no declared length (chunked): read the body here, within the limit, and replay it
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    return await _send(send, 413, *_json_error(413, f"request body is larger than {self.max_body} bytes", "invalid_request_error", "body_too_large"))
                if not message.get("more_body"):
                    break
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


async def _send(send, status: int, body: bytes, headers: list) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class PromptLimits:
    """Prompt length against the context, decided before the expensive part of the work.

    Tokenising a 1 MB prompt is itself work, so a prompt with more characters than
    `context` tokens could possibly hold (the longest vocabulary entry's length per token,
    doubled for normalisers that drop characters) is refused without tokenising it.
    """

    def __init__(self, tokenizer, context: int):
        self.tok = tokenizer
        self.context = context
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_chars = 2 * max(longest, 1) * context

    def encode(self, text: str, param: str, allow_full: bool = False) -> list[int]:
        limit = self.context if allow_full else self.context - 1
        if len(text) > self.max_chars:
            raise Reject(400, f"{param}: {len(text)} characters cannot fit the model's context of {self.context} tokens", param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise Reject(400, f"{param}: not valid Unicode ({e.reason} at character {e.start})", param) from None
        ids = encode_prompt(self.tok, text)
        if not ids:
            raise Reject(400, f"{param}: the prompt is empty (no tokens)", param)
        if len(ids) > limit:
            raise Reject(400, f"{param}: the prompt is {len(ids)} tokens; the model's context is {self.context} tokens"
                          + ("" if allow_full else " and needs room for at least one new token"), param)
        return ids

    def check_ids(self, ids: list[int], vocab: int) -> list[int]:
        if not ids:
            raise Reject(400, "prompt: a token-id prompt is empty", "prompt")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise Reject(400, f"prompt: token id {bad} is outside this model's vocabulary (0..{vocab - 1})", "prompt")
        if len(ids) > self.context:
            raise Reject(400, f"prompt: the prompt is {len(ids)} tokens; the model's context is {self.context} tokens", "prompt")
        return ids
