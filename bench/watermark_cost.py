"""What a watermark costs the teacher, and how well it is detected (docs/watermark.md).

    python bench/watermark_cost.py --problems 2400 --long 40                   # gcd, the quickstart's task (2,146 problems)
    python bench/watermark_cost.py --task chain_sum --problems 3000 --long 40  # the quickstart's task before
    python bench/watermark_cost.py --problems 40 --long 4            # a minutes-long smoke run

On the packaged SmolLM2-135M-Instruct (the quickstart teacher):
1. pass@1 on the task's problems (the quickstart eval split's config and seed, distinct question
   texts, more problems than the split holds so that a 2-point difference is resolvable; gcd up
   to 50 has fewer than 2,500 distinct questions: `--problems 2400` finds 2,146), one answer per problem and
   arm, every arm on the same problems: greedy; sampled at --temperature; sampled with each
   watermark (`--arms`). Each watermarked arm is compared with the plain arm of the same decoding
   (paired difference per problem and its 95% interval).
2. Detection: answers of up to 200 tokens to real public prompts (guard/simulate.public_prompts:
   MMLU, HumanEval, reasoning-gym task texts; "Explain your answer in detail." appended), sampled at the same temperature, each answer
   tested alone; the same prompts' plain answers give the null.
3. Perplexity of held-out text (paragraphs of docs/) under each arm's distribution, and the
   plain model's per-token NLL of each arm's long answers (distortion shows up as a higher NLL).
Every figure goes to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("STILLHOUSE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stillhouse.guard import watermark as wm  # noqa: E402
from stillhouse.teachers.base import SamplingParams  # noqa: E402
from stillhouse.teachers.hf import HFTeacher, encode_prompt, render_chat  # noqa: E402

KEY = "5eed" * 16  # the provider's key in this benchmark (not secret)
# the eval split's config of recipes/quickstart.yaml (gcd) and recipes/chain_sum.yaml (the
# quickstart before it moved to gcd); both use seed 1,000,000 for it
TASKS = {
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 50},
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
}
EVAL_SEED = 1_000_000


def distinct_problems(task: str, n: int) -> list[dict]:
    """Up to n problems with distinct question texts, in the seeded generator's order (a repeated
    question under greedy decoding is the same answer twice, not a second observation)."""
    from stillhouse.data.dedup import exact_dedup
    from stillhouse.verify.reasoning_gym import problems

    return exact_dedup(problems(task, TASKS[task], 4 * n, EVAL_SEED), "question")[0][:n]


def make_arm(name: str):
    """(watermark or None, sampled?) for an arm name."""
    if name in ("greedy", "sampled"):
        return None, name == "sampled"
    if name == "gumbel":
        return wm.GumbelWatermark(KEY), True
    if name.startswith("greenlist"):  # greenlist:DELTA[:CONFIDENT]
        parts = name.split(":")
        delta = float(parts[1]) if len(parts) > 1 else wm.DELTA
        confident = float(parts[2]) if len(parts) > 2 else 1.0
        return wm.WatermarkProcessor(KEY, delta=delta, confident=confident), True
    raise SystemExit(f"unknown arm {name}")


def generate(lm, messages, processor, temperature, max_new_tokens, seed):
    t = HFTeacher(lm.model, lm.tokenizer, batch_size=32)
    t.logits_processor = processor
    return [o[0] for o in t.generate(messages, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))]


def paired(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """Mean of b - a in points and the 95% half-width of the per-problem paired difference."""
    d = np.array(b, float) - np.array(a, float)
    return 100 * d.mean(), 100 * 1.96 * d.std(ddof=1) / math.sqrt(len(d))


@torch.inference_mode()
def held_out_nll(lm, texts, processor) -> tuple[float, int]:
    """Summed NLL of texts under the arm's next-token distribution (the watermark's bias
    included; the Gumbel scheme leaves the distribution as it is)."""
    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([encode_prompt(lm.tokenizer, t)[:512]])
        logits = lm.model(input_ids=ids).logits[0, :-1].float()
        if processor is not None:
            logits = torch.stack([processor(ids[:, : i + 1], logits[i : i + 1])[0] for i in range(len(logits))])
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total, count


@torch.inference_mode()
def answer_nll(lm, messages, comps) -> float:
    """The plain model's mean per-token NLL (at T = 1) of generated answers given their prompts."""
    total, count = 0.0, 0
    for m, c in zip(messages, comps):
        if not c.token_ids:
            continue
        p = encode_prompt(lm.tokenizer, render_chat(lm.tokenizer, m))
        ids = torch.tensor([p + c.token_ids])
        logits = lm.model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, len(p):], reduction="sum"))
        count += len(c.token_ids)
    return total / max(count, 1)


def held_out_text(n: int) -> list[str]:
    paras = []
    for f in sorted((ROOT / "docs").glob("*.md")):
        paras += [p.strip() for p in f.read_text().split("\n\n") if len(p.strip()) > 200 and not p.startswith(("|", "```", "!["))]
    return paras[:n]


