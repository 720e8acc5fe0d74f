"""Generation throughput of the `hf` teacher backend against what users write by hand.

    .venv/bin/python bench/generate.py [--model smollm2-135m-instruct] [--prompts 256]
                                       [--new-tokens 64] [--temperature 0.7] [--slow-prompts 32]
                                       [--batches 16,32,64]

Same model, same prompts, same sampling (temperature sampling, no top-k, top-p 1, at most
`--new-tokens` new tokens), one process, measured back to back:
  * plain batched `model.generate` with left padding, prompts in given order (what a careful
    user writes by hand: the peer the target is set against), at each of `--batches`;
  * stillhouse's `hf` backend (`HFTeacher`) at each of `--batches`; the closing lines compare
    the two at equal batch (16) and each at its best batch, naming the batches;
  * llama.cpp through the `llamacpp` backend on the model's GGUF (its packaged quantisation),
    one sequence at a time (llama-cpp-python's `Llama` decodes one sequence), at its best of
    `--llamacpp-threads` and flash attention on/off, on the first `--slow-prompts` prompts;
  * a naive one-prompt-at-a-time `model.generate` loop;
  * distilabel's stock `TextGeneration` over `TransformersLLM` (only if distilabel is
    installed: `pip install -e ".[bench]"`).
The two slow paths run on the first `--slow-prompts` prompts only (their tok/s does not depend
on how many prompts they get; 256 would take ~10 minutes each).

Tokens are counted the same way everywhere: generated tokens up to the first stop token.
The machine may be shared: the ratios, measured in one run, mean more than the absolute
figures; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

TASKS = [  # varied prompt and answer lengths, all offline
    ("chain_sum", {"min_terms": 2, "max_terms": 5, "min_digits": 1, "max_digits": 3}),
    ("basic_arithmetic", {}),
    ("word_sorting", {}),
    ("letter_counting", {}),
]


def bench_prompts(n: int) -> list[list[dict]]:
    from stillhouse.verify.reasoning_gym import problems

    per = -(-n // len(TASKS))
    recs = [r for task, cfg in TASKS for r in problems(task, cfg, per, 11)]
    # interleave tasks so every batch of the hand-written peer mixes prompt lengths
    recs = [recs[t * per + i] for i in range(per) for t in range(len(TASKS))][:n]
    return [[{"role": "user", "content": r["question"]}] for r in recs]


def count_until_stop(rows: list[list[int]], stops: set[int]) -> int:
    total = 0
    for row in rows:
        for t in row:
            if t in stops:
                break
            total += 1
    return total


def sampling_kwargs(args, tok, stops) -> dict:
    return dict(
        max_new_tokens=args.new_tokens, do_sample=args.temperature > 0, temperature=args.temperature or None,
        top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=sorted(stops),
    )


@torch.inference_mode()
def plain_batched(model, tok, msgs, args, stops, batch: int) -> int:
    """Hand-written batched generation: left padding, batches in the given order."""
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    total = 0
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], return_tensors="pt", padding=True)
        out = model.generate(**enc, **sampling_kwargs(args, tok, stops))
        total += count_until_stop(out[:, enc["input_ids"].shape[1] :].tolist(), stops)
    return total


def distilabel_stock(model_dir, msgs, args, tok) -> tuple[int, float]:
    from distilabel.models.llms import TransformersLLM
    from distilabel.steps.tasks import TextGeneration

    # the same sampling as the other paths (distilabel's own defaults differ: 128 tokens,
    # temperature 0.1, repetition penalty 1.1)
    gen = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
               repetition_penalty=1.0, do_sample=args.temperature > 0)
    llm = TransformersLLM(model=str(model_dir), device="cpu", torch_dtype="float32", generation_kwargs=gen)
    task = TextGeneration(llm=llm)
    task.load()
    inputs = [{"instruction": m[-1]["content"]} for m in msgs]
    t0 = time.perf_counter()
    outs = []
    for batch in task.process(inputs):  # stock: the step's default input batch size
        outs.extend(batch)
    secs = time.perf_counter() - t0
    toks = sum(len(tok(o["generation"] or "", add_special_tokens=False)["input_ids"]) for o in outs)
    return toks, secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--slow-prompts", type=int, default=32, help="prompts for the naive loop and distilabel")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--batches", default="16,32,64", help="batch sizes tried for both plain generate and the hf backend")
    ap.add_argument("--llamacpp-threads", default=str(os.cpu_count() or 1), help="thread counts tried for llama.cpp")
    ap.add_argument("--skip", default="", help="comma-separated paths to skip: naive,distilabel,llamacpp")
    args = ap.parse_args()
    os.environ.setdefault("STILLHOUSE_QUIET", "1")
    skip = set(filter(None, args.skip.split(",")))

    from stillhouse import models
    from stillhouse.teachers.base import SamplingParams
    from stillhouse.teachers.hf import HFTeacher

    torch.manual_seed(0)
    model_dir, _ = models.resolve(args.model)
    lm = models.load(args.model)
    model, tok = lm.model, lm.tokenizer
    msgs = bench_prompts(args.prompts)
    slow = msgs[: args.slow_prompts]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, seed=1)
    batches = [int(b) for b in args.batches.split(",")]
    hf = HFTeacher(model, tok)
    stops = set(hf._stop_ids())  # the peers stop where the backend does
    print(f"{args.model}: {args.prompts} prompts ({args.slow_prompts} for the slow paths), "
          f"{args.new_tokens} new tokens, temperature {args.temperature}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads on {os.cpu_count()} cores", flush=True)
    # warm-up (allocator, kernels) so the first timed path is not penalised
    hf.generate(msgs[:4], SamplingParams(max_new_tokens=4, temperature=args.temperature))

    rows: list[tuple[str, int, float]] = []

    def record(label, fn):
        t0 = time.perf_counter()
        toks = fn()
        secs = time.perf_counter() - t0
        if isinstance(toks, tuple):  # the path timed itself (excludes its own loading)
            toks, secs = toks
        rows.append((label, toks, secs))
        print(f"{label:52} {toks:6d} tok {secs:7.1f} s {toks / secs:7.1f} tok/s", flush=True)

    plain, ours = {}, {}
    for b in batches:  # interleaved, so load on a shared machine hits both sides alike
        record(f"plain batched generate, batch {b}", lambda: plain_batched(model, tok, msgs, args, stops, b))
        plain[b] = rows[-1]
        hf.batch_size = b
        record(f"stillhouse hf backend, batch {b}", lambda: sum(len(c.token_ids) for cs in hf.generate(msgs, params) for c in cs))
        ours[b] = rows[-1]
    if "llamacpp" not in skip:
        best_lc = llamacpp_peer(args, slow, params, record, rows)
        if best_lc is not None:
            rows.append(best_lc)
    if "naive" not in skip:
        record("naive loop, one prompt at a time", lambda: plain_batched(model, tok, slow, args, stops, 1))
    if "distilabel" not in skip:
        try:
            import distilabel  # noqa: F401
        except ImportError:
            print("distilabel not installed (pip install -e '.[bench]'): skipped")
        else:
            record(f"distilabel {distilabel.__version__} TextGeneration (stock)",
                   lambda: distilabel_stock(model_dir, slow, args, tok))

    tps = lambda r: r[1] / r[2]  # noqa: E731
    best_ours = max(ours, key=lambda b: tps(ours[b]))
    best_plain = max(plain, key=lambda b: tps(plain[b]))
    print()
    for b in batches:
        print(f"at equal batch {b}: hf backend {tps(ours[b]) / tps(plain[b]):.2f}x plain batched generate")
    best = tps(ours[best_ours]) / tps(plain[best_plain])
    print(f"best vs best: hf backend at batch {best_ours} {best:.2f}x plain batched generate at batch {best_plain} "
          f"(target >= 1.5x at equal batch: {'met' if tps(ours[16]) / tps(plain[16]) >= 1.5 else 'MISSED'} at 16)"
          if 16 in ours else f"best vs best: hf backend at batch {best_ours} {best:.2f}x plain at batch {best_plain}")
    for label, toks, secs in rows:
        if not label.startswith(("stillhouse", "plain")):
            print(f"hf backend (batch {best_ours}) vs {label}: {tps(ours[best_ours]) / (toks / secs):.2f}x")
    return 0


def llamacpp_peer(args, msgs, params, record, rows):
    """llama.cpp at its best of the thread counts and flash attention on/off; None if not installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python not installed (pip install -e '.[llamacpp]'): skipped")
        return None
    from stillhouse.teachers.factory import make_teacher

    tried = []
    for threads in [int(t) for t in args.llamacpp_threads.split(",")]:
        for fa in (False, True):
            t = make_teacher({"backend": "llamacpp", "model": args.model, "n_ctx": 2048, "n_threads": threads, "flash_attn": fa})
            t.generate(msgs[:2], params.__class__(max_new_tokens=4))  # warm-up
            record(f"llama.cpp {llama_cpp.__version__}, GGUF as packaged, {threads} thr, flash_attn {'on' if fa else 'off'}",
                   lambda: sum(len(c.token_ids) for cs in t.generate(msgs, params) for c in cs))
            tried.append(rows.pop())
            del t
    best = max(tried, key=lambda r: r[1] / r[2])
    return (best[0] + " (best)", best[1], best[2])


if __name__ == "__main__":
    sys.exit(main())
