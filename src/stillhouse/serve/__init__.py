"""`stillhouse serve MODEL`: an OpenAI-compatible server for any model stillhouse can load.

`app.py` holds the HTTP routes, `batcher.py` groups concurrent requests into batched
generation, `faults.py` the seeded fault injection used by the chaos tests.
"""

from __future__ import annotations

import socket
import threading
import time

from ..errors import StillhouseError


def build_app(model: str, *, max_batch: int = 16, faults: str | None = None, seed: int = 0, served_name: str | None = None, window_ms: float = 50.0, gap_ms: float = 10.0, watermark_key_env: str | None = None):
    from .. import models
    from ..teachers.hf import HFTeacher
    from .app import create_app
    from .batcher import Batcher
    from .faults import parse_faults

    if max_batch < 1:
        raise StillhouseError("--max-batch must be at least 1")
    fault_cfg = parse_faults(faults, seed)  # checked before the model loads
    watermark = None
    if watermark_key_env:  # the key comes from the environment, never the command line
        from ..guard.watermark import processor_from_env

        watermark = processor_from_env(watermark_key_env)
    lm = models.load(model)
    teacher = HFTeacher(lm.model, lm.tokenizer, name=lm.identity.spec)
    teacher.logits_processor = watermark
    return create_app(Batcher(teacher, max_batch, window_ms / 1000, gap_ms / 1000), served_name or model, fault_cfg)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
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
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self.base_url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
