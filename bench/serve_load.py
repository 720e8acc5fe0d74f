"""A bounded load test of `stillhouse serve` on loopback: requests/s, latency, server RSS over time.

    .venv/bin/python bench/serve_load.py [--model smollm2-135m-instruct] [--concurrency 8]
                                         [--duration 60 | --soak 600] [--max-tokens 32]

Starts `stillhouse serve MODEL --api-keys <a fresh key file>` as a child process on a free
loopback port, then runs `--concurrency` asyncio httpx clients that each send one request after
another for the duration: chat and completions, a quarter of them streamed (SSE), sampled with
a per-request seed, `max_tokens` from 1 to `--max-tokens`. Every response is checked (HTTP 200,
the right number of choices, a stream ending in `data: [DONE]`); anything else is a failure.
The server's RSS is sampled every `--sample-s` seconds. `--soak 600` is the 10-minute soak:
the figures to watch are 0 failed requests and a flat RSS (last sample vs the one after warm-up).

The machine may be shared with other work: absolute figures are noisy, so it prints the load
average next to them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

PROMPTS = ["What is 17 + 25?", "Name three primary colours.", "Write a haiku about tea.", "Explain what a prime number is.",
           "Translate 'good morning' into French.", "List the days of the week.", "Why is the sky blue?", "Count from 1 to 10."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model: str, port: int, keys: Path, max_batch: int) -> subprocess.Popen:
    env = {**os.environ, "STILLHOUSE_QUIET": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stillhouse.cli", "serve", model, "--port", str(port), "--served-name", "bench",
         "--api-keys", str(keys), "--max-batch", str(max_batch)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    while True:  # wait on readiness; the process dying ends the bench
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=None).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)


def _body(rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    chat = rng.random() < 0.5
    body = {"model": "bench", "max_tokens": rng.randint(1, max_tokens), "temperature": 0.7, "seed": rng.randrange(2**31),
            "stream": rng.random() < 0.25}
    q = rng.choice(PROMPTS)
    if chat:
        body["messages"] = [{"role": "user", "content": q}]
    else:
        body["prompt"] = q
    return ("chat/completions" if chat else "completions"), body


async def _one(client: httpx.AsyncClient, endpoint: str, body: dict) -> bool:
    if not body["stream"]:
        r = await client.post(endpoint, json=body)
        return r.status_code == 200 and len(r.json()["choices"]) == 1
    async with client.stream("POST", endpoint, json=body) as r:
        if r.status_code != 200:
            return False
        last = None
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                last = line[6:]
                if last != "[DONE]" and "error" in json.loads(last):
                    return False
        return last == "[DONE]"


async def _load(url: str, key: str, concurrency: int, duration: float, max_tokens: int, proc: psutil.Process, sample_s: float):
    latencies: list[float] = []
    failures: list[str] = []
    rss: list[tuple[float, float]] = []
    start = time.monotonic()
    stop_at = start + duration

    async def worker(i: int):
        rng = random.Random(i)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=None) as client:
            while time.monotonic() < stop_at:
                endpoint, body = _body(rng, max_tokens)
                t0 = time.monotonic()
                try:
                    ok = await _one(client, endpoint, body)
                except httpx.HTTPError as e:
                    ok, body = False, {**body, "exception": type(e).__name__}
                (latencies.append(time.monotonic() - t0) if ok else failures.append(json.dumps(body)[:200]))

    async def sampler():
        while time.monotonic() < stop_at:
            rss.append((time.monotonic() - start, proc.memory_info().rss / 2**20))
            print(f"  t={rss[-1][0]:6.0f}s  rss={rss[-1][1]:7.1f} MB  done={len(latencies)}  failed={len(failures)}  "
                  f"load={os.getloadavg()[0]:.1f}", flush=True)
            await asyncio.sleep(sample_s)

    await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
    rss.append((time.monotonic() - start, proc.memory_info().rss / 2**20))
    return latencies, failures, rss, time.monotonic() - start


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60, help="seconds of load")
    ap.add_argument("--soak", type=float, default=None, help="soak for this many seconds (600: the 10-minute soak)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--sample-s", type=float, default=None, help="RSS sampling period (default: duration / 20)")
    args = ap.parse_args()
    duration = args.soak if args.soak else args.duration
    sample_s = args.sample_s or max(1.0, duration / 20)
    os.environ.setdefault("STILLHOUSE_QUIET", "1")

    from stillhouse import models
    from stillhouse.apikeys import KeyStore

    models.resolve(args.model)  # convert once before anything is timed
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        _, key = KeyStore.load(keys, create=True).add(account="bench")
        port = _free_port()
        server = _start(args.model, port, keys, args.max_batch)
        try:
            proc = psutil.Process(server.pid)
            print(f"{args.model}: {args.concurrency} clients for {duration:.0f} s, max_tokens 1..{args.max_tokens}, "
                  f"--max-batch {args.max_batch}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} (shared machine)", flush=True)
            lat, failed, rss, secs = asyncio.run(_load(f"http://127.0.0.1:{port}/v1", key, args.concurrency, duration, args.max_tokens, proc, sample_s))
            stats = httpx.get(f"http://127.0.0.1:{port}/stillhouse/stats", headers={"Authorization": f"Bearer {key}"}).json()
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
    warm = rss[1][1] if len(rss) > 1 else rss[0][1]
    result = {
        "model": args.model, "concurrency": args.concurrency, "seconds": round(secs, 1),
        "requests": len(lat), "failed": len(failed), "requests_per_s": round(len(lat) / secs, 2),
        "p50_s": round(_pct(lat, 50), 3), "p99_s": round(_pct(lat, 99), 3),
        "generated_tokens": stats["generated_tokens"], "tokens_per_s": round(stats["generated_tokens"] / secs, 1),
        "largest_batch": stats["largest_batch"],
        "rss_mb_after_warmup": round(warm, 1), "rss_mb_end": round(rss[-1][1], 1), "rss_mb_max": round(max(r for _, r in rss), 1),
        "load_average": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(result))
    for f in failed[:5]:
        print("failed:", f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
