"""Antidistillation sampling on the quickstart task: what it costs the teacher, what it costs a
student distilled from its answers (docs/watermark.md).

    OMP_NUM_THREADS=1 nice -n 19 python bench/antidistill.py --lams 0,0.25,0.5 --eval 500 --train 1646 --seeds 3 --student-layers 12
    python bench/antidistill.py --task chain_sum --lams 0,0.25,0.5 --train 200 --eval 200 --epochs 4 --student-layers 14
    python bench/antidistill.py --lams 0,3 --train 24 --eval 24 --epochs 1     # a smoke run

For each strength lam (0 = normal sampling), on the packaged SmolLM2-135M-Instruct teacher:
1. the teacher's pass@1: one answer per problem sampled at --temperature, every arm on the same
   problems, paired difference against lam = 0 with its 95% interval, on the --eval problems and
   on every problem it answered (eval + train: a finer interval; the teacher never trains);
2. traces: the teacher's answers (same temperature) to the --train problems, verified answers
   kept (quickstart's rejection sampling, one sample per problem);
3. --seeds students per arm: the teacher depth-pruned to --student-layers blocks (the same initial
   student for every arm and seed), SFT on those traces with stillhouse's training loop (seed s),
   then greedy pass@1 on the eval problems and the mean NLL of their reference answers. Paired
   differences against the students of the lam = 0 traces, per problem averaged over seeds
   (intervals over problems), and every seed's own pass@1 (the spread between training runs).
Problems: --task gcd (the quickstart's task, the default) takes distinct questions of the eval
split's generator (seed 1,000,000): the first --eval are the eval problems (the quickstart's test
split), the next --train the train problems, so the two never share a question (9,600 draws
give 2,146 distinct ones, bench/watermark_cost.py's problems); --task chain_sum (the quickstart before gcd) keeps its own eval
and train split seeds. The proxy the teacher uses is the teacher's first --proxy-layers blocks
(cheap and not the student: the provider does not know the student); its downstream loss is on
64 problems of the same task from seed 7.  Figures go to --out as JSON.
"""

from __future__ import annotations

import argparse
import copy
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

from stillhouse.guard import antidistill as ad  # noqa: E402
from stillhouse.teachers.base import SamplingParams  # noqa: E402
from stillhouse.teachers.hf import HFTeacher, encode_prompt, render_chat  # noqa: E402

TASKS = {  # eval split configs of recipes/quickstart.yaml (gcd) and recipes/chain_sum.yaml (the quickstart before gcd)
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 50},
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
}
EVAL_SEED, TRAIN_SEED = 1_000_000, 1  # quickstart's eval and train split seeds


def paired(a, b) -> tuple[float, float]:
    d = np.array(b, float) - np.array(a, float)
    return 100 * d.mean(), 100 * 1.96 * d.std(ddof=1) / math.sqrt(len(d))


def answers(model, tok, msgs, processor, temperature, seed):
    t = HFTeacher(model, tok, batch_size=32)
    t.logits_processor = processor
    return [o[0] for o in t.generate(msgs, SamplingParams(max_new_tokens=24, temperature=temperature, seed=seed))]


@torch.inference_mode()
def answer_nll(model, tok, msgs, recs) -> list[float]:
    """Per problem: the model's mean NLL of the reference answer after the chat prompt (the
    downstream loss antidistillation aims to raise; continuous, so less noisy than pass@1)."""
    out = []
    for m, r in zip(msgs, recs):
        p = encode_prompt(tok, render_chat(tok, m))
        a = tok(str(r["answer"]), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + a])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        out.append(float(torch.nn.functional.cross_entropy(logits, ids[0, len(p):])))
    return out


