"""What the guard gateway costs per request: added latency (p50, p99) and sustained requests/s
through it, logging on, against an upstream stub that answers instantly.

    python bench/guard_overhead.py [--seconds 10] [--concurrency 32] [--sequential 400]

Three processes: the stub upstream (a bare ASGI app under uvicorn), the gateway
(`stillhouse guard serve`, as an operator runs it) and this load generator (aiohttp). Latency
is measured one request at a time, direct and through the gateway interleaved so that both
see the same machine load; added latency = gateway p50 - direct p50 (and p99). Throughput is a
fixed-concurrency run through the gateway for --seconds. Every request carries a unique
prompt; after a graceful stop the log must hold exactly one row per request sent (0 lost,
0 twice). The three processes share this machine's cores: the figures are for that setting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"p50_added_ms": 2.0, "rps": 1000.0}

RESPONSE = json.dumps({
    "id": "x", "object": "chat.completion", "created": 0, "model": "stub",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "<think>hidden</think>The answer is 42."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}).encode()


STREAM = b"".join(
    b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "stub",
                            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}).encode() + b"\n\n"
    for piece in ["<thi", "nk>hid", "den</th", "ink>The ", "answer ", "is 42."]
) + b'data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"stub","choices":[],' \
    b'"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}\n\ndata: [DONE]\n\n'


async def stub_app(scope, receive, send):
    """The instant upstream: reads the request, answers one fixed chat completion (streamed:
    six SSE chunks with a split <think> block, then usage and [DONE], in one write)."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return
    more, request = True, b""
    while more:
        msg = await receive()
        request += msg.get("body", b"")
        more = msg.get("more_body", False)
    body = RESPONSE if scope["path"].endswith("/completions") else b'{"object":"list","data":[{"id":"stub"}]}'
    kind = b"application/json"
    if b'"stream": true' in request:
        body, kind = STREAM, b"text/event-stream"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: process exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not start")
            time.sleep(0.1)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run_load(gw: str, direct: str, key: str, sequential: int, seconds: float, concurrency: int, gw_pid: int, stream: bool) -> dict:
    import psutil

    import aiohttp

    counter, through_gateway = 0, 0

    def body() -> dict:
        nonlocal counter
        counter += 1
        return {"model": "stub", "messages": [{"role": "user", "content": f"request number {counter}: what is six times seven?"}], "stream": stream}

    auth = {"authorization": f"Bearer {key}"}
    conn = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def one(base: str, headers: dict) -> float:
            nonlocal through_gateway
            through_gateway += base == gw
            t = time.perf_counter()
            async with s.post(base + "/chat/completions", json=body(), headers=headers) as r:
                data = await r.read()
                assert r.status == 200 and (base != gw or b"hidden" not in data), data  # the stub's reasoning never gets through
            return (time.perf_counter() - t) * 1000

        for _ in range(50):  # warm both paths (connections, caches)
            await one(gw, auth)
            await one(direct, {})
        lat_gw, lat_direct = [], []
        for _ in range(sequential):
            lat_direct.append(await one(direct, {}))
            lat_gw.append(await one(gw, auth))

        async def sustained(base: str, headers: dict) -> tuple[int, int, float]:
            done, errors, stop_at = 0, 0, time.perf_counter() + seconds

            async def worker():
                nonlocal done, errors
                while time.perf_counter() < stop_at:
                    try:
                        await one(base, headers)
                        done += 1
                    except AssertionError:
                        errors += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return done, errors, time.perf_counter() - t0

        direct_done, _, direct_elapsed = await sustained(direct, {})
        proc = psutil.Process(gw_pid)
        cpu0 = sum(proc.cpu_times()[:2])
        done, errors, elapsed = await sustained(gw, auth)
        cpu = sum(proc.cpu_times()[:2]) - cpu0
    return {"lat_gw": lat_gw, "lat_direct": lat_direct, "done": done, "errors": errors, "elapsed": elapsed, "sent": through_gateway,
            "direct_rps": direct_done / direct_elapsed, "gw_cpu_ms": cpu * 1000 / max(1, done)}


