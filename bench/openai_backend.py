"""Throughput of the openai backend against `stillhouse serve`, next to the model in process.

    .venv/bin/python bench/openai_backend.py [--model smollm2-135m-instruct] [--prompts 64]
                                             [--new-tokens 64] [--temperature 0.7]

Starts `stillhouse serve MODEL --max-batch 16` as a child process on a free loopback port,
then generates the same prompts (same sampling params) three ways and prints tokens/s:
  * in process: HFTeacher.generate at batch 16 (what the server itself runs);
  * over HTTP: OpenAITeacher at concurrency 1, 4 and 16 (no response cache);
and the per-request overhead of the HTTP path (1-token requests, one at a time, against the
same 1-token generations in process). The machine may be shared: figures are noisy, and the
ratios (measured in one run) mean more than the absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _prompts(n: int) -> list[list[dict]]:
    from stillhouse.verify.reasoning_gym import problems

    recs = problems("chain_sum", {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 3}, n, 7)
    return [[{"role": "user", "content": r["question"]}] for r in recs]


def _start_server(model: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "STILLHOUSE_QUIET": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stillhouse.cli", "serve", model, "--port", str(port), "--max-batch", "16", "--served-name", "bench"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 10 minutes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--overhead-requests", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client concurrencies")
    args = ap.parse_args()
    os.environ.setdefault("STILLHOUSE_QUIET", "1")

    from stillhouse import models
    from stillhouse.teachers.base import SamplingParams
    from stillhouse.teachers.hf import HFTeacher
    from stillhouse.teachers.openai import OpenAITeacher

    msgs = _prompts(args.prompts)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, seed=1)
    one_token = SamplingParams(max_new_tokens=1)
    models.resolve(args.model)  # convert once before anything is timed
    port = _free_port()
    server = _start_server(args.model, port)
    try:
        lm = models.load(args.model)
        rows = []
        print(f"{args.model}: {args.prompts} prompts, {args.new_tokens} new tokens, temperature {args.temperature}, "
              f"on {os.cpu_count()} CPU cores (shared: noisy)", flush=True)
        print(f"{'path':40} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'vs in process':>14}", flush=True)

        def record(label, teacher, fn):
            t0 = time.perf_counter()
            out = fn()
            secs = time.perf_counter() - t0
            toks = sum(len(c.token_ids) + (c.stop_token is not None) for cs in out for c in cs)
            rows.append((label, toks, secs, toks / secs))
            # printed as measured: on a crowded machine a run may be cut short
            print(f"{label:40} {toks:7d} {secs:8.1f} {toks / secs:7.1f} {toks / secs / rows[0][3]:13.2f}x", flush=True)

        hf = HFTeacher(lm.model, lm.tokenizer, batch_size=16)
        record("in process, HFTeacher batch 16", hf, lambda: hf.generate(msgs, params))
        url = f"http://127.0.0.1:{port}/v1"
        for c in [int(x) for x in args.concurrency.split(",")]:
            # token counts re-encoded from the text: asking for ids makes the server score logprobs too
            api = OpenAITeacher(url, "bench", max_concurrency=c, cache=False, tokenizer=lm.tokenizer)
            record(f"openai backend -> serve, concurrency {c}", api, lambda: api.generate(msgs, params))
            print(f"{'':40} adaptive limit halved {api.limit.decreases} times, ends at {api.limit.current}", flush=True)
        # per-request overhead: 1-token answers one at a time, HTTP vs in process
        few = msgs[: args.overhead_requests]
        hf1 = HFTeacher(lm.model, lm.tokenizer, batch_size=1)
        t0 = time.perf_counter()
        for m in few:
            hf1.generate([m], one_token)
        local_s = (time.perf_counter() - t0) / len(few)
        api1 = OpenAITeacher(url, "bench", max_concurrency=1, cache=False)
        t0 = time.perf_counter()
        for m in few:
            api1.generate([m], one_token)
        http_s = (time.perf_counter() - t0) / len(few)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # uvicorn waits for a batch in progress
            server.kill()

    print(f"per-request overhead (1-token requests, one at a time): {1000 * (http_s - local_s):.1f} ms "
          f"({1000 * http_s:.1f} ms over HTTP vs {1000 * local_s:.1f} ms in process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
