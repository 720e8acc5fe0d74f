"""Training speed and memory: stillhouse's KD/SFT loop against TRL's GKDTrainer and SFTTrainer.

    PYTHONPATH=src .venv/bin/python bench/train.py [--steps 40] [--batch 4] [--repeat 1]

Same teacher (SmolLM2-135M-Instruct), same student (its 15-layer depth-pruned copy, built
here by block importance), same ~50-token chat examples, batch 4, dynamic padding, the same
number of steps (one pass over the data, so every system sees exactly the same tokens).
Each system trains in its own subprocess, so its peak RSS is its own:

  trl-gkd         GKDTrainer, lambda=0 (off-policy), beta=0.5; the teacher runs in the loop;
                  gradient checkpointing off (TRL at its fastest on this small model)
  trl-gkd-gc      the same with TRL's default, gradient checkpointing on (slower, lighter)
  trl-sft         SFTTrainer on the completions, gradient checkpointing off
  trl-sft-gc      the same with gradient checkpointing on (TRL's default)
  sh-kd-cached    stillhouse, KD on an offline top-k teacher cache (no teacher in memory)
  sh-kd-lowmem    the same with `low_memory: true` (optimizer step in the backward pass,
                  sparse tied-embedding gradient, allocator returning freed memory; no
                  gradient clipping, which that mode rules out)
  sh-kd-online    stillhouse, KD with the teacher in the loop (full-vocabulary forward KL)
  sh-kd-online-lowmem  the same with `low_memory: true`: optimizer step in the backward pass
                  (so no gradient clipping, where GKD clips at 1.0), the allocator returning
                  freed memory, and the teacher's GGUF weights held as their block codes
                  (train/compact_weights.py; its logits stay bit-identical)
  sh-sft          stillhouse, SFT on the completions

Tokens/s counts real (non-padding) tokens over the wall time of the training call. The
achieved FLOP/s of stillhouse's step is the FLOPs it actually performs (forward + backward
through the decoder at the padded width, the LM head only at the counted positions) over
its time, as a fraction of the fp32 matmul peak measured at the start of the same run.
The teacher cache is built once beforehand (one teacher forward over the data); its time
is printed separately. Targets (issue 4): stillhouse's KD >= 1.6x trl-gkd tokens/s, <= 0.6x
its peak RSS, >= 70% of the matmul peak.

The closing lines print the like-for-like ratios (issue 20), each against TRL at its best
(gradient checkpointing off):
  * online KD vs GKD: sh-kd-online / trl-gkd (both run the teacher in the loop, full vocabulary);
  * cached KD vs GKD with the cache build counted: sh-kd-cached's time plus the share of the
    one-off cache build for the chats it trained on;
  * SFT vs TRL SFT: sh-sft / trl-sft.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEACHER = "smollm2-135m-instruct"
STUDENT_LAYERS = 15
TOP_K = 64
DATA_VERSION = 2  # bump when chat_examples changes
SYSTEMS = ["trl-gkd", "trl-gkd-gc", "trl-sft", "trl-sft-gc", "sh-kd-cached", "sh-kd-lowmem", "sh-kd-online",
           "sh-kd-online-lowmem", "sh-sft"]
# also: "sh-kd-lora" and "sh-kd-qlora" (cached KD into LoRA adapters, r=16 on every linear
# layer; QLoRA with the student's linear weights in NF4)
ADAPTERS = {"sh-kd-lora": None, "sh-kd-qlora": "nf4"}


# -- data ------------------------------------------------------------------------------------
def chat_examples(n: int, seed: int = 0) -> list[dict]:
    """Short arithmetic chats: about 50 tokens each with SmolLM2's template (a short system line
    replaces its ~20-token default one)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(1, 30)
        ab = a + b
        out.append({
            "prompt": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"Add {a} and {b}, then subtract {c}."}],
            "completion": [{"role": "assistant", "content": f"{a} + {b} - {c} = {ab - c}."}],
        })
    return out


def encode(tok, ex: dict) -> tuple[list[int], int]:
    """Token ids of the whole chat and the prompt length, with the model's own chat template."""
    prompt = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True, return_dict=False)
    assert full[: len(prompt)] == prompt
    return list(full), len(prompt)