def compare_clients(seconds: float, concurrency: int) -> None:
    """Why the gateway talks to its upstream with aiohttp: requests/s of each async client
    against the same instant stub, alternating, same process, same concurrency."""
    import aiohttp
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    up = subprocess.Popen([sys.executable, __file__, "--stub", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    async def rate(call) -> float:
        n, end = 0, time.perf_counter() + seconds / 4

        async def worker():
            nonlocal n
            while time.perf_counter() < end:
                await call()
                n += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (seconds / 4)

    async def run():
        lim = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with aiohttp.ClientSession() as s, httpx.AsyncClient(limits=lim) as c:
            async def a():
                async with s.post(url, data=b"{}") as r:
                    await r.read()

            async def h():
                (await c.post(url, content=b"{}")).raise_for_status()

            res = {"aiohttp": [], "httpx": []}
            for _ in range(2):
                res["aiohttp"].append(await rate(a))
                res["httpx"].append(await rate(h))
            return res

    try:
        wait_up(url.replace("/chat/completions", "/models"), up)
        res = asyncio.run(run())
    finally:
        up.kill()
    a, h = max(res["aiohttp"]), max(res["httpx"])
    print(f"upstream clients, {concurrency} concurrent, best of 2: aiohttp {a:,.0f} req/s, httpx.AsyncClient {h:,.0f} req/s "
          f"(ratio {a / h:.1f}x); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sequential", type=int, default=400)
    ap.add_argument("--stream", action="store_true", help="Streamed chat requests (SSE) instead of whole responses.")
    ap.add_argument("--clients", action="store_true", help="Only compare upstream clients: httpx.AsyncClient vs aiohttp against the stub.")
    ap.add_argument("--stub", type=int, help=argparse.SUPPRESS)  # internal: run the stub upstream on this port
    args = ap.parse_args()
    if args.stub:
        import uvicorn

        uvicorn.run(stub_app, host="127.0.0.1", port=args.stub, log_level="warning", access_log=False)
        return

    if args.clients:
        return compare_clients(args.seconds, args.concurrency)
    sys.path.insert(0, str(ROOT / "src"))
    from stillhouse.apikeys import KeyStore

    tmp = Path(tempfile.mkdtemp(prefix="guard-bench-"))
    _, key = KeyStore.load(tmp / "keys.json", create=True).add(account="bench", org="bench")
    (tmp / "guard.yaml").write_text("keys: keys.json\nlog: {path: log.sqlite}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "STILLHOUSE_QUIET": "1"}
    up_port, gw_port = free_port(), free_port()
    up = subprocess.Popen([sys.executable, __file__, "--stub", str(up_port)], env=env, stderr=subprocess.PIPE, text=True)
    direct = f"http://127.0.0.1:{up_port}/v1"
    gw_url = f"http://127.0.0.1:{gw_port}/v1"
    gw = None
    try:
        wait_up(direct + "/models", up)
        gw = subprocess.Popen([sys.executable, "-m", "stillhouse.cli", "guard", "serve", "--upstream", direct,
                               "--config", str(tmp / "guard.yaml"), "--port", str(gw_port)], env=env, stderr=subprocess.PIPE, text=True)
        wait_up(f"http://127.0.0.1:{gw_port}/healthz", gw)
        res = asyncio.run(run_load(gw_url, direct, key, args.sequential, args.seconds, args.concurrency, gw.pid, args.stream))
        gw.send_signal(signal.SIGTERM)  # graceful: the log commits everything queued
        gw.wait(timeout=120)
    finally:
        for p in (gw, up):
            if p and p.poll() is None:
                p.kill()
    con = sqlite3.connect(tmp / "log.sqlite")
    rows, distinct = con.execute("SELECT count(*), count(DISTINCT prompt_sha256) FROM requests").fetchone()
    con.close()
    shutil.rmtree(tmp, ignore_errors=True)
    lost, doubled = max(0, res["sent"] - distinct), rows - distinct
    p50d, p99d = pct(res["lat_direct"], 0.5), pct(res["lat_direct"], 0.99)
    p50g, p99g = pct(res["lat_gw"], 0.5), pct(res["lat_gw"], 0.99)
    rps = res["done"] / res["elapsed"]
    load = os.getloadavg()[0]
    print(f"{'streamed' if args.stream else 'non-streamed'} chat requests")
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} at the end (other jobs share the cores)")
    print(f"latency, one request at a time ({args.sequential} each, interleaved):")
    print(f"  direct to the stub      p50 {p50d:6.2f} ms   p99 {p99d:6.2f} ms")
    print(f"  through the gateway     p50 {p50g:6.2f} ms   p99 {p99g:6.2f} ms")
    print(f"  added by the gateway    p50 {p50g - p50d:6.2f} ms   p99 {p99g - p99d:6.2f} ms   (target p50 <= {TARGETS['p50_added_ms']} ms)")
    print(f"throughput, {args.concurrency} concurrent clients for {res['elapsed']:.1f} s: {rps:,.0f} requests/s through the gateway "
          f"(target >= {TARGETS['rps']:,.0f}); {res['errors']} errors; the stub alone: {res['direct_rps']:,.0f} requests/s "
          f"(gateway/stub {rps / res['direct_rps']:.2f})")
    print(f"gateway CPU time (user+system, all its threads) per request under that load: {res['gw_cpu_ms']:.2f} ms "
          f"= {1000 / res['gw_cpu_ms']:,.0f} requests/s per fully available core")
    print(f"log: {res['sent']} requests sent, {rows} rows, {lost} lost, {doubled} logged twice")
    verdict = (p50g - p50d <= TARGETS["p50_added_ms"], rps >= TARGETS["rps"], lost == 0 and doubled == 0)
    print("targets: p50 added " + ("met" if verdict[0] else "MISSED") + ", requests/s " + ("met" if verdict[1] else "MISSED")
          + ", log exact " + ("met" if verdict[2] else "MISSED"))


if __name__ == "__main__":
    main()
