"""Helpers for the serve tests (not a test file): a tiny model with a long context, live servers."""

from __future__ import annotations

import contextlib
import time

import httpx

from support import module_env

LONG_CONTEXT = 4096  # long enough that a max_tokens=context request outlives anything a test does next


def long_context_model(tmp_path_factory):
    """The conftest tiny llama, saved with a 4096-token context (RoPE needs nothing else)."""
    from conftest import build_tiny_model, build_tokenizer

    out = tmp_path_factory.mktemp("tiny-long")
    tok = build_tokenizer()
    model = build_tiny_model(tok)
    model.config.max_position_embeddings = LONG_CONTEXT
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@contextlib.contextmanager
def serving(model_dir, tmp_path_factory, **kwargs):
    """A live server on a free loopback port; yields (base_url, app)."""
    from stillhouse.serve import ServerThread, build_app

    with module_env(tmp_path_factory.mktemp("serve")):
        app = build_app(str(model_dir), served_name="tiny", **kwargs)
    with ServerThread(app) as url:
        yield url, app


def stats(url: str, headers: dict | None = None) -> dict:
    return httpx.get(url.removesuffix("/v1") + "/stillhouse/stats", headers=headers).json()


def wait_for(cond, what: str, limit_s: float = 300):
    """Poll until `cond()` holds. The limit only stops a broken server from hanging CI; it is
    far above anything a loaded machine needs, so no result depends on the machine's speed."""
    deadline = time.monotonic() + limit_s
    while not (value := cond()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)
    return value