def score(proc, token_ids):
    if isinstance(proc, wm.GumbelWatermark):
        return wm.gumbel_score_ids(KEY, [token_ids])
    return wm.score_ids(KEY, [token_ids], proc.gamma if proc is not None else wm.GAMMA)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="gcd", help="the quickstart's task (gcd) or chain_sum")
    ap.add_argument("--problems", type=int, default=2400, help="distinct questions (fewer if the task has fewer)")
    ap.add_argument("--long", type=int, default=40, help="long answers for detection")
    ap.add_argument("--ppl-texts", type=int, default=30)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--arms", default="greedy,sampled,gumbel", help="greedy, sampled, gumbel, greenlist:DELTA[:CONFIDENT]")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "watermark_cost.json")
    args = ap.parse_args()

    from stillhouse import models
    from stillhouse.eval.measure import messages_for
    from stillhouse.guard.simulate import public_prompts
    from stillhouse.verify.reasoning_gym import ReasoningGymVerifier

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    lm = models.load("smollm2-135m-instruct")
    recs = distinct_problems(args.task, args.problems)
    verify = ReasoningGymVerifier(args.task, TASKS[args.task])
    task_msgs = [messages_for(r) for r in recs]
    prompts = [p for p in public_prompts() if 40 < len(p) < 600][:: 7][: args.long]
    long_msgs = [[{"role": "user", "content": p + "\n\nExplain your answer in detail."}] for p in prompts]
    texts = held_out_text(args.ppl_texts)
    T = args.temperature
    out = {"model": "smollm2-135m-instruct", "task": args.task, "problems": len(recs), "temperature": T, "key_id": wm.key_id(KEY),
           "load_avg_start": os.getloadavg()[0], "arms": {}}
    passed = {}
    for name in args.arms.split(","):
        proc, sampled = make_arm(name)
        temp = T if sampled else 0.0
        t0 = time.perf_counter()
        comps = generate(lm, task_msgs, proc, temp, 24, seed=1)
        passed[name] = [bool(verify(r, c.text).passed) for r, c in zip(recs, comps)]
        arm = {"temperature": temp, "pass1": 100 * float(np.mean(passed[name])), "seconds_pass1": time.perf_counter() - t0}
        t0 = time.perf_counter()
        long = generate(lm, long_msgs, proc, temp, 200, seed=2)
        scores = [score(proc if proc is not None else wm.GumbelWatermark(KEY), c.token_ids) for c in long]
        if proc is None:  # the null: plain answers under both detectors
            arm["null_p_gumbel"] = [s.p_value for s in scores]
            arm["null_p_greenlist"] = [wm.score_ids(KEY, [c.token_ids]).p_value for c in long]
        else:
            arm["long_p"] = [s.p_value for s in scores]
        arm["long_tokens"] = [len(c.token_ids) for c in long]
        full = [s.p_value for s, c in zip(scores, long) if len(c.token_ids) >= 200]
        arm["long200_count"] = len(full)
        arm["long200_detected_1e-6"] = float(np.mean([p < 1e-6 for p in full])) if full else float("nan")
        arm["long_detected_1e-6"] = float(np.mean([s.p_value < 1e-6 for s in scores]))
        arm["long_median_p"] = float(np.median([s.p_value for s in scores]))
        arm["answer_nll"] = answer_nll(lm, long_msgs, long)
        arm["seconds_long"] = time.perf_counter() - t0
        nll, n = held_out_nll(lm, texts, proc if isinstance(proc, wm.WatermarkProcessor) else None)
        arm["ppl_held_out"], arm["ppl_tokens"] = math.exp(nll / n), n
        out["arms"][name] = arm
        print(f"{name}: pass@1 {arm['pass1']:.1f}  ppl {arm['ppl_held_out']:.2f}  answer NLL {arm['answer_nll']:.3f}  "
              f"200-token answers at p<1e-6 {arm['long200_detected_1e-6']:.0%} of {len(full)} (all: {arm['long_detected_1e-6']:.0%}, "
              f"median p {arm['long_median_p']:.2g})  [{arm['seconds_pass1']:.0f}+{arm['seconds_long']:.0f} s]", flush=True)
    for name, arm in out["arms"].items():
        base = "sampled" if arm["temperature"] > 0 else "greedy"
        if name != base and base in passed:
            arm["vs"] = base
            arm["pass1_diff"], arm["pass1_diff_ci95"] = paired(passed[base], passed[name])
    if "greedy" in passed and "sampled" in passed:
        out["arms"]["sampled"]["vs"] = "greedy"
        out["arms"]["sampled"]["pass1_diff"], out["arms"]["sampled"]["pass1_diff_ci95"] = paired(passed["greedy"], passed["sampled"])
    out["load_avg_end"] = os.getloadavg()[0]
    args.out.write_text(json.dumps(out, indent=1))

    print(f"\n{len(recs)} {args.task} problems, T = {T} for sampled arms; load average {out['load_avg_start']:.1f} -> {out['load_avg_end']:.1f}")
    print("| arm | pass@1 | vs | difference [95%] | held-out ppl | answer NLL | 200-token answers at p < 1e-6 | median p |")
    print("|---|---|---|---|---|---|---|---|")
    for name, a in out["arms"].items():
        diff = f"{a['pass1_diff']:+.1f} ± {a['pass1_diff_ci95']:.1f}" if "vs" in a else ""
        det = f"{a['long200_detected_1e-6']:.0%} of {a['long200_count']}" if "long_p" in a else "(null) " + \
            f"{np.mean([p < 1e-6 for p in a['null_p_gumbel'] + a['null_p_greenlist']]):.0%}"
        print(f"| {name} | {a['pass1']:.1f} | {a.get('vs', '')} | {diff} | {a['ppl_held_out']:.2f} | {a['answer_nll']:.3f} | {det} | "
              f"{a['long_median_p']:.2g} |")


if __name__ == "__main__":
    main()
