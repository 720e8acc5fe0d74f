"""Peak memory of a GGUF teacher through the hf backend (dequantised to fp32) and the llamacpp
backend (run quantised by llama.cpp), and the largest GGUF teacher each can hold in 24 GB.

    PYTHONPATH=src .venv/bin/python bench/teacher_memory.py [--models smollm2-135m-instruct,gemma3-270m]
                                                            [--prompts 8] [--new-tokens 32] [--threads 1]

Every measurement runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own:
  hf-convert   the one-off GGUF -> safetensors conversion the hf backend needs (empty cache)
  hf           load the converted model and generate (greedy) through the hf backend
  llamacpp     load the GGUF with llama.cpp and generate the same way (n_ctx 2048)
The 24 GB estimate is an extrapolation, stated as such: peak RSS grows with the weights' size
in memory (4 bytes a parameter for the hf backend, about the GGUF's file size for llama.cpp)
over a fixed floor (Python, torch, tokenizer); the floor and the per-byte slope are taken from
this run's smallest model, and the KV cache of a long context comes on top.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
BUDGET = 24 * GB
QUESTIONS = ["What is 17 + 25?", "Name three colours.", "Write one sentence about the sea.", "Sort: pear, apple, fig.",
             "What is the capital of France?", "Count to five.", "Say hello in French.", "Is 91 prime?"]


def child(mode: str, spec: str, prompts: int, new_tokens: int, threads: int) -> dict:
    os.environ["STILLHOUSE_QUIET"] = "1"
    import torch

    torch.set_num_threads(threads)
    from stillhouse import models
    from stillhouse.teachers.base import SamplingParams
    from stillhouse.teachers.factory import make_teacher

    t0 = time.perf_counter()
    out: dict = {"mode": mode, "model": spec}
    if mode == "hf-convert":
        target, _ = models.resolve(spec)
        out["params"] = None
    else:
        cfg = ({"backend": "hf", "model": spec} if mode == "hf" else
               {"backend": "llamacpp", "model": spec, "n_ctx": 2048, "n_threads": threads})
        teacher = make_teacher(cfg)
        out["load_s"] = time.perf_counter() - t0
        msgs = [[{"role": "user", "content": q}] for q in (QUESTIONS * prompts)[:prompts]]
        t1 = time.perf_counter()
        comps = teacher.generate(msgs, SamplingParams(max_new_tokens=new_tokens))
        secs = time.perf_counter() - t1
        out["tokens"] = sum(len(c.token_ids) for cs in comps for c in cs)
        out["tok_s"] = out["tokens"] / secs
        if mode == "hf":
            out["params"] = models.param_count(teacher.model)
    out["gguf_bytes"] = models.gguf_source(spec)[0].stat().st_size
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def run(mode: str, spec: str, args, cache: Path) -> dict:
    env = {**os.environ, "STILLHOUSE_CACHE": str(cache), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", mode, "--models", spec, "--prompts", str(args.prompts),
           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{mode} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.models, args.prompts, args.new_tokens, args.threads)))
        return 0
    print(f"{args.prompts} prompts, {args.new_tokens} new tokens (greedy), {args.threads} thread(s); load average "
          f"{os.getloadavg()[0]:.1f}; peak RSS of a fresh process per row")
    print(f"{'model':24} {'path':11} {'GGUF':>8} {'peak RSS':>9} {'RSS / GGUF':>10} {'load s':>7} {'tok/s':>7}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="sh-teacher-mem-") as tmp:
        for spec in args.models.split(","):
            cache = Path(tmp) / spec  # per model: the convert row starts from an empty cache
            for mode in ("hf-convert", "hf", "llamacpp"):
                r = run(mode, spec, args, cache)
                rows.append(r)
                print(f"{spec:24} {mode:11} {r['gguf_bytes'] / GB:7.2f}G {r['peak_rss'] / GB:8.2f}G "
                      f"{r['peak_rss'] / r['gguf_bytes']:9.1f}x {r.get('load_s', r['seconds']):7.1f} "
                      f"{r.get('tok_s', float('nan')):7.1f}", flush=True)
    print()
    for spec in args.models.split(","):
        by = {r["mode"]: r for r in rows if r["model"] == spec}
        print(f"{spec}: llamacpp peak RSS {by['llamacpp']['peak_rss'] / by['hf']['peak_rss']:.2f}x the hf backend's "
              f"({by['llamacpp']['peak_rss'] / by['hf-convert']['peak_rss']:.2f}x its conversion's); "
              f"decode {by['llamacpp']['tok_s'] / by['hf']['tok_s']:.2f}x its tok/s at one sequence vs batch {len(QUESTIONS)}")
    # extrapolation from the first (smallest) model: floor + slope x weights in memory
    first = {r["mode"]: r for r in rows if r["model"] == args.models.split(",")[0]}
    params = first["hf"]["params"]
    floor = min(first["llamacpp"]["peak_rss"] - first["llamacpp"]["gguf_bytes"], first["hf"]["peak_rss"] - 4 * params)
    floor = max(floor, 0.0)
    hf_slope = (first["hf"]["peak_rss"] - floor) / (4 * params)  # bytes of RSS per byte of fp32 weights
    conv_slope = (first["hf-convert"]["peak_rss"] - floor) / (4 * params)
    lc_slope = (first["llamacpp"]["peak_rss"] - floor) / first["llamacpp"]["gguf_bytes"]
    hf_params = (BUDGET - floor) / (4 * max(hf_slope, conv_slope))
    q4_bytes_per_param = 4.85 / 8  # Q4_K_M's average
    lc_file = (BUDGET - floor) / lc_slope
    print(f"\nextrapolated to 24 GB (floor {floor / GB:.2f} GB; RSS per weight byte: hf {hf_slope:.2f}, conversion "
          f"{conv_slope:.2f}, llamacpp {lc_slope:.2f} per GGUF byte; KV cache of long contexts not included):")
    print(f"  hf backend: about {hf_params / 1e9:.1f}B parameters, whatever the GGUF's quantisation "
          f"(the conversion's peak decides)")
    print(f"  llamacpp:   a GGUF of about {lc_file / GB:.1f} GB: about {lc_file / q4_bytes_per_param / 1e9:.0f}B parameters at Q4_K_M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
