"""Cross-tokenizer distillation on the packaged models: gemma3-270m teaches smollm2-135m-instruct.

    .venv/bin/python bench/cross_tokenizer.py [--train 48] [--heldout 16] [--epochs 2]

The teacher (Gemma 3 270M, vocabulary 262,144) writes answers to chain_sum questions; the
student (SmolLM2-135M-Instruct, vocabulary 49,152) is trained from the same initial weights
twice: sequence-level KD alone (SFT on the teacher's text, uld_weight 0) and SFT plus the ULD
sorted-probability distance at character-aligned tokens (uld_weight 1). On held-out teacher
answers it prints the student's perplexity of the teacher text and its ULD distance to the
teacher, before and after each run. Timings are on a shared CPU (noisy).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    args = ap.parse_args()
    from stillhouse import models
    from stillhouse.scoring import selected_logits
    from stillhouse.teachers.base import SamplingParams
    from stillhouse.teachers.hf import HFTeacher
    from stillhouse.train.cross_tokenizer import CrossConfig, prepare, train_cross, uld_distance
    from stillhouse.train.loop import collate
    from stillhouse.train.losses import cross_entropy
    from stillhouse.verify.reasoning_gym import problems

    t0 = time.perf_counter()
    teacher = models.load("gemma3-270m")
    student = models.load("smollm2-135m-instruct")
    qs = problems("chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
                  args.train + args.heldout, 11)
    chats = [[{"role": "user", "content": q["question"]}] for q in qs]
    outs = HFTeacher(teacher.model, teacher.tokenizer, batch_size=16).generate(
        chats, SamplingParams(max_new_tokens=32, temperature=0.0), "Teacher (gemma3-270m) answers")
    records = [(c, o[0].text) for c, o in zip(chats, outs) if o[0].text.strip()]
    train_recs, held = records[: args.train], records[args.train :]
    cfg = CrossConfig(epochs=args.epochs, lr=args.lr, batch_size=8, top_k=64, uld_weight=1.0, sft_weight=1.0)
    s_tok, t_tok = student.tokenizer, teacher.tokenizer
    prep_train = prepare(s_tok, t_tok, teacher.model, train_recs, cfg)
    prep_held = prepare(s_tok, t_tok, teacher.model, held, cfg)
    aligned = sum(len(e.sorted_rows) for e in prep_held) / max(1, sum(len(e.input_ids) - e.n_prompt for e in prep_held))
    print(f"{len(train_recs)} train / {len(held)} held-out teacher answers, {aligned:.0%} of student tokens aligned; "
          f"set-up {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    del teacher

    def perplexity(model) -> float:
        with torch.no_grad():
            ids, attn, predict, targets, _ = collate(prep_held, s_tok.pad_token_id)
            return math.exp(cross_entropy(selected_logits(model, ids, attn, predict), targets).item())

    rows = [("initial student", perplexity(student.model), uld_distance(student.model, s_tok.pad_token_id, prep_held, cfg), 0.0)]
    for label, uld_w in (("SFT on teacher text", 0.0), ("SFT + ULD (aligned)", 1.0)):
        model = copy.deepcopy(student.model)
        t1 = time.perf_counter()
        train_cross(model, s_tok.pad_token_id, prep_train, CrossConfig(**{**cfg.__dict__, "uld_weight": uld_w}), label)
        rows.append((label, perplexity(model), uld_distance(model, s_tok.pad_token_id, prep_held, cfg), time.perf_counter() - t1))
    print(f"\n{'student':24} {'held-out ppl':>12} {'held-out ULD':>12} {'train s':>8}")
    for label, ppl, uld, secs in rows:
        print(f"{label:24} {ppl:>12.3f} {uld:>12.4f} {secs:>8.0f}")
    sft, both = rows[1], rows[2]
    print(f"\nSFT+ULD vs SFT alone: perplexity {both[1] / sft[1]:.3f}x, ULD distance {both[2] / sft[2]:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
