"""Peak resident memory of a model on its own, measured in a fresh process.

Inside one process the high-water mark covers every model loaded so far (the teacher
included), so each model is loaded in a child that decodes a few tokens at batch 1 and
reports its peak RSS: what a user running only that model would see.

    python -m stillhouse.eval.footprint SPEC [--tokens N]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..errors import StillhouseError


def peak_rss_bytes(spec: str, *, tokens: int = 16, timeout: float = 600) -> int:
    """Peak RSS (bytes) of a fresh process that loads `spec` and decodes `tokens` tokens at batch 1."""
    proc = subprocess.run([sys.executable, "-m", "stillhouse.eval.footprint", spec, "--tokens", str(tokens)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "STILLHOUSE_QUIET": "1"})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StillhouseError(f"memory probe for model '{spec}' failed: {last}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def _probe(spec: str, tokens: int) -> dict:
    import torch

    from ..models import load
    from ..teachers.hf import encode_batch

    torch.set_num_threads(1)
    lm = load(spec)
    enc = encode_batch(lm.tokenizer, ["Hello"])
    with torch.inference_mode():
        lm.model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                          pad_token_id=lm.tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    return {"peak_rss_bytes": _own_peak_rss()}


def _own_peak_rss() -> int:
    """This process's high-water RSS. VmHWM belongs to the process's own address space; on Linux
    ru_maxrss carries over the *parent's* peak across fork+exec, so a probe started by a process
    holding a teacher would report the teacher's memory."""
    import resource

    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--tokens", type=int, default=16)
    a = ap.parse_args()
    try:
        print(json.dumps(_probe(a.spec, a.tokens)))
    except StillhouseError as e:
        print(f"stillhouse: error: {e}", file=sys.stderr)
        sys.exit(2)