def split(task: str, n_eval: int, n_train: int) -> tuple[list[dict], list[dict]]:
    """(eval problems, train problems) of the task; see the module docstring."""
    from stillhouse.data.dedup import exact_dedup
    from stillhouse.verify.reasoning_gym import problems

    cfg = TASKS[task]
    if task == "chain_sum":  # its own split seeds, as the runs in docs/watermark.md used
        return problems(task, cfg, n_eval, EVAL_SEED), problems(task, cfg, n_train, TRAIN_SEED)
    # 9,600 draws: the 2,146 distinct questions bench/watermark_cost.py measures the watermarks on
    distinct = exact_dedup(problems(task, cfg, max(9600, 4 * (n_eval + n_train)), EVAL_SEED), "question")[0]
    if len(distinct) < n_eval + n_train:
        raise SystemExit(f"--eval + --train: {task} has only {len(distinct)} distinct questions at this config")
    return distinct[:n_eval], distinct[n_eval : n_eval + n_train]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="gcd", help="the quickstart's task (gcd) or chain_sum")
    ap.add_argument("--lams", default="0,1,3")
    ap.add_argument("--train", type=int, default=400, help="train problems the teacher answers (traces)")
    ap.add_argument("--eval", type=int, default=400, help="eval problems for both pass@1s")
    ap.add_argument("--seeds", type=int, default=1, help="student training seeds per arm (0 .. N-1)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--proxy-layers", type=int, default=4)
    ap.add_argument("--student-layers", type=int, default=14)
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "antidistill.json")
    args = ap.parse_args()

    from stillhouse import models
    from stillhouse.eval.measure import messages_for
    from stillhouse.train.loop import Example, TrainConfig, train
    from stillhouse.train.students import choose_layers, cosine_importance, prune_depth
    from stillhouse.verify.reasoning_gym import ReasoningGymVerifier

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    lm = models.load("smollm2-135m-instruct")
    tok = lm.tokenizer
    verify = ReasoningGymVerifier(args.task, TASKS[args.task])
    ev, tr = split(args.task, args.eval, args.train)
    ev_msgs, tr_msgs = [messages_for(r) for r in ev], [messages_for(r) for r in tr]
    # the downstream loss the proxy sees: problems of yet another seed (neither split's generator)
    base_cfg = ad.AntidistillConfig(proxy="smollm2-135m-instruct", proxy_layers=args.proxy_layers, eps=args.eps,
                                    downstream=ad.Downstream(task=args.task, config=TASKS[args.task], problems=64, seed=7))
    t0 = time.perf_counter()
    proc = ad.build(base_cfg, tok, proxy=lm.model)
    setup_s = time.perf_counter() - t0
    # the same initial student for every arm: depth-pruned by block importance on plain answers
    texts = [render_chat(tok, m) + r["answer"] for m, r in zip(tr_msgs[:32], tr[:32])]
    kept = choose_layers(cosine_importance(lm.model, tok, texts), args.student_layers)
    student0 = prune_depth(lm.model, kept)
    seeds = list(range(args.seeds))
    out = {"task": args.task, "temperature": args.temperature, "eval": len(ev), "train": len(tr), "seeds": seeds,
           "proxy_layers": args.proxy_layers, "student_layers": kept, "epochs": args.epochs, "eps": args.eps,
           "proxy_setup_s": setup_s, "load_avg_start": os.getloadavg()[0], "arms": {}}
    teacher_pass, teacher_all, student_pass, student_nll = {}, {}, {}, {}
    for lam in [float(x) for x in args.lams.split(",")]:
        proc.lam = lam
        t0 = time.perf_counter()
        comps = answers(lm.model, tok, ev_msgs, proc if lam else None, args.temperature, seed=11)
        teacher_pass[lam] = [bool(verify(r, c.text).passed) for r, c in zip(ev, comps)]
        t_teacher = time.perf_counter() - t0
        t0 = time.perf_counter()
        traces = answers(lm.model, tok, tr_msgs, proc if lam else None, args.temperature, seed=12)
        tr_pass = [bool(verify(r, c.text).passed) for r, c in zip(tr, traces)]
        teacher_all[lam] = teacher_pass[lam] + tr_pass
        kept_rows = [(m, c) for m, c, ok in zip(tr_msgs, traces, tr_pass) if ok]
        t_traces = time.perf_counter() - t0
        t0 = time.perf_counter()
        ex = []
        for m, c in kept_rows:
            p = encode_prompt(tok, render_chat(tok, m))
            ex.append(Example(p + c.token_ids + [tok.eos_token_id], len(p)))
        per_seed_pass, per_seed_nll = [], []
        for s in seeds:
            student = copy.deepcopy(student0).train()
            train(student, ex, TrainConfig(epochs=args.epochs, lr=3e-4, batch_size=16, sft_weight=1.0, kd_weight=0.0,
                                           warmup_ratio=0.0, seed=s), tok.pad_token_id)
            student.eval()
            s_comps = answers(student, tok, ev_msgs, None, 0.0, seed=0)
            per_seed_pass.append([bool(verify(r, c.text).passed) for r, c in zip(ev, s_comps)])
            per_seed_nll.append(answer_nll(student, tok, ev_msgs, ev))
            del student
        # per problem, averaged over the training seeds: the pairing unit for the interval
        student_pass[lam] = list(np.mean(per_seed_pass, axis=0))
        student_nll[lam] = list(np.mean(per_seed_nll, axis=0))
        arm = {"teacher_pass1": 100 * float(np.mean(teacher_pass[lam])),
               "teacher_pass1_all": 100 * float(np.mean(teacher_all[lam])), "teacher_problems_all": len(teacher_all[lam]),
               "traces_kept": len(kept_rows), "student_pass1": 100 * float(np.mean(student_pass[lam])),
               "student_pass1_per_seed": [100 * float(np.mean(x)) for x in per_seed_pass],
               "student_nll": float(np.mean(student_nll[lam])),
               "student_nll_per_seed": [float(np.mean(x)) for x in per_seed_nll],
               "seconds_teacher": t_teacher, "seconds_traces": t_traces, "seconds_student": time.perf_counter() - t0}
        if 0.0 in teacher_pass and lam != 0.0:
            arm["teacher_diff"], arm["teacher_ci95"] = paired(teacher_pass[0.0], teacher_pass[lam])
            arm["teacher_diff_all"], arm["teacher_ci95_all"] = paired(teacher_all[0.0], teacher_all[lam])
            arm["student_diff"], arm["student_ci95"] = paired(student_pass[0.0], student_pass[lam])
            d, h = paired(student_nll[0.0], student_nll[lam])
            arm["student_nll_diff"], arm["student_nll_ci95"] = d / 100, h / 100
        out["arms"][str(lam)] = arm
        print(f"lam {lam:g}: teacher pass@1 {arm['teacher_pass1']:.1f} (all {arm['teacher_pass1_all']:.1f})  "
              f"traces kept {len(kept_rows)}  student pass@1 {arm['student_pass1']:.1f} "
              f"(seeds {', '.join(f'{x:.1f}' for x in arm['student_pass1_per_seed'])})  student answer NLL "
              f"{arm['student_nll']:.3f}  [{t_teacher:.0f}+{t_traces:.0f}+{arm['seconds_student']:.0f} s]", flush=True)
        args.out.write_text(json.dumps(out, indent=1))
    out["load_avg_end"] = os.getloadavg()[0]
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\n{args.task}: {len(ev)} eval problems, {len(tr)} train problems, T = {args.temperature}, proxy: first "
          f"{args.proxy_layers} blocks, {len(seeds)} student seed(s) per arm; load average {out['load_avg_start']:.1f} -> {out['load_avg_end']:.1f}")
    print("| lam | teacher pass@1 (eval) | vs lam 0 [95%] | teacher pass@1 (all answered) | vs lam 0 [95%] | traces kept | "
          "student pass@1 (per seed) | vs lam 0 [95%] | student answer NLL | vs lam 0 [95%] |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for lam, a in out["arms"].items():
        f = lambda k: f"{a[k + '_diff']:+.1f} ± {a[k + '_ci95']:.1f}" if k + "_diff" in a else ""  # noqa: E731
        t_all = f"{a['teacher_diff_all']:+.1f} ± {a['teacher_ci95_all']:.1f}" if "teacher_diff_all" in a else ""
        n = f"{a['student_nll_diff']:+.3f} ± {a['student_nll_ci95']:.3f}" if "student_nll_diff" in a else ""
        seeds_s = ", ".join(f"{x:.1f}" for x in a["student_pass1_per_seed"])
        print(f"| {lam} | {a['teacher_pass1']:.1f} | {f('teacher')} | {a['teacher_pass1_all']:.1f} | {t_all} | {a['traces_kept']} | "
              f"{a['student_pass1']:.1f} ({seeds_s}) | {f('student')} | {a['student_nll']:.3f} | {n} |")


if __name__ == "__main__":
    main()