# -- preparation (parent process) --------------------------------------------------------------
def prepare(work: Path, n: int) -> dict:
    """Student (depth-pruned by cosine importance), data, and the teacher's top-k cache."""
    import torch

    from stillhouse import models
    from stillhouse.scoring import right_pad, selected_logits
    from stillhouse.train import students

    info_path = work / "prep.json"
    if info_path.exists():  # prepared data for at least n chats is reused (workers take the first n)
        info = json.loads(info_path.read_text())
        if info.get("key", [0, 0])[1] == DATA_VERSION and info["n"] >= n:
            return info
    teacher = models.load(TEACHER)
    tok = teacher.tokenizer
    data = chat_examples(n)
    enc = [encode(tok, ex) for ex in data]
    texts = [tok.decode(ids) for ids, _ in enc[:32]]
    scores = students.cosine_importance(teacher.model, tok, texts)
    student = students.prune_depth(teacher.model, students.choose_layers(scores, STUDENT_LAYERS, (0, -1)))
    models.save(student, tok, work / "student")
    t0 = time.perf_counter()
    cache = []
    with torch.inference_mode():
        for s in range(0, len(enc), 16):
            chunk = enc[s : s + 16]
            x, attn = right_pad([ids for ids, _ in chunk], tok.pad_token_id)
            pos = torch.zeros_like(x, dtype=torch.bool)
            for r, (ids, n_prompt) in enumerate(chunk):
                pos[r, n_prompt - 1 : len(ids) - 1] = True
            lp = torch.log_softmax(selected_logits(teacher.model, x, attn, pos).float(), -1)
            top = lp.topk(TOP_K, dim=-1)
            rows_i, rows_v = top.indices.tolist(), top.values.tolist()
            for ids, n_prompt in chunk:  # rows are row-major: each example's targets in turn
                k = len(ids) - n_prompt
                cache.append({"ids": rows_i[:k], "lp": [[round(v, 5) for v in r] for r in rows_v[:k]]})
                rows_i, rows_v = rows_i[k:], rows_v[k:]
    cache_s = time.perf_counter() - t0
    (work / "data.json").write_text(json.dumps({"chats": data, "encoded": enc, "cache": cache}))
    info = {"n": n, "key": [n, DATA_VERSION], "cache_build_s": cache_s, "teacher_dir": str(models.resolve(TEACHER)[0]),
            "tokens": sum(len(ids) for ids, _ in enc), "targets": sum(len(ids) - p for ids, p in enc)}
    info_path.write_text(json.dumps(info))
    return info


