"""A tiny training run in a process of its own, for the DDP and kill/resume tests.

    python tests/train_worker.py OUT [--kill-at STEP] [--resume] [--micro N] [--fsdp]

Trains a tiny random llama (seed 0) on fixed synthetic examples and writes OUT/history.json
and OUT/final.safetensors (rank 0). `--kill-at` sends SIGKILL to this process after that step
(a real `kill -9`, mid-run); `--resume` continues from OUT/ckpt. Under `accelerate launch
--num_processes 2` each process trains its share of every batch (DDP over gloo; with `--fsdp`,
FSDP2 over gloo, and the whole model is also saved with `models.save` to OUT/hf).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from conftest import build_tiny_model, build_tokenizer  # noqa: E402


def examples(tok, n: int = 12):
    from stillhouse.train.loop import Example

    out = []
    for i in range(n):
        p = tok(f"<|im_start|>user\nWhat is {i} + {2 * i + 1}?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        c = tok(f"It is {3 * i + 1}." + " ok" * (i % 4), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(Example(p + c, len(p)))
    return out


def config(**kw):
    from stillhouse.train.loop import TrainConfig

    base = dict(epochs=3, lr=5e-3, batch_size=4, sft_weight=1.0, kd_weight=0.0, warmup_ratio=0.0, checkpoint_every=2, seed=3)
    return TrainConfig(**{**base, **kw})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--micro", type=int, default=0)
    ap.add_argument("--fsdp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ["STILLHOUSE_QUIET"] = "1"
    from accelerate import Accelerator
    from safetensors.torch import save_model

    from stillhouse.train.loop import train

    out = Path(args.out)
    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0)
    if args.fsdp:  # as `accelerate launch` with examples/accelerate/fsdp.yaml asks for it
        from stillhouse import processes

        os.environ["ACCELERATE_USE_FSDP"] = "true"
        acc = processes.accelerator()
    else:
        acc = Accelerator(cpu=True)

    def on_step(rec):
        if args.kill_at and rec["step"] == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    history = train(model, examples(tok), config(micro_batch_size=args.micro), tok.pad_token_id,
                    checkpoint_dir=out / "ckpt", resume=args.resume, on_step=on_step, accelerator=acc,
                    metrics_path=out / "metrics.jsonl")
    if acc.is_main_process:
        (out / "history.json").write_text(json.dumps(history))
        if args.fsdp:  # the stage's save path: the gathered full state dict (set only under FSDP)
            from safetensors.torch import save_file

            from stillhouse import models
            from stillhouse.train import fsdp

            save_file(fsdp.unique(model.stillhouse_full_state), str(out / "final.safetensors"))
            models.save(model, tok, out / "hf")
        else:
            save_model(model, str(out / "final.safetensors"))
    acc.wait_for_everyone()
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
