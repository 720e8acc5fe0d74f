"""Training steps of a packaged model with a large vocabulary, timed with the kernel's share.

At Gemma-3's 262k-token vocabulary the loss runs in chunks of 4 rows (losses.rows_per_chunk),
so anything the backward pass does once per chunk over the whole [rows, vocab] logits shows up
here as kernel time and page faults long before it shows in matmul time. Run it at two commits
to compare them (same machine, back to back):

    OMP_NUM_THREADS=1 python bench/large_vocab_step.py                  # pruned Gemma-3, 2 steps
    OMP_NUM_THREADS=1 python bench/large_vocab_step.py --model smollm2-135m-instruct --keep all

Rows are random token ids (the speed does not depend on the text); each step is one batch of
`--batch` rows of `--tokens` tokens, the first `--prompt` of them not trained on.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m", help="a packaged model name (stillhouse.models.load)")
    ap.add_argument("--keep", default="2of3", help="decoder blocks kept: 'all', or '2of3' (every block i with i %% 3 != 1, "
                    "the provenance bench's pruned Gemma student)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=90)
    ap.add_argument("--prompt", type=int, default=26)
    ap.add_argument("--out", help="also write the figures here as JSON")
    args = ap.parse_args()
    if args.keep not in ("all", "2of3"):
        ap.error(f"--keep: 'all' or '2of3', got {args.keep!r}")

    from stillhouse import models
    from stillhouse.train.loop import Example, TrainConfig, train
    from stillhouse.train.students import prune_depth

    lm = models.load(args.model)
    model = lm.model
    n = model.config.num_hidden_layers
    if args.keep == "2of3":
        model = prune_depth(model, [i for i in range(n) if i % 3 != 1])
    model.train()
    g = torch.Generator().manual_seed(0)
    rows = [Example(torch.randint(100, 20000, (args.tokens,), generator=g).tolist(), args.prompt)
            for _ in range(args.steps * args.batch)]
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    train(model, rows, TrainConfig(epochs=1, lr=3e-4, batch_size=args.batch, sft_weight=1.0, kd_weight=0.0, warmup_ratio=0.0,
                                   seed=0), lm.tokenizer.pad_token_id)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    res = {"model": args.model, "keep": args.keep, "vocab": model.config.vocab_size, "steps": args.steps,
           "rows_per_step": args.batch, "tokens_per_row": args.tokens, "wall_s": round(wall, 1),
           "user_s": round(r1.ru_utime - r0.ru_utime, 1), "sys_s": round(r1.ru_stime - r0.ru_stime, 1),
           "minor_faults": r1.ru_minflt - r0.ru_minflt,
           "trained_tokens_per_s": round(args.steps * args.batch * (args.tokens - args.prompt) / wall, 1)}
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