def matmul_peak_flops(size: int = 2048, reps: int = 8) -> tuple[float, float]:
    """Best fp32 GEMM FLOP/s over a few tries (the machine's practical peak for this process),
    per wall second and per CPU second (the second is less sensitive to other processes)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best, best_cpu = 0.0, 0.0
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
        best_cpu = max(best_cpu, 2 * size**3 / max(time.process_time() - c0, 1e-9))
    return best, best_cpu


def layer_gemm_flops(hidden: int, intermediate: int, kv: int, rows: int, reps: int = 30) -> float:
    """FLOP/s of one decoder layer's GEMMs (q, k, v, o, gate, up, down; forward, input and
    weight gradients) at `rows` token rows, hot in cache: the ceiling for the matmuls of a
    step at this batch, before any other work."""
    import torch

    flops = seconds = 0.0
    for k, n in [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
                 (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]:
        x, w, g = torch.randn(rows, k), torch.randn(k, n), torch.randn(rows, n)
        for fn in (lambda: x @ w, lambda: g @ w.t(), lambda: x.t() @ g):
            fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            flops += 2 * rows * k * n
            seconds += (time.perf_counter() - t0) / reps
    return flops / seconds


# -- workers (one subprocess each) -------------------------------------------------------------
def step_flops(cfg, history: list[dict], lm_head_rows_key: str = "positions") -> float:
    """FLOPs performed by the student's training steps: 6 x params x padded tokens through the
    decoder blocks, attention scores at the padded width, and the LM head only at the rows used."""
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    inter, heads, kv = cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = d // heads
    per_layer = d * hd * (heads * 2 + kv * 2) + 3 * d * inter  # q, o, k, v projections + gated MLP
    total = 0.0
    for h in history:
        padded, width = h["padded"], h["padded"] / h["rows"]
        total += 6 * layers * per_layer * padded
        total += 6 * layers * 2 * padded * width * d  # QK^T and AV (causal masking not skipped)
        total += 6 * d * vocab * h[lm_head_rows_key]
    return total


def worker(system: str, work: Path, batch: int, lr: float, steps: int) -> dict:
    data = json.loads((work / "data.json").read_text())
    info = json.loads((work / "prep.json").read_text())
    n = steps * batch  # one pass over the first n chats
    data = {k: v[:n] for k, v in data.items()}
    info = {**info, "tokens": sum(len(ids) for ids, _ in data["encoded"])}
    result: dict = {"system": system, "steps": steps}
    if system.startswith("trl"):
        result.update(trl_worker(system, work, data, info, batch, lr, steps))
    else:
        from stillhouse import models
        from stillhouse.train import lora
        from stillhouse.train.loop import Example, TrainConfig, train

        student = models.load(str(work / "student"), quantize=ADAPTERS.get(system))
        model = lora.add_lora(student.model, 16, 32) if system in ADAPTERS else student.model
        teacher = models.load(TEACHER).model if system.startswith("sh-kd-online") else None
        cached = system in ("sh-kd-cached", "sh-kd-lowmem", *ADAPTERS)
        low = system.endswith("-lowmem")
        examples = [
            Example(ids, p, c["ids"] if cached else None, c["lp"] if cached else None)
            for (ids, p), c in zip(data["encoded"], data["cache"])
        ]
        kd = system.startswith("sh-kd")
        cfg = TrainConfig(epochs=1.0, lr=lr, batch_size=batch, warmup_ratio=0.0, max_length=512,
                          sft_weight=0.0 if kd else 1.0, kd_weight=1.0 if kd else 0.0,
                          low_memory=low, grad_clip=0.0 if low else 1.0)
        t0, c0 = time.perf_counter(), time.process_time()
        history = train(model, examples, cfg, student.tokenizer.pad_token_id, teacher=teacher)
        seconds = time.perf_counter() - t0
        result.update(seconds=seconds, cpu_seconds=time.process_time() - c0, tokens=history[-1]["tokens"], final_loss=history[-1]["loss"],
                      steps=len(history))
        if system not in ADAPTERS:  # (frozen weights get no gradient: the count below does not hold)
            result["flops"] = step_flops(student.model.config, history)
        if teacher is not None:  # the teacher's forward: 2 x FLOPs, full width, LM head at counted rows
            tcfg = teacher.config
            result["flops"] += step_flops(tcfg, history) / 3
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def trl_worker(system: str, work: Path, data: dict, info: dict, batch: int, lr: float, steps: int) -> dict:
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(work / "student")
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype="float32")
    common = dict(output_dir=str(work / f"out-{system}"), per_device_train_batch_size=batch, max_steps=steps,
                  learning_rate=lr, lr_scheduler_type="cosine", report_to="none", save_strategy="no",
                  logging_steps=max(1, steps // 4), use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                  seed=0, max_length=512,
                  # TRL defaults to bf16 autocast; stillhouse trains in fp32, so both do here
                  bf16=False, fp16=False,
                  # TRL turns checkpointing on by default; off is its fastest ("-gc": on, labelled)
                  gradient_checkpointing=system.endswith("-gc"))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    if system.removesuffix("-gc") == "trl-gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        teacher = AutoModelForCausalLM.from_pretrained(info["teacher_dir"], dtype="float32")
        ds = Dataset.from_list([{"messages": c["prompt"] + c["completion"]} for c in data["chats"]])
        args = GKDConfig(**common, lmbda=0.0, beta=0.5, temperature=1.0)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                             processing_class=tok, callbacks=[Clock()])
    else:
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_list(data["chats"])
        args = SFTConfig(**common, completion_only_loss=True, padding_free=False)
        trainer = SFTTrainer(model=student, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": info["tokens"], "final_loss": out.training_loss, "steps": len(times)}


def ratios(best: dict, info: dict, chats: int) -> list[str]:
    """The three honest comparisons, each with its settings, and whether the KD target holds."""
    out = []

    def pair(label, ours, peer, extra_s=0.0, note=""):
        if ours not in best or peer not in best:
            return
        a, b = best[ours], best[peer]
        speed = a["tokens"] / (a["seconds"] + extra_s) / b["tokens_per_s"]
        rss = a["peak_rss_gb"] / b["peak_rss_gb"]
        line = f"{label}: {speed:.2f}x tokens/s at {rss:.2f}x peak RSS ({ours} vs {peer}{note})"
        if peer == "trl-gkd":
            ok = speed >= 1.6 and rss <= 0.6
            line += f"; target >= 1.6x at <= 0.6x: {'met' if ok else 'MISSED'}"
        out.append(line)

    pair("online KD vs GKD", "sh-kd-online", "trl-gkd", note="; teacher in the loop, full-vocabulary KL on both sides")
    pair("online KD, low_memory, vs GKD", "sh-kd-online-lowmem", "trl-gkd",
         note="; as above, no gradient clipping (GKD clips at 1.0), teacher weights as block codes")
    build = info["cache_build_s"] * chats / info["n"]  # the share of the one-off build for the chats trained on
    pair("cached KD vs GKD, cache build included", "sh-kd-cached", "trl-gkd", build,
         f"; top-{TOP_K} cache, + {build:.1f} s of cache build")
    pair("SFT vs TRL SFT", "sh-sft", "trl-sft")
    return out


# -- parent -----------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--repeat", type=int, default=1, help="run every system this many times (interleaved)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--workdir", default=None, help="default: $STILLHOUSE_CACHE-independent temp dir")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("STILLHOUSE_QUIET", "1")
    work = Path(args.workdir or Path(tempfile.gettempdir()) / "stillhouse-bench-train")
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, work, args.batch, args.lr, args.steps)))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    info = prepare(work, args.steps * args.batch)
    peak, peak_cpu = matmul_peak_flops()
    print(f"data: the first {args.steps * args.batch} of {info['n']} prepared chats ({info['tokens'] / info['n']:.1f} tokens/chat, "
          f"{info['targets'] / info['n']:.1f} of them targets); teacher top-{TOP_K} cache built in {info['cache_build_s']:.1f} s (one-off)")
    print(f"fp32 matmul peak (2048^3 GEMM, best of 8): {peak / 1e9:.0f} GFLOP/s, {peak_cpu / 1e9:.0f} GFLOP per CPU-second; "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = round(args.batch * info["tokens"] / info["n"])
    sc = json.loads((work / "student" / "config.json").read_text())
    kv = sc["hidden_size"] // sc["num_attention_heads"] * sc["num_key_value_heads"]
    layer = layer_gemm_flops(sc["hidden_size"], sc["intermediate_size"], kv, rows)
    print(f"one student layer's GEMMs at {rows} rows (batch x mean length), hot in cache: {layer / 1e9:.0f} GFLOP/s, "
          f"{layer / peak:.0%} of the peak: the ceiling for the matmul share of a step")
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for system in args.systems.split(","):
            cmd = [sys.executable, __file__, "--worker", system, "--workdir", str(work),
                   "--batch", str(args.batch), "--lr", str(args.lr), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{system} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            r = json.loads(line[-1][7:])
            runs.setdefault(system, []).append(r)
            print(f"  {system:13} {r['tokens_per_s']:7.1f} tok/s  {r['peak_rss_gb']:.2f} GB  {r['seconds']:6.1f} s  "
                  f"loss {r['final_loss']:.3f}", flush=True)
    best = {s: max(rs, key=lambda r: r["tokens_per_s"]) for s, rs in runs.items()}
    print(f"\n{'system':13} {'tok/s':>7} {'peak RSS':>9} {'tok/s vs GKD':>12} {'RSS vs GKD':>10} {'% matmul peak (wall, CPU-time)':>30}")
    gkd = best.get("trl-gkd")
    for s, r in best.items():
        rt = f"{r['tokens_per_s'] / gkd['tokens_per_s']:.2f}x" if gkd else "-"
        rr = f"{r['peak_rss_gb'] / gkd['peak_rss_gb']:.2f}x" if gkd else "-"
        util = (f"{100 * r['flops'] / r['seconds'] / peak:.0f}% ({100 * r['flops'] / r['cpu_seconds'] / peak_cpu:.0f}% CPU-time)"
                if "flops" in r else "-")
        print(f"{s:13} {r['tokens_per_s']:7.1f} {r['peak_rss_gb']:8.2f}G {rt:>12} {rr:>10} {util:>30}")
    print("(trl-*-gc: TRL's default, gradient checkpointing on; trl-gkd and trl-sft: off, TRL at its fastest)")
    print("\nlike for like, against TRL with gradient checkpointing off:")
    for line in ratios(best, info, args.steps * args.batch):
        print("  " + line)
    print("(best of --repeat runs per system; the machine is shared, so absolute figures are noisy)")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peak, "peak_flops_cpu": peak_cpu, "prep": info, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
