"""On-policy distillation on the tests' tiny models: how far each method cuts the student's
reverse KL to its teacher, per training seed.

    PYTHONPATH=src .venv/bin/python bench/onpolicy.py [--seeds 0,1,2] [--steps 25]

The setup is tests/test_onpolicy.py's (a 4-layer random teacher, a 2-layer random student,
8 chat prompts, the tiny character tokenizer of tests/conftest.py); it calls only
`train_onpolicy`, `sample_completions`, `OnPolicyConfig` and `Prompt`, so the same command
runs on the code before and after on-policy training moved onto the shared loop
(docs/onpolicy-and-cross-tokenizer.md gives both). The figure per run is the exact reverse
KL per completion position on the student's own samples (a fixed sampling seed), after
training divided by before: lower is better, 1 is no change.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import build_tiny_model, build_tokenizer  # noqa: E402

from stillhouse import models  # noqa: E402
from stillhouse.scoring import right_pad, selected_logits  # noqa: E402
from stillhouse.teachers.hf import encode_prompt, render_chat  # noqa: E402
from stillhouse.train.losses import divergence  # noqa: E402
from stillhouse.train.onpolicy import OnPolicyConfig, Prompt, sample_completions, train_onpolicy  # noqa: E402

QUESTIONS = ["1+2=", "What is 7?", "say hi", "abc", "3*3", "x y z", "count", "ok?"]


def setup():
    tok = build_tokenizer()
    models.prepare_tokenizer(tok)
    teacher = build_tiny_model(tok, seed=0)
    student = build_tiny_model(tok, seed=1, layers=2)
    prompts = []
    for q in QUESTIONS:
        text = render_chat(tok, [{"role": "user", "content": q}])
        prompts.append(Prompt(text, encode_prompt(tok, text)))
    return tok, teacher, student, prompts


def on_policy_reverse_kl(student, teacher, tok, prompts, max_new_tokens: int) -> float:
    """Exact reverse KL per completion position, on the student's samples (sampling seed fixed)."""
    completions = sample_completions(student, tok, prompts, OnPolicyConfig(max_new_tokens=max_new_tokens), seed=12345)
    seqs = [p.ids + c for p, c in zip(prompts, completions)]
    ids, attn = right_pad(seqs, tok.pad_token_id)
    predict = torch.zeros_like(ids, dtype=torch.bool)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        predict[r, len(p.ids) - 1 : len(p.ids) + len(c) - 1] = True
    with torch.no_grad():
        return divergence("reverse_kl", selected_logits(student, ids, attn, predict),
                          selected_logits(teacher, ids, attn, predict)).item()


def run(method: str, seed: int, steps: int) -> tuple[float, float]:
    tok, teacher, student, prompts = setup()
    if method == "gkd":  # the off-policy share trains on the teacher's own completions
        text = sample_completions(teacher, tok, prompts, OnPolicyConfig(max_new_tokens=8), seed=7)
        prompts = [Prompt(p.text, p.ids, c) for p, c in zip(prompts, text)]
        cfg = OnPolicyConfig(method="gkd", lmbda=0.5, beta=0.5, steps=steps, batch_size=8, lr=3e-3, max_new_tokens=8, seed=seed)
    else:
        cfg = OnPolicyConfig(method="reverse_kl", steps=steps, batch_size=8, lr=1e-2, max_new_tokens=8, seed=seed)
    before = on_policy_reverse_kl(student, teacher, tok, prompts, 8)
    t0 = time.perf_counter()
    train_onpolicy(student, teacher, tok, prompts, cfg)
    seconds = time.perf_counter() - t0
    return on_policy_reverse_kl(student, teacher, tok, prompts, 8) / before, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| method | seed | reverse KL after / before | train s |\n|---|---:|---:|---:|")
    for method in ("reverse_kl", "gkd"):
        for seed in map(int, args.seeds.split(",")):
            ratio, seconds = run(method, seed, args.steps)
            print(f"| {method} | {seed} | {ratio:.4f} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
