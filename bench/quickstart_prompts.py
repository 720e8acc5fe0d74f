"""The teacher's greedy pass@1 under candidate generation-time prompts (context distillation).

    .venv/bin/python bench/quickstart_prompts.py [--variants plain,fewshot4,sys_number,fewshot4_sys]
    .venv/bin/python bench/quickstart_prompts.py --terms 3 --max-digits 1 --size 100 --seed 3000000

By default on the quickstart's validation split (chain_sum, 2 terms, 1-2 digits, 200 drawn from
seed 2000000, minus the questions the test split asks): never on the test split. With --terms /
--max-digits / --size / --seed, on a fresh draw of another part of chain_sum's space instead
(the seed must stay clear of the test split's 1000000..1000499). A prompt that makes more of the
teacher's answers verify is a candidate for the rejection stage's `teacher_prompt`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from stillhouse import models
from stillhouse.data.config import TeacherPrompt
from stillhouse.data.rejection import teacher_messages
from stillhouse.data.splits import disjoint_splits
from stillhouse.teachers.base import SamplingParams
from stillhouse.teachers.hf import HFTeacher, render_chat
from stillhouse.verify.reasoning_gym import ReasoningGymVerifier, problems

CFG = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}  # recipes/chain_sum.yaml's
Q = "State the final answer to the following arithmetic problem: "
SHOTS = [(Q + "7 + 5 =", "12"), (Q + "4 - 9 =", "-5"), (Q + "38 + 47 =", "85"), (Q + "52 - 86 =", "-34")]
CALCULATOR = "You are a calculator. Reply with the number only. Numbers can be negative."
VARIANTS = {
    "plain": None,
    "fewshot4": TeacherPrompt(examples=SHOTS),
    "sys_number": TeacherPrompt(system_prompt=CALCULATOR),
    "fewshot4_sys": TeacherPrompt(system_prompt=CALCULATOR, examples=SHOTS),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--terms", type=int, default=None, help="draw N-term problems instead of the validation split")
    ap.add_argument("--max-digits", type=int, default=2)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=3_000_000)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.terms is None:
        cfg, where = CFG, "validation split"
        test, val = problems("chain_sum", cfg, 500, 1_000_000), problems("chain_sum", cfg, 200, 2_000_000)
        rows = disjoint_splits([], val, test)[0]["validation"]
    else:
        cfg = {"min_terms": args.terms, "max_terms": args.terms, "min_digits": 1, "max_digits": args.max_digits}
        rows, where = problems("chain_sum", cfg, args.size, args.seed), f"{args.terms}-term 1-{args.max_digits} digit draw, seed {args.seed}"
    lm = models.load("smollm2-135m-instruct")
    teacher = HFTeacher(lm.model, lm.tokenizer, batch_size=64)
    verify = ReasoningGymVerifier("chain_sum", cfg)
    for name in args.variants.split(","):
        texts = [render_chat(lm.tokenizer, teacher_messages(r["question"], None, VARIANTS[name])) for r in rows]
        t0 = time.perf_counter()
        outs = teacher.generate_text(texts, SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0), name)
        ok = [verify(r, o[0].text).passed for r, o in zip(rows, outs)]
        digits = [json.loads(r["entry"])["metadata"]["num_digits"] for r in rows]
        by = {d: [k for k, dd in zip(ok, digits) if dd == d] for d in sorted(set(digits))}
        parts = "  ".join(f"{d}-digit {sum(v) / len(v):.3f} (n={len(v)})" for d, v in by.items())
        print(f"{name:13} {where}: teacher greedy pass@1 {sum(ok) / len(ok):.3f} (n={len(ok)})  {parts}  "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
