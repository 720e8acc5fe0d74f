"""`stillhouse serve MODEL`: an OpenAI-compatible server for any model stillhouse can load.

`engine.py` is the continuous-batching decode loop, `app.py` the HTTP routes, `stream.py`
server-sent events, `protocol.py`
the request bodies and OpenAI's error shape, `limits.py` API keys, body size and prompt
length, `text.py` streaming text and stop strings, `faults.py` the seeded fault injection
used by the chaos tests. docs/serving.md describes the behaviour and the limits.
"""

from __future__ import annotations

import socket
import threading
import time

from ..errors import StillhouseError


def context_length(model) -> int:
    """Tokens the model was trained to attend over (prompt + completion)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise StillhouseError("cannot tell the model's context length from its config; pass --max-context")


def build_app(model: str, *, max_batch: int = 16, faults: str | None = None, seed: int = 0, served_name: str | None = None,
              api_keys: str | None = None, max_context: int | None = None, max_concurrent: int = 64,
              default_max_tokens: int = 256, watermark_key_env: str | None = None,
              watermark_scheme: str = "greenlist", antidistill: str | None = None):
    from .. import models
    from ..teachers.hf import HFTeacher
    from .app import ServeConfig, create_app
    from .engine import Engine
    from .faults import parse_faults
    from .limits import KeyCheck

    if max_batch < 1:
        raise StillhouseError("--max-batch must be at least 1")
    if max_concurrent < 1:
        raise StillhouseError("--max-concurrent must be at least 1")
    if max_context is not None and max_context < 2:
        raise StillhouseError("--max-context must be at least 2")
    fault_cfg = parse_faults(faults, seed)  # checked before the model loads
    keys = KeyCheck(api_keys) if api_keys else None
    watermark = None
    if watermark_key_env:  # the key comes from the environment, never the command line
        from ..guard.watermark import processor_from_env

        watermark = processor_from_env(watermark_key_env, scheme=watermark_scheme)
    ad_cfg = None
    if antidistill:
        from ..guard.antidistill import load_config

        ad_cfg = load_config(antidistill)  # checked before the model loads
    lm = models.load(model)
    processor = watermark
    if ad_cfg is not None:
        from ..guard.antidistill import build
        from ..teachers.decode import ProcessorChain

        poison = build(ad_cfg, lm.tokenizer)
        # the watermark goes last: it marks the distribution that is sampled
        processor = poison if watermark is None else ProcessorChain(poison, watermark)
    context = context_length(lm.model)
    if max_context is not None:
        context = min(context, max_context)
    engine = Engine(lm.model, lm.tokenizer, HFTeacher(lm.model, lm.tokenizer)._stop_ids(), max_batch=max_batch)
    engine.logits_processor = processor  # the watermark, antidistillation, or both
    cfg = ServeConfig(served_name or model, context, default_max_tokens=default_max_tokens, max_concurrent=max_concurrent)
    app = create_app(engine, cfg, fault_cfg, keys)
    app.state.faults = fault_cfg  # tests and bench/chaos.py change the rates of a running server
    return app


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. asyncio sets TCP_NODELAY only on sockets made with
    # proto=IPPROTO_TCP; without it Nagle and delayed ACKs add ~40 ms to every small response.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StillhouseError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", **kwargs) -> None:
    """Run the server in the foreground until interrupted."""
    import os

    import uvicorn

    from ..progress import console

    sock = _bind(host, port)  # first: a busy port fails before a model loads
    try:
        console.print(f"stillhouse serve: loading {model}")
        os.environ["STILLHOUSE_QUIET"] = "1"  # no per-batch progress bars in a server log
        app = build_app(model, **kwargs)
        console.print(f"stillhouse serve: {model} at http://{host}:{sock.getsockname()[1]}/v1")
        # on SIGTERM, requests still running after 10 s (a long stream) are cut rather than awaited
        uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10)).run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """Run an app with uvicorn on a free loopback port in a background thread (tests, benches).

    `with ServerThread(app) as base_url: ...` yields the `http://127.0.0.1:<port>/v1` base URL.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "error"):
        import uvicorn

        self.sock = _bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:  # waits on readiness; a failed start ends the thread
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self.base_url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
