"""Watermark cost, calibration, radioactivity and provenance: every table of docs/provenance.md.

    OMP_NUM_THREADS=2 nice -n 10 python bench/provenance.py --small   # what runs on the shared 2-core box
    python bench/provenance.py                                         # the full settings (hours)

Sections (each prints a Markdown table; all of them go to --out as JSON, plus the picture):
1. Watermark cost on the packaged SmolLM2-135M-Instruct: greedy pass@1 on quickstart's
   held-out chain_sum problems with and without the watermark (paired difference and its 95%
   interval), perplexity of held-out text under the watermarked and plain distributions, and
   detection of sampled ~200-token answers.
2. Calibration: p-values of unwatermarked text / control models under many random keys
   (Kolmogorov-Smirnov against uniform, false-positive rate at alpha = 0.01).
3. Radioactivity end to end at tiny scale: students trained with stillhouse's training loop on
   a tiny teacher's outputs, a share (the dose) of them watermarked; controls on plain outputs,
   on another teacher's outputs, and the untrained base; open-weights (top-1 pairs and the
   green probability mass of the whole distribution) and API-only p-values.
3b. Radioactivity on real models (`realradio`): SmolLM2-135M-Instruct watermarks its answers;
   quickstart-style students (the teacher pruned to 14 of 30 blocks) train on them at several
   doses, on its plain answers, and on the watermarked answers paraphrased by the teacher
   without the watermark (the known attack); both modes, with and without the context filter,
   under the true key and many random keys (TPR at FPR 0).
4. Provenance without a watermark: pairs derived / not derived from a parent, tuning pairs
   (choose the statistic, alpha and the window) kept apart from reported pairs; confusion table
   and precision/recall for each statistic (guard.provenance.STATISTICS).
5. Provenance at real scale (`real`): models derived from SmolLM2-135M-Instruct and Gemma-3-270m
   (REAL_SUSPECTS), each tested against each parent, references from the other lineage, at the
   settings in REAL_PROV_SETTINGS (the likelihood statistics score with the weights kept in
   --cache: every model scores every other model's answers, which serves both directions). The
   headline setting is chosen on the "seen" pairs and reported on the "fresh" ones (REAL_FRESH).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny character-level llama the unit tests use

os.environ.setdefault("STILLHOUSE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stillhouse.guard import provenance as pv  # noqa: E402
from stillhouse.guard import radioactivity as ra  # noqa: E402
from stillhouse.guard import watermark as wm  # noqa: E402
from stillhouse.teachers.base import SamplingParams  # noqa: E402
from stillhouse.teachers.hf import HFTeacher, encode_prompt, render_chat  # noqa: E402

KEY = "5eed" * 16  # the provider's key in these experiments (not secret: a benchmark)


def smol_student_blocks(n: int) -> list[int]:
    """The blocks quickstart's student keeps of SmolLM2's n: the first 12 and the last 2 (14 of 30)."""
    return list(range(12)) + [n - 2, n - 1]


# real provenance section: prompts and sampled tokens per training answer, probe prompts, SFT epochs
# and learning rates (pruned students, LoRA, full fine-tuning)
REAL_PROV = dict(train=128, tokens=64, probes=100, epochs=3, lr=3e-4, lora_lr=1e-3, ft_lr=5e-5)
SETTINGS = {
    # problems: chain_sum problems for pass@1; ppl_texts: held-out paragraphs; long: 200-token answers;
    # keys: random keys for calibration; tiny_prompts/seeds/doses: radioactivity; prov_seeds: provenance pairs
    "small": dict(problems=300, ppl_texts=30, long=10, keys=200, tiny_prompts=192, tiny_probes=256, seeds=2,
                  doses=[0.05, 0.1, 0.25, 1.0], prov_tune=[1], prov_report=[2], real_prov=REAL_PROV,
                  real_radio=dict(train=64, probes=24, probe_texts=60, tokens=40, doses=[0.25, 1.0], seeds=1, epochs=3,
                                  lr=3e-4, keys=200, paraphrase=True, other_teacher=False)),
    # `small` with a real-model radioactivity section large enough to detect something: 256
    # training answers of 96 tokens (4x the answers, 10x the watermarked tokens of `small`)
    "medium": dict(problems=300, ppl_texts=30, long=10, keys=200, tiny_prompts=192, tiny_probes=256, seeds=2,
                   doses=[0.05, 0.1, 0.25, 1.0], prov_tune=[1], prov_report=[2], real_prov=REAL_PROV,
                   real_radio=dict(train=256, probes=64, probe_texts=200, probe_answers=True, tokens=96, doses=[0.05, 0.1, 0.25, 0.5, 0.75, 1.0],
                                   seeds=1, epochs=3, lr=3e-4, keys=200, paraphrase=True, paraphraser="gemma3-270m",
                                   other_teacher=True)),
    # a seconds-long run of every code path (not a measurement)
    "smoke": dict(problems=10, ppl_texts=2, long=2, keys=100, tiny_prompts=48, seeds=1, doses=[1.0],
                  prov_tune=[1], prov_report=[2], real_prov=dict(REAL_PROV, train=8, tokens=8, probes=4, epochs=1),
                  real_radio=dict(train=16, probes=8, probe_texts=8, tokens=16, doses=[1.0], seeds=1, epochs=1, lr=3e-4, keys=100,
                                  paraphrase=True, other_teacher=False)),
    "full": dict(problems=2000, ppl_texts=200, long=50, keys=1000, tiny_prompts=1024, tiny_probes=512, seeds=5,
                 doses=[0.05, 0.1, 0.25, 0.5, 1.0], prov_tune=[1, 2], prov_report=[3, 4, 5, 6, 7, 8], real_prov=REAL_PROV,
                 real_radio=dict(train=256, probes=64, probe_texts=200, tokens=96, doses=[0.05, 0.1, 0.25, 1.0], seeds=3, epochs=3, lr=3e-4,
                                 keys=1000, paraphrase=True, other_teacher=True)),
}


def msgs(p: str) -> list[dict]:
    return [{"role": "user", "content": p}]


def generate(model, tok, prompts, processor=None, **params):
    t = HFTeacher(model, tok)
    t.logits_processor = processor
    return [o[0] for o in t.generate([msgs(p) if isinstance(p, str) else p for p in prompts], SamplingParams(**params))]


# -- 1. watermark cost ---------------------------------------------------------------------
def paired_difference(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """Mean of b - a (points) and the 95% half-width of the paired difference."""
    d = np.array(b, float) - np.array(a, float)
    return 100 * d.mean(), 100 * 1.96 * d.std(ddof=1) / math.sqrt(len(d))


@torch.inference_mode()
def text_nll(model, tok, texts, processor=None) -> tuple[float, int]:
    """Summed NLL (nats) of texts under the model's distribution, or under the watermarked one."""
    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([encode_prompt(tok, t)[:512]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        if processor is not None:
            logits = processor(ids[0, :-1, None], logits)  # each position's own previous token
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total, count


def held_out_text(n: int) -> list[str]:
    """Paragraphs of this repository's docs: English text the model never answered here."""
    paras = []
    for f in sorted((ROOT / "docs").glob("*.md")):
        paras += [p.strip() for p in f.read_text().split("\n\n") if len(p.strip()) > 200 and not p.startswith(("|", "```", "!["))]
    return paras[:n]


def watermark_cost(cfg: dict, out: dict) -> None:
    from stillhouse import models
    from stillhouse.eval.measure import messages_for
    from stillhouse.verify.reasoning_gym import ReasoningGymVerifier, problems

    lm = models.load("smollm2-135m-instruct")
    task_cfg = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}  # recipes/chain_sum.yaml (the quickstart before it moved to gcd)
    recs = problems("chain_sum", task_cfg, cfg["problems"], 1_000_000)
    verify = ReasoningGymVerifier("chain_sum", task_cfg)
    proc = wm.WatermarkProcessor(KEY, delta=cfg.get("delta", wm.DELTA), confident=cfg.get("confident", 1.0))
    res = {}
    for arm, p in [("plain", None), ("watermarked", proc)]:
        t0 = time.perf_counter()
        comps = generate(lm.model, lm.tokenizer, [messages_for(r) for r in recs], p, max_new_tokens=24)
        res[arm] = [bool(verify(r, c.text).passed) for r, c in zip(recs, comps)]
        print(f"  pass@1 {arm}: {100 * np.mean(res[arm]):.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    diff, half = paired_difference(res["plain"], res["watermarked"])
    texts = held_out_text(cfg["ppl_texts"])
    ppl = {}
    for arm, p in [("plain", None), ("watermarked", proc)]:
        nll, n = text_nll(lm.model, lm.tokenizer, texts, p)
        ppl[arm] = math.exp(nll / n)
    # Detection of long sampled answers (sampling: a greedy answer has too little entropy to mark)
    long_prompts = [f"Write a long, detailed story about {s}." for s in pv._SUBJECTS][: cfg["long"]]
    marked = generate(lm.model, lm.tokenizer, long_prompts, proc, max_new_tokens=200, temperature=0.7, seed=1)
    plain = generate(lm.model, lm.tokenizer, long_prompts, None, max_new_tokens=200, temperature=0.7, seed=1)
    det = [wm.score_ids(KEY, [c.token_ids]) for c in marked]
    null = [wm.score_ids(KEY, [c.token_ids]) for c in plain]
    out["cost"] = {
        "problems": len(recs), "pass1_plain": 100 * np.mean(res["plain"]), "pass1_watermarked": 100 * np.mean(res["watermarked"]),
        "pass1_diff": diff, "pass1_diff_ci95": half, "ppl_plain": ppl["plain"], "ppl_watermarked": ppl["watermarked"],
        "ppl_tokens": n, "long_tokens": [d.tokens for d in det], "long_p": [d.p_value for d in det],
        "long_null_p": [d.p_value for d in null],
        "long_detected_1e-6": float(np.mean([d.p_value < 1e-6 for d in det])),
        "long_200_detected_1e-6": float(np.mean([d.p_value < 1e-6 for d in det if d.tokens >= 199] or [float("nan")])),
        "long_200_count": sum(d.tokens >= 199 for d in det),
    }
    out["_plain_long"] = [c.token_ids for c in plain]
    c = out["cost"]
    print(f"\n| | plain | watermarked (gamma 0.25, delta {proc.delta:g}, confident {proc.confident:g}) | difference |\n|---|---|---|---|")
    print(f"| pass@1, chain_sum, {c['problems']} problems (%) | {c['pass1_plain']:.1f} | {c['pass1_watermarked']:.1f} | "
          f"{c['pass1_diff']:+.1f} ± {c['pass1_diff_ci95']:.1f} |")
    print(f"| perplexity, {c['ppl_tokens']} held-out tokens | {c['ppl_plain']:.2f} | {c['ppl_watermarked']:.2f} | "
          f"{100 * (c['ppl_watermarked'] / c['ppl_plain'] - 1):+.1f}% |")
    print(f"| sampled answers (T 0.7, <= 200 tokens) at p < 1e-6 | {np.mean([p < 1e-6 for p in c['long_null_p']]):.0%} | "
          f"{c['long_detected_1e-6']:.0%} (200-token ones: {c['long_200_detected_1e-6']:.0%} of {c['long_200_count']}) | |")
    print(f"  median p of watermarked answers {np.median(c['long_p']):.2g}, median tokens {np.median(c['long_tokens']):.0f}")


# -- 2. calibration --------------------------------------------------------------------------
def random_keys(n: int, seed: int = 12345) -> list[str]:
    rng = random.Random(seed)
    return ["%064x" % rng.getrandbits(256) for _ in range(n)]


def calibration_row(name: str, pvals: list[float]) -> dict:
    from scipy.stats import kstest

    ps = np.array(pvals)
    row = {"null": name, "n": len(ps), "ks_p": float(kstest(ps, "uniform").pvalue), "fpr_0.01": float((ps < 0.01).mean())}
    print(f"| {name} | {row['n']} | {row['ks_p']:.2f} | {100 * row['fpr_0.01']:.1f}% |", flush=True)
    return row


# -- 3. radioactivity at tiny scale ------------------------------------------------------------
def tiny_student(tok, seed: int):
    """A fresh small llama in its default initialisation (it learns bigram habits quickly)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None))


def sft(model, tok, prompts, comps, seed: int, epochs: float = 6, lr: float = 3e-3, lora: bool = False):
    """SFT on the answers with stillhouse's training loop; returns the trained model in eval mode."""
    from stillhouse.train.loop import Example, TrainConfig, train

    ex = []
    for p, c in zip(prompts, comps):
        pi = encode_prompt(tok, render_chat(tok, msgs(p)))
        ex.append(Example(pi + c.token_ids + [tok.eos_token_id], len(pi)))
    if lora:
        from stillhouse.train.lora import add_lora, finish_lora

        model = add_lora(model, r=8, alpha=16, seed=seed)
    model.train()
    train(model, ex, TrainConfig(epochs=epochs, lr=lr, batch_size=16, sft_weight=1.0, kd_weight=0.0, warmup_ratio=0.0, seed=seed),
          tok.pad_token_id)
    if lora:
        model = finish_lora(model, merge=True)
    return model.eval()


def radioactivity(cfg: dict, out: dict) -> dict:
    from conftest import build_tiny_model, build_tokenizer
    from stillhouse.models import prepare_tokenizer

    tok = build_tokenizer()
    prepare_tokenizer(tok)
    teacher, other = build_tiny_model(tok, seed=0), build_tiny_model(tok, seed=1)
    prompts = [f"Question {i}: what about {i * 7 % 13}?" for i in range(cfg["tiny_prompts"])]
    proc = wm.WatermarkProcessor(KEY, delta=3.0)
    marked = generate(teacher, tok, prompts, proc, max_new_tokens=64, temperature=1.0, seed=0)
    plain = generate(teacher, tok, prompts, None, max_new_tokens=64, temperature=1.0, seed=1)
    foreign = generate(other, tok, prompts, None, max_new_tokens=64, temperature=1.0, seed=1)
    contexts = ra.watermark_contexts([c.token_ids for c in marked])
    # probe texts: the teacher's plain answers to unseen prompts (never watermarked); teacher
    # forcing is one forward pass each, so many of them are cheap
    probes = [f"Tell me {i}" for i in range(cfg.get("tiny_probes", 32))]
    probe_ids = [encode_prompt(tok, render_chat(tok, msgs(p))) + c.token_ids
                 for p, c in zip(probes, generate(teacher, tok, probes, None, max_new_tokens=64, temperature=1.0, seed=2))]
    api_probes = probes[:32]
    arms = [(f"watermarked {round(100 * d)}%", d) for d in cfg["doses"]] + [("plain outputs", 0.0), ("other teacher", None), ("base (untrained)", "base")]
    rows, models_ = [], {}
    for name, dose in arms:
        for s in range(cfg["seeds"]):
            t0 = time.perf_counter()
            student = tiny_student(tok, 100 + s)
            if dose == "base":
                student.eval()
            else:
                if dose is None:
                    comps = foreign
                else:  # the first `dose` share of a seeded shuffle is watermarked
                    order = random.Random(s).sample(range(len(prompts)), len(prompts))
                    wmset = set(order[: round(dose * len(prompts))])
                    comps = [marked[i] if i in wmset else plain[i] for i in range(len(prompts))]
                student = sft(student, tok, prompts, comps, seed=s)
            gens = [c.token_ids for c in generate(student, tok, api_probes, None, max_new_tokens=64, temperature=1.0, seed=3)]
            prev, pred = ra.predicted_pairs(student, probe_ids, tok.pad_token_id)
            dists = ra.context_distributions(student, probe_ids, tok.pad_token_id, contexts=contexts)
            o = ra.score_unique(wm.key_seed(KEY), *wm.distinct_pairs(prev, pred, contexts))
            d = ra.score_distribution(wm.key_seed(KEY), dists)
            a = ra.score_generations(KEY, gens)
            rows.append({"arm": name, "dose": dose if isinstance(dose, float) else None, "seed": s,
                         "open_p": o.p_value, "open_z": o.z, "open_pairs": o.scored, "dist_p": d.p_value, "dist_z": d.z,
                         "api_p": a.p_value, "api_z": a.z, "seconds": time.perf_counter() - t0})
            models_[(name, s)] = (prev, pred, dists, gens)
            print(f"  {name} seed {s}: open top-1 p {o.p_value:.2g} ({o.scored} pairs), open distribution p {d.p_value:.2g}, "
                  f"api p {a.p_value:.2g}", flush=True)
    out["radioactivity"] = rows
    # Calibration of every mode on the control students, over many random keys: each control gets
    # keys of its own (ra.null_pvalues: p-values pooled over students under shared keys are not independent)
    controls = [k for k in models_ if not k[0].startswith("watermarked")]
    n_keys = max(100, cfg["keys"] // len(controls))
    keys = [wm.key_seed(k) for k in random_keys(n_keys * len(controls), seed=7)]
    null = {"open": ra.null_pvalues([wm.distinct_pairs(*models_[k][:2], contexts) for k in controls], n_keys, seed=7),
            "api": ra.null_pvalues([wm.unique_pairs(models_[k][3]) for k in controls], n_keys, seed=8),
            "dist": [ra.score_distribution(keys[i * n_keys + j], models_[k][2]).p_value
                     for i, k in enumerate(controls) for j in range(n_keys)]}
    out["_null_radio"] = null
    # TPR at FPR 0: a watermarked student counts if its p is below every null p
    # (control students under the real key and under the random keys)
    tpr = {}
    for mode in null:
        null_min = min(null[mode] + [r[f"{mode}_p"] for r in rows if not r["arm"].startswith("watermarked")])
        for d in cfg["doses"]:
            hits = [r[f"{mode}_p"] < null_min for r in rows if r["dose"] == d and r["arm"].startswith("watermarked")]
            tpr[f"{mode} {round(100 * d)}%"] = f"{sum(hits)}/{len(hits)}"
        tpr[f"{mode} null min p"] = null_min
    out["radioactivity_tpr_at_fpr0"] = tpr
    print("\n| arm | seeds | open top-1 p (median, max) | open distribution p (median, max) | API-only p (median, max) |\n|---|---|---|---|---|")
    for name, _ in arms:
        r = [x for x in rows if x["arm"] == name]
        print(f"| {name} | {len(r)} | {np.median([x['open_p'] for x in r]):.2g}, {max(x['open_p'] for x in r):.2g} | "
              f"{np.median([x['dist_p'] for x in r]):.2g}, {max(x['dist_p'] for x in r):.2g} | "
              f"{np.median([x['api_p'] for x in r]):.2g}, {max(x['api_p'] for x in r):.2g} |")
    print(f"\nscored distinct (context, top-1) pairs per student: median {np.median([x['open_pairs'] for x in rows]):.0f} "
          f"(a {len(tok)}-token vocabulary caps them)")
    print("TPR at FPR 0 (threshold: the smallest p of any control under any key):", json.dumps(tpr))
    return {"tok": tok, "teacher": teacher, "other": other, "prompts": prompts, "plain": plain, "foreign": foreign}


# -- 3b. radioactivity on real models ------------------------------------------------------
_TOPICS = ["the moon", "a river", "bread", "winter", "a library", "electricity", "the ocean", "a violin", "mountains",
           "a city at night", "bees", "glass", "an old map", "rain", "a clock", "coffee", "the desert", "a lighthouse",
           "snow", "a garden", "trains", "a volcano", "chess", "the internet", "a forest", "friendship", "a bicycle",
           "thunderstorms", "honey", "a museum", "the stars", "a market", "paper", "a bridge", "whales", "tea",
           "a castle", "autumn", "music", "a small village"]
_ASKS = ["Write a short paragraph about {}.", "Explain {} to a child.", "Describe {} in three sentences.",
         "Tell a very short story about {}.", "What are some interesting facts about {}?",
         "Write a short poem about {}.", "Give advice to someone visiting {}.", "Why do people like {}?"]


def real_prompts() -> list[str]:
    """320 open prompts in a fixed shuffled order (train prompts first, probe prompts last)."""
    ps = [a.format(t) for t in _TOPICS for a in _ASKS]
    return [ps[i] for i in np.random.default_rng(3).permutation(len(ps))]


class Ids:
    """A completion given as token ids (what `sft` reads)."""

    def __init__(self, token_ids, text: str = ""):
        self.token_ids, self.text = list(token_ids), text


def paraphrase(model, tok, texts: list[str], max_new_tokens: int) -> list[str]:
    """The attack: a model without the watermark rewrites each answer before the suspect trains on it."""
    asks = [f"Rewrite the following text in your own words. Keep its meaning.\n\n{t}" for t in texts]
    return [c.text for c in generate(model, tok, asks, None, max_new_tokens=max_new_tokens, temperature=0.7, seed=21)]


class Cache:
    """JSON results under a directory, written atomically, so a long real-model run resumes where
    it stopped and its arms can run in separate processes (`--arms`) and be summarised together."""

    def __init__(self, root: Path | None):
        self.root = root
        if root:
            root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, make):
        path = self.root / f"{name}.json" if self.root else None
        if path and path.exists():
            return json.loads(path.read_text())
        value = make()
        if path:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(value))
            tmp.replace(path)
        return value

    def has(self, name: str) -> bool:
        return bool(self.root) and (self.root / f"{name}.json").exists()

    def model_dir(self, name: str) -> Path | None:
        return self.root / "models" / name if self.root else None

    def save_model(self, name: str, model, tok) -> None:
        """A trained model's weights (safetensors) and tokenizer, written to a temporary directory first."""
        import shutil

        if not self.root:
            return
        final = self.model_dir(name)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)


def real_arms(rc: dict) -> list[tuple[str, str, object]]:
    """(arm id for --arms, arm name, dose) in run order: the strongest arm first, so a cut-off run
    has already said whether anything is detected."""
    arms: list[tuple[str, str, object]] = [("wm100", "watermarked 100%", 1.0)]
    if rc.get("paraphrase"):
        arms.append(("para", "watermarked 100%, paraphrased", "para"))
    arms += [("plain", "plain outputs", 0.0)]
    arms += [(f"wm{round(100 * d)}", f"watermarked {round(100 * d)}%", d) for d in sorted(rc["doses"], reverse=True) if d != 1.0]
    arms += [("base", "base (pruned, untrained)", "base"), ("teacher", "teacher itself", "teacher")]
    if rc.get("other_teacher"):
        arms.append(("other", "other teacher (Gemma-3-270m)", "other"))
    return arms


def real_radioactivity(cfg: dict, out: dict) -> None:
    """SmolLM2-135M-Instruct watermarks its answers; quickstart-style students (the teacher pruned
    to 14 of 30 blocks) are trained with stillhouse's loop on them at several doses; controls on
    its plain answers, on Gemma-3-270m's answers, and untrained. Both modes, many random keys."""
    from stillhouse import models
    from stillhouse.train.students import prune_depth

    rc = cfg["real_radio"]
    cache = Cache(cfg.get("cache"))
    only = cfg.get("arms")  # run only these arm ids (others are read from the cache if there)
    t_start = time.perf_counter()
    smol = models.load("smollm2-135m-instruct")
    tok = smol.tokenizer
    prompts = real_prompts()
    train_p, probe_p = prompts[: rc["train"]], prompts[-rc["probes"]:]
    proc = wm.WatermarkProcessor(KEY)  # the scheme's defaults: gamma 0.25, delta 2
    gen = dict(max_new_tokens=rc["tokens"], temperature=0.8)
    as_json = lambda cs: [{"text": c.text, "token_ids": list(c.token_ids)} for c in cs]  # noqa: E731
    t0 = time.perf_counter()
    marked = [Ids(c["token_ids"], c["text"]) for c in cache.get("marked", lambda: as_json(generate(smol.model, tok, train_p, proc, seed=0, **gen)))]
    plain = [Ids(c["token_ids"], c["text"]) for c in cache.get("plain", lambda: as_json(generate(smol.model, tok, train_p, None, seed=1, **gen)))]
    print(f"  teacher answers: {time.perf_counter() - t0:.0f} s; watermarked training answers detected at "
          f"p = {wm.score_ids(KEY, [c.token_ids for c in marked]).p_value:.2g}", flush=True)
    contexts = ra.watermark_contexts([c.token_ids for c in marked])
    # open-weights probes: held-out English text no model here generated (this repository's docs),
    # so nothing in them carries the watermark; teacher forcing costs one forward pass each.
    # probe_answers adds the teacher's plain answers to the probe prompts: unwatermarked text of
    # the kind the students trained on
    probe_ids = [encode_prompt(tok, t)[:256] for t in held_out_text(rc["probe_texts"])]
    if rc.get("probe_answers"):
        ans = cache.get("probe_answers", lambda: as_json(generate(smol.model, tok, probe_p, None, seed=5, **gen)))
        probe_ids += [encode_prompt(tok, render_chat(tok, msgs(q))) + c["token_ids"] for q, c in zip(probe_p, ans)]
    arms = real_arms(rc)
    n = smol.model.config.num_hidden_layers
    kept = smol_student_blocks(n)
    rows, preds = [], {}
    n_keys = rc["keys"]  # random keys per student for the nulls
    seed_key = wm.key_seed(KEY)

    def training_data(dose):
        if dose == "para":  # the attack: another model rewrites the watermarked answers without a watermark
            def make():
                t0 = time.perf_counter()
                pm = models.load(rc.get("paraphraser", "smollm2-135m-instruct"))
                para = paraphrase(pm.model, pm.tokenizer, [c.text for c in marked], rc["tokens"] + 16)
                ids = [tok(t, add_special_tokens=False)["input_ids"] for t in para]
                info = {"paraphraser": rc.get("paraphraser", "smollm2-135m-instruct"),
                        "text_p": wm.score_ids(KEY, ids).p_value, "marked_text_p": wm.score_ids(KEY, [c.token_ids for c in marked]).p_value,
                        "seconds": time.perf_counter() - t0, "example_in": marked[0].text[:300], "example_out": para[0][:300]}
                return {"info": info, "texts": para, "token_ids": ids}
            d = cache.get("paraphrased", make)
            out["real_paraphrase_data"] = d["info"]
            print("PARAPHRASE", json.dumps(d["info"]), flush=True)
            return [Ids(i) for i in d["token_ids"]]
        if dose == "other":
            def make():
                gemma = models.load("gemma3-270m")
                return [tok(c.text, add_special_tokens=False)["input_ids"]
                        for c in generate(gemma.model, gemma.tokenizer, train_p, None, seed=1, **gen)]
            return [Ids(i) for i in cache.get("other_teacher", make)]
        return None

    def run_student(arm_id, name, dose, s):
        t0 = time.perf_counter()
        if dose == "teacher":
            student = smol.model
        else:
            torch.manual_seed(s)
            student = prune_depth(smol.model, kept)
            if dose != "base":
                comps = training_data(dose)
                if comps is None:
                    order = random.Random(s).sample(range(len(train_p)), len(train_p))
                    wmset = set(order[: round(dose * len(train_p))])
                    comps = [marked[i] if i in wmset else plain[i] for i in range(len(train_p))]
                student = sft(student, tok, train_p, comps, seed=s, epochs=rc["epochs"], lr=rc["lr"])
        student.eval()
        t_train = time.perf_counter() - t0
        prev, pred = ra.predicted_pairs(student, probe_ids, tok.pad_token_id)
        dists = ra.context_distributions(student, probe_ids, tok.pad_token_id, contexts=contexts)
        gens = [c.token_ids for c in generate(student, tok, probe_p, None, seed=3, **gen)]
        return {"train_seconds": t_train, "seconds": time.perf_counter() - t0, "prev": prev, "pred": pred, "gens": gens,
                "dists": {str(a): {str(v): q for v, q in row.items()} for a, row in dists.items()}}

    for arm_id, name, dose in arms:
        for s in (rc.get("seed_list") or range(rc["seeds"])) if dose not in ("base", "teacher") else [0]:
            tag = f"student-{arm_id}-{s}"
            if only and arm_id not in only and not cache.has(tag):
                continue
            res = cache.get(tag, lambda: run_student(arm_id, name, dose, s))
            if dose == "para":
                training_data(dose)  # its record goes to out
            prev, pred, gens = res["prev"], res["pred"], res["gens"]
            dists = {int(a): {int(v): q for v, q in row.items()} for a, row in res["dists"].items()}
            r = {"arm": name, "dose": dose if isinstance(dose, float) else None, "seed": s,
                 "train_seconds": res["train_seconds"], "seconds": res["seconds"]}
            for mode, pairs in [("open", lambda c: wm.distinct_pairs(prev, pred, c)), ("api", lambda c: wm.unique_pairs(gens, c))]:
                for filt, c in [("", None), ("_filtered", contexts)]:
                    sc = ra.score_unique(seed_key, *pairs(c))
                    r[f"{mode}{filt}_p"], r[f"{mode}{filt}_z"], r[f"{mode}{filt}_pairs"] = sc.p_value, sc.z, sc.scored
            d = ra.score_distribution(seed_key, dists)  # contexts are already filtered
            r["dist_filtered_p"], r["dist_filtered_z"], r["dist_filtered_contexts"] = d.p_value, d.z, len(dists)
            rows.append(r)
            preds[(name, s)] = (prev, pred, gens, dists)
            print(f"  {name} seed {s}: open p {r['open_p']:.2g} (filtered {r['open_filtered_p']:.2g}, {r['open_filtered_pairs']} pairs; "
                  f"distribution {r['dist_filtered_p']:.2g}), api p {r['api_p']:.2g} (filtered {r['api_filtered_p']:.2g}) "
                  f"[{r['seconds']:.0f} s]", flush=True)
            print("ROW", json.dumps(r), flush=True)
            out["real_radioactivity"] = rows
    if only:
        print(f"  --arms {','.join(sorted(only))}: done; run without --arms to summarise every cached arm", flush=True)
    # nulls: every student under random keys (none of them ever saw those keys), keys of its own
    # (ra.null_pvalues: students of one teacher share most pairs, so shared keys give near-equal p-values)
    null = {}
    for mode in ("open", "api"):
        for filt, c in [("", None), ("_filtered", contexts)]:
            sets = [wm.distinct_pairs(prev, pred, c) if mode == "open" else wm.unique_pairs(gens, c)
                    for prev, pred, gens, _ in preds.values()]
            null[mode + filt] = ra.null_pvalues(sets, n_keys, seed=99)
    keys = [wm.key_seed(k) for k in random_keys(n_keys * len(preds), seed=98)]
    null["dist_filtered"] = [ra.score_distribution(keys[i * n_keys + j], v[3]).p_value
                             for i, v in enumerate(preds.values()) for j in range(n_keys)]
    out["_null_real"] = null
    tpr = {}
    for m, ps in null.items():
        floor = min(ps + [r[f"{m}_p"] for r in rows if not r["arm"].startswith("watermarked")])
        for _, name, _ in arms:
            if name.startswith("watermarked"):
                hits = [r[f"{m}_p"] < floor for r in rows if r["arm"] == name]
                tpr[f"{m} | {name}"] = f"{sum(hits)}/{len(hits)}"
        tpr[f"{m} | null min p"] = floor
    out["real_radioactivity_tpr_at_fpr0"] = tpr
    out["times"]["real radioactivity"] = time.perf_counter() - t_start
    print("\n| arm | seeds | open p | open p, filtered (pairs) | open distribution p, filtered (contexts) | API p | API p, filtered |"
          "\n|---|---|---|---|---|---|---|")
    for _, name, _ in arms:
        rs = [x for x in rows if x["arm"] == name]
        if not rs:
            continue
        f = lambda k: ", ".join(f"{x[k]:.2g}" for x in rs)  # noqa: E731
        print(f"| {name} | {len(rs)} | {f('open_p')} | {f('open_filtered_p')} ({rs[0]['open_filtered_pairs']}) | "
              f"{f('dist_filtered_p')} ({rs[0]['dist_filtered_contexts']}) | {f('api_p')} | {f('api_filtered_p')} |")
    print(f"\nTPR at FPR 0 over {n_keys} random keys for each of {len(preds)} students (and the controls under the true key):")
    print(json.dumps(tpr, indent=1))


# -- 4. provenance -----------------------------------------------------------------------------
def confusion(verdicts: list[tuple[bool, bool]]) -> dict:
    """Counts, precision, recall and F1 of (called derived, truly derived) verdicts."""
    tp = sum(c and d for c, d in verdicts)
    fp = sum(c and not d for c, d in verdicts)
    fn = sum(d and not c for c, d in verdicts)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": len(verdicts) - tp - fp - fn, "precision": tp / max(1, tp + fp),
            "recall": tp / max(1, tp + fn), "f1": 2 * tp / max(1, 2 * tp + fp + fn)}


def provenance_pairs(cfg: dict, ctx: dict, out: dict) -> None:
    """Tiny families: parents A (the teacher) and B (another teacher); for each seed, models
    derived from each parent in several ways and models unrelated to it."""
    from conftest import build_tiny_model

    from stillhouse.train.students import prune_depth

    tok, prompts = ctx["tok"], ctx["prompts"][:128]
    parents = {"A": ctx["teacher"], "B": ctx["other"]}
    outs = {n: generate(m, tok, prompts, None, max_new_tokens=64, temperature=1.0, seed=11) for n, m in parents.items()}
    refs_pool = {f"R{i}": build_tiny_model(tok, seed=200 + i) for i in range(3)}  # unrelated to A and B
    ref_outs = {n: generate(m, tok, prompts, None, max_new_tokens=64, temperature=1.0, seed=11) for n, m in refs_pool.items()}
    # references of both kinds the suspects come in: untrained models of the parents' family and
    # students trained on the unrelated models' outputs
    refs = {**refs_pool, **{f"S{n}": sft(tiny_student(tok, 300 + i), tok, prompts, ref_outs[n], seed=i, epochs=3)
                            for i, n in enumerate(refs_pool)}}
    probes = pv.default_probes(40)

    def answers(m):
        return pv.answers(m, tok, probes, max_new_tokens=32)

    parent_ans = {n: answers(m) for n, m in parents.items()}
    ref_ans = {n: answers(m) for n, m in refs.items()}
    windows = (40, 80, 160)

    def scores(m, pname):  # the suspect's log-likelihoods of the parent's and every reference's answers, per window
        srcs = {"parent": parent_ans[pname], **ref_ans}
        return {c: {n: pv.loglik(m, tok, probes, a, c) for n, a in srcs.items()} for c in windows}

    def scored_by(ans, pname):  # the parent's and every reference's log-likelihoods of the suspect's answers
        return {c: {n: pv.loglik(x, tok, probes, ans, c) for n, x in [("parent", parents[pname]), *refs.items()]} for c in windows}

    def pair(split, seed, pname, label, derived, m):
        a = answers(m)
        return {"split": split, "seed": seed, "parent": pname, "suspect": label, "derived": derived, "answers": a,
                "parent_answers": parent_ans[pname], "logliks": scores(m, pname), "scored_by": scored_by(a, pname)}

    pairs = []
    for seed in cfg["prov_tune"] + cfg["prov_report"]:
        split = "tune" if seed in cfg["prov_tune"] else "report"
        for pname, parent in parents.items():
            other = "B" if pname == "A" else "A"
            derived = {
                "SFT student": lambda: sft(tiny_student(tok, seed), tok, prompts, outs[pname], seed),
                "pruned + SFT on its outputs": lambda: sft(prune_depth(parent, [0, 1, 2]), tok, prompts, outs[pname], seed, epochs=2, lr=1e-3),
                "LoRA on other data": lambda: sft(copy.deepcopy(parent), tok, prompts, outs[other], seed, epochs=2, lr=1e-3, lora=True),
                "fine-tuned on other data": lambda: sft(copy.deepcopy(parent), tok, prompts, outs[other], seed, epochs=1, lr=1e-3),
            }
            unrelated = {
                "student of the other teacher": lambda: sft(tiny_student(tok, seed), tok, prompts, outs[other], seed),
                "random init": lambda: build_tiny_model(tok, seed=500 + seed),
                "trained from scratch on a third model": lambda: sft(tiny_student(tok, seed), tok, prompts, ref_outs["R0"], seed + 1, epochs=3),
            }
            for label, (kind, make) in [(k, (True, v)) for k, v in derived.items()] + [(k, (False, v)) for k, v in unrelated.items()]:
                pairs.append(pair(split, seed, pname, label, kind, make()))
            # a student of a student (two-stage pipeline)
            s1 = sft(tiny_student(tok, seed), tok, prompts, outs[pname], seed)
            s1_out = generate(s1, tok, prompts, None, max_new_tokens=64, temperature=1.0, seed=12)
            s2 = sft(tiny_student(tok, seed + 50), tok, prompts, s1_out, seed)
            pairs.append(pair(split, seed, pname, "student of a student", True, s2))
            print(f"  provenance pairs: seed {seed} parent {pname} built", flush=True)

    def verdict(p, statistic, chars, alpha):
        return pv.decide(statistic, {"parent": p["parent_answers"], **ref_ans}, "parent", list(ref_ans), alpha, chars,
                         suspect_answers=p["answers"], logliks=p["logliks"][chars], scored_by=p["scored_by"][chars], probes=probes)

    # Tuning: per statistic, the window and alpha that maximise F1 on the tuning pairs only; the
    # statistic with the best tuning F1 is the chosen one (ties: the earlier in pv.STATISTICS)
    per_stat = {}
    for statistic in pv.STATISTICS:
        best = None
        for chars in windows:
            for alpha in (0.001, 0.01, 0.05):
                f1 = confusion([(verdict(p, statistic, chars, alpha).derived, p["derived"]) for p in pairs if p["split"] == "tune"])["f1"]
                if best is None or f1 > best[0]:
                    best = (f1, chars, alpha)
        f1, chars, alpha = best
        c = confusion([(verdict(p, statistic, chars, alpha).derived, p["derived"]) for p in pairs if p["split"] == "report"])
        per_stat[statistic] = {"chars": chars, "alpha": alpha, "tune_f1": f1, **c}
    statistic = max(pv.STATISTICS, key=lambda st: (per_stat[st]["tune_f1"], -pv.STATISTICS.index(st)))
    chars, alpha = per_stat[statistic]["chars"], per_stat[statistic]["alpha"]
    report = []
    for p in pairs:
        p["p_values"] = {st: verdict(p, st, per_stat[st]["chars"], per_stat[st]["alpha"]).p_value for st in pv.STATISTICS}
        p.update(p_value=p["p_values"][statistic], verdict=p["p_values"][statistic] < alpha)
        if p["split"] == "report":
            report.append(p)
    c = confusion([(p["verdict"], p["derived"]) for p in report])
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    out["provenance"] = {"chosen": {"statistic": statistic, "chars": chars, "alpha": alpha, "tune_f1": per_stat[statistic]["tune_f1"]},
                         "per_statistic": per_stat, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                         "precision": c["precision"], "recall": c["recall"],
                         "pairs": [{k: v for k, v in p.items() if "answers" not in k and k not in ("logliks", "scored_by")} for p in pairs]}
    r = out["provenance"]
    print("\n| statistic | chosen window, alpha | tuning F1 | reported: precision | recall |\n|---|---|---|---|---|")
    for st, x in per_stat.items():
        print(f"| {st} | {x['chars']}, {x['alpha']} | {x['tune_f1']:.2f} | {100 * x['precision']:.0f}% | {100 * x['recall']:.0f}% |")
    print(f"\nchosen on {sum(p['split'] == 'tune' for p in pairs)} tuning pairs: {statistic}, window {chars} chars, alpha {alpha}")
    print(f"\n| reported pairs ({len(report)}) | verdict derived | verdict not derived |\n|---|---|---|")
    print(f"| truly derived | {tp} | {fn} |\n| not derived | {fp} | {tn} |")
    print(f"precision {100 * r['precision']:.0f}%, recall {100 * r['recall']:.0f}%")
    print("\n| suspect kind | derived? | reported pairs | called derived | median p | " + " | ".join(f"median p, {st}" for st in pv.STATISTICS)
          + " |\n|---|---|---|---|---|" + "---|" * len(pv.STATISTICS))
    for kind in dict.fromkeys(p["suspect"] for p in report):
        ps = [p for p in report if p["suspect"] == kind]
        print(f"| {kind} | {'yes' if ps[0]['derived'] else 'no'} | {len(ps)} | {sum(p['verdict'] for p in ps)} | "
              f"{np.median([p['p_value'] for p in ps]):.2g} | " + " | ".join(f"{np.median([p['p_values'][st] for p in ps]):.2g}" for st in pv.STATISTICS) + " |")


# Two fluent lineages ship here: SmolLM2-135M-Instruct ("S") and Gemma-3-270m ("G"). Each model
# below is a suspect against each parent that is not itself; the truth is whether that parent is
# in its lineage (its weights or its training data came from it). recipe: (weights, how, data);
# data is a parent's sampled answers ("S", "G"), another suspect's ("s-sft-0": a student of a
# student) or reasoning-gym problems with their gold answers, text no model wrote (GOLD_SOURCES).
GOLD_SOURCES = {"gcd": ("gcd", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 50}, 77),
                "csum": ("chain_sum", {}, 78)}
REAL_SUSPECTS = {
    "smollm2": ("SmolLM2-135M-Instruct", {"S"}, None),
    "gemma3": ("Gemma-3-270m", {"G"}, None),
    "s-sft-0": ("SmolLM2 pruned to 14 blocks + SFT on its answers, seed 0", {"S"}, ("S", "prune", "S", 0)),
    "s-sft-1": ("SmolLM2 pruned to 14 blocks + SFT on its answers, seed 1", {"S"}, ("S", "prune", "S", 1)),
    "s-lora-gcd": ("SmolLM2 + LoRA on gcd gold answers", {"S"}, ("S", "lora", "gcd", 0)),
    "s-ft-gcd": ("SmolLM2 fully fine-tuned on gcd gold answers", {"S"}, ("S", "full", "gcd", 0)),
    "g-sft-0": ("Gemma pruned to 12 of 18 blocks + SFT on its answers", {"G"}, ("G", "prune", "G", 0)),
    "g-lora-gcd": ("Gemma + LoRA on gcd gold answers", {"G"}, ("G", "lora", "gcd", 0)),
    "g-lora-0": ("Gemma + LoRA on its own answers", {"G"}, ("G", "lora", "G", 0)),
    "s-sft-of-g": ("SmolLM2 pruned + SFT on Gemma's answers", {"S", "G"}, ("S", "prune", "G", 0)),
    "g-sft-of-s": ("Gemma pruned + SFT on SmolLM2's answers", {"G", "S"}, ("G", "prune", "S", 0)),
    "g-sft-of-s-student": ("Gemma pruned + SFT on the answers of s-sft-0 (student of a student)", {"G", "S"}, ("G", "prune", "s-sft-0", 0)),
    "s-sft-2": ("SmolLM2 pruned to 14 blocks + SFT on its answers, seed 2", {"S"}, ("S", "prune", "S", 2)),
    "s-lora-0": ("SmolLM2 + LoRA on its own answers", {"S"}, ("S", "lora", "S", 0)),
    "g-ft-gcd": ("Gemma fully fine-tuned on gcd gold answers", {"G"}, ("G", "full", "gcd", 0)),
    "s-sft-of-s-student": ("SmolLM2 pruned + SFT on the answers of s-sft-0 (student of a student)", {"S"}, ("S", "prune", "s-sft-0", 1)),
    # the second fresh batch (stop 29): recipes fixed and committed before any was built
    "s-sft-3": ("SmolLM2 pruned to 14 blocks + SFT on its answers, seed 3", {"S"}, ("S", "prune", "S", 3)),
    "s-ft-0": ("SmolLM2 fully fine-tuned on its own answers", {"S"}, ("S", "full", "S", 0)),
    "g-ft-0": ("Gemma fully fine-tuned on its own answers", {"G"}, ("G", "full", "G", 0)),
    "s-lora-of-g": ("SmolLM2 + LoRA on Gemma's answers", {"S", "G"}, ("S", "lora", "G", 0)),
    "g-lora-of-s": ("Gemma + LoRA on SmolLM2's answers", {"G", "S"}, ("G", "lora", "S", 0)),
    "s-ft-csum": ("SmolLM2 fully fine-tuned on chain_sum gold answers", {"S"}, ("S", "full", "csum", 0)),
    "g-lora-csum": ("Gemma + LoRA on chain_sum gold answers", {"G"}, ("G", "lora", "csum", 0)),
}
# The real pairs in two splits. "seen": the pairs of the first ten models, whose results were
# read (stop 27) before the headline setting below was chosen on them. "fresh": the pairs whose
# suspect is one of these models, built and scored only after that choice was committed; they
# are the ones reported (references for any pair are still every model outside the parent's
# lineage, so fresh models also serve as references for seen pairs and the other way round).
# The first six fresh models came in stop 28, the last seven (REAL_FRESH_2) in stop 29.
REAL_FRESH_2 = {"s-sft-3", "s-ft-0", "g-ft-0", "s-lora-of-g", "g-lora-of-s", "s-ft-csum", "g-lora-csum"}
REAL_FRESH = {"g-sft-0", "g-sft-of-s", "s-sft-2", "s-lora-0", "g-ft-gcd", "s-sft-of-s-student"} | REAL_FRESH_2
REAL_PAIR_SETS = {"fresh": REAL_FRESH, "second": REAL_FRESH_2}  # --pairs: test only the pairs of these suspects
REAL_PARENTS = {"S": "smollm2", "G": "gemma3"}
REAL_BUILTINS = {"S": "smollm2-135m-instruct", "G": "gemma3-270m"}  # what models.load reads for each parent
# (statistic, window in characters, alpha). The first is the headline: of every statistic,
# window (40, 80) and alpha (0.001, 0.01, 0.05), the best F1 on the seen pairs (likelihood-both:
# 9 of 10 derived pairs called, no false call, F1 0.95 at 80 characters and alpha 0.001 or 0.01,
# and at 40 characters and alpha 0.05; ties go to the CLI's defaults, 80 and 0.01). The second
# was the headline committed first (before likelihood-reverse existed; ca0ebbb), chosen the same
# way; neither saw a fresh pair. Then the reverse direction alone, likelihood-zlib (the stop-27
# headline's statistic) and agreement. The 40-character likelihood settings of stop 27 are in
# the seen grid only: every likelihood setting here scores at 80 characters, which halves the
# scoring of new models.
REAL_PROV_SETTINGS = {"likelihood-both, CLI defaults (80 chars, alpha 0.01)": ("likelihood-both", 80, 0.01),
                      "likelihood (80 chars, alpha 0.01)": ("likelihood", 80, 0.01),
                      "likelihood-reverse (80 chars, alpha 0.01)": ("likelihood-reverse", 80, 0.01),
                      "likelihood-zlib (80 chars, alpha 0.01)": ("likelihood-zlib", 80, 0.01),
                      "agreement (80 chars, alpha 0.01)": ("agreement", 80, 0.01),
                      "agreement, tiny-tuned (40 chars, alpha 0.001)": ("agreement", 40, 0.001)}


class RealModels:
    """The real provenance section's models over one --cache. Each is built once with
    stillhouse's loop (weights kept there, since the likelihood statistics score with them), its
    greedy answers to the probes are cached, and so is every (scorer, window, answer source)
    likelihood on its own: a model built later only adds its own row and column."""

    def __init__(self, rp: dict, cache: Cache):
        self.rp, self.cache = rp, cache
        self.probes = pv.default_probes(rp["probes"])
        self.train_prompts = real_prompts()[: rp["train"]]
        self.gen = dict(max_new_tokens=rp["tokens"], temperature=0.8)
        self.parents: dict = {}  # lineage -> the packaged model, loaded once
        self.held: dict = {}  # the one scorer in memory ({"id", "lm"}), loaded once for every window
        self.scores: dict = {}  # (scorer, window, answer source) -> per-probe scores, read from the cache once
        self.answers: dict[str, list[str]] = {}  # model id -> greedy answers to the probes
        self.seconds: dict[str, float] = {}

    def parent(self, lineage: str):
        from stillhouse import models

        if lineage not in self.parents:
            self.parents[lineage] = models.load(REAL_BUILTINS[lineage])
        return self.parents[lineage]

    def texts_of(self, source: str) -> tuple[list[str], list[str]]:
        """(prompts, answer texts) a suspect trains on."""
        from stillhouse.verify.reasoning_gym import problems

        n = self.rp["train"]
        if source in GOLD_SOURCES:
            task, task_cfg, seed = GOLD_SOURCES[source]
            ps = problems(task, task_cfg, n, seed)
            return [q["question"] for q in ps], [q["answer"] for q in ps]
        if source in REAL_PARENTS:
            lm = self.parent(source)
            texts = self.cache.get(f"prov-train-{source}", lambda: [
                c.text for c in generate(lm.model, lm.tokenizer, self.train_prompts, None, seed=1, **self.gen)])
        else:  # another suspect's answers: built with it
            texts = self.build(source)["train_answers"]
        return self.train_prompts, texts

    def build(self, mid: str) -> dict:
        """Model `mid` trained by its recipe (a parent: the packaged model), with its answers."""
        from stillhouse.train.students import prune_depth

        rp = self.rp

        def make():
            t0 = time.perf_counter()
            _, lineages, recipe = REAL_SUSPECTS[mid]
            if recipe is None:
                (lineage,) = lineages  # a parent's lineage is itself
                lm = self.parent(lineage)
                return {"answers": pv.answers(lm.model, lm.tokenizer, self.probes), "train_seconds": 0.0, "seconds": time.perf_counter() - t0}
            weights, how, source, seed = recipe
            lm = self.parent(weights)
            tok = lm.tokenizer
            prompts, texts = self.texts_of(source)
            comps = [Ids(tok(t, add_special_tokens=False)["input_ids"][: rp["tokens"]]) for t in texts]
            torch.manual_seed(seed)
            t1 = time.perf_counter()
            if how == "prune":
                n = lm.model.config.num_hidden_layers
                kept = smol_student_blocks(n) if weights == "S" else [i for i in range(n) if i % 3 != 1]
                m = sft(prune_depth(lm.model, kept), tok, prompts, comps, seed=seed, epochs=rp["epochs"], lr=rp["lr"])
            elif how == "lora":
                m = sft(copy.deepcopy(lm.model), tok, prompts, comps, seed=seed, epochs=rp["epochs"], lr=rp["lora_lr"], lora=True)
            else:
                m = sft(copy.deepcopy(lm.model), tok, prompts, comps, seed=seed, epochs=rp["epochs"], lr=rp["ft_lr"])
            t_train = time.perf_counter() - t1
            self.cache.save_model(mid, m, tok)
            res = {"answers": pv.answers(m, tok, self.probes), "train_seconds": t_train}
            if any(r and r[2] == mid for _, _, r in REAL_SUSPECTS.values()):  # a teacher of another suspect
                res["train_answers"] = [c.text for c in generate(m, tok, self.train_prompts, None, seed=2, **self.gen)]
            res["seconds"] = time.perf_counter() - t0
            print(f"  built {mid}: {res['seconds']:.0f} s (training {t_train:.0f} s); first answer: {res['answers'][0][:70]!r}", flush=True)
            return res

        return self.cache.get(f"prov-{mid}", make)

    def build_all(self, only: set) -> None:
        """Build `only` (every model if empty) and read every other model already in the cache."""
        for mid in REAL_SUSPECTS:
            if only and mid not in only and not self.cache.has(f"prov-{mid}"):
                continue
            r = self.build(mid)
            self.answers[mid], self.seconds[mid] = r["answers"], r["seconds"]

    def _scorer(self, mid: str):
        """Model `mid` loaded to score (one in memory at a time)."""
        from stillhouse import models

        if self.held.get("id") != mid:
            self.held.clear()
            recipe = REAL_SUSPECTS[mid][2]
            self.held.update(id=mid, lm=self.parent(next(iter(REAL_SUSPECTS[mid][1]))) if recipe is None
                             else models.load(str(self.cache.model_dir(mid))))
        return self.held["lm"]

    def logliks(self, mid: str, chars: int, srcs: list[str] | None = None) -> dict | None:
        """Model mid's per-character log-likelihoods of the answers of `srcs` (default: every other
        model). None if its weights were not kept and some scores are not cached."""
        srcs = [src for src in self.answers if src != mid] if srcs is None else srcs
        weights = self.cache.model_dir(mid)
        todo = [src for src in srcs if (mid, chars, src) not in self.scores]
        if REAL_SUSPECTS[mid][2] is not None and not (weights and weights.is_dir()) and \
                not all(self.cache.has(f"prov-ll-{mid}-{chars}-{src}") for src in todo):
            return None

        def score(src):
            def make():
                lm = self._scorer(mid)
                return pv.loglik(lm.model, lm.tokenizer, self.probes, self.answers[src], chars).tolist()
            return make

        for src in todo:
            self.scores[mid, chars, src] = self.cache.get(f"prov-ll-{mid}-{chars}-{src}", score(src))
        return {src: self.scores[mid, chars, src] for src in srcs}

    def decide(self, mid: str, pid: str, refs: list[str], statistic: str, chars: int, alpha: float):
        """The verdict from the cache: the suspect's scores of the others' answers (forward) and
        the parent's and references' scores of the suspect's answers (reverse); None if some
        model's weights were not kept."""
        ll = self.logliks(mid, chars, [pid, *refs]) if statistic in pv.SCORED_BY_SUSPECT else None
        by = {x: self.logliks(x, chars, [mid]) for x in [pid, *refs]} if statistic in pv.SCORED_BY_OTHERS else None
        if (ll is None and statistic in pv.SCORED_BY_SUSPECT) or (by and None in by.values()):
            return None
        by = by and {x: row[mid] for x, row in by.items()}
        return pv.decide(statistic, self.answers, pid, list(refs), alpha, chars, suspect_answers=self.answers[mid], logliks=ll,
                         scored_by=by, probes=self.probes)

    def strength(self, mid: str) -> float | None:
        """How well model mid predicts English none of these models wrote: its mean log-likelihood
        per character of held-out paragraphs (this repository's docs, frozen in the cache on
        first use), as answers to one neutral instruction. None if its weights were not kept."""
        texts = self.cache.get("prov-strength-texts", lambda: [t[:STRENGTH_CHARS] for t in held_out_text(STRENGTH_TEXTS)])
        key, weights = f"prov-strength-{mid}", self.cache.model_dir(mid)
        if not self.cache.has(key) and REAL_SUSPECTS[mid][2] is not None and not (weights and weights.is_dir()):
            return None

        def make():
            lm = self._scorer(mid)
            return float(np.nanmean(pv.loglik(lm.model, lm.tokenizer, [STRENGTH_PROMPT] * len(texts), texts, STRENGTH_CHARS)))

        return self.cache.get(key, make)


# Strength (RealModels.strength): 40 held-out paragraphs, first 300 characters, as answers to this
STRENGTH_TEXTS, STRENGTH_CHARS, STRENGTH_PROMPT = 40, 300, "Write a paragraph of technical documentation."


def real_pairs(rm: RealModels, settings: dict, only: set | None = None) -> list[dict]:
    """Every model (or those in `only`) against each parent that is not itself, at every setting;
    references for parent P are all the other models without P in their lineage. Seen pairs also
    carry the grid the headline was chosen on (every statistic and window; seen references only)."""
    pairs = []
    for mid in rm.answers:
        if only is not None and mid not in only:
            continue
        for pk, pid in REAL_PARENTS.items():
            if mid == pid or pid not in rm.answers:
                continue
            refs = [r for r in rm.answers if r != mid and pk not in REAL_SUSPECTS[r][1]]
            row = {"suspect": mid, "description": REAL_SUSPECTS[mid][0], "parent": pid, "derived": pk in REAL_SUSPECTS[mid][1],
                   "split": "fresh" if mid in REAL_FRESH else "seen", "references": sorted(refs)}
            for name, (statistic, chars, alpha) in settings.items():
                v = rm.decide(mid, pid, refs, statistic, chars, alpha)
                if v is None:
                    continue
                closest = max(v.reference_similarity, key=v.reference_similarity.get) if refs else None
                row[name] = {"p_value": v.p_value, "derived": v.derived, "parent_similarity": v.parent_similarity,
                             "closest_reference": closest, "closest_reference_similarity": v.reference_similarity.get(closest)}
            if row["split"] == "seen":
                seen_refs = [r for r in refs if r not in REAL_FRESH]
                row["grid"] = {f"{st} {chars}": g.p_value for st in pv.STATISTICS for chars in (40, 80)
                               if (g := rm.decide(mid, pid, seen_refs, st, chars, 1.0)) is not None}
            pairs.append(row)
    return pairs


# The reverse direction assumes the parent is not much stronger than the references (a stronger
# model finds any fluent text likelier); the forward one, that the references answer about as
# fluently as the parent. Each pair again, with only some of its references, by strength: those
# weaker than the parent, the weakest one, the strongest one.
CHECKED_STATISTICS = ("likelihood", "likelihood-reverse", "likelihood-both")  # the directions the checks below compare
REFERENCE_SUBSETS = {
    "weaker than the parent": lambda refs, parent, s: [r for r in refs if s[r] < s[parent]],
    "the weakest": lambda refs, parent, s: sorted(refs, key=s.get)[:1],
    "the strongest": lambda refs, parent, s: sorted(refs, key=s.get)[-1:],
}


def strength_check(rm: RealModels, pairs: list[dict], chars: int = 80, alpha: float = 0.01) -> dict:
    """Per statistic (forward, reverse, both) and reference subset: the verdicts on every pair whose
    subset is not empty, and the models' strengths."""
    s = {mid: rm.strength(mid) for mid in rm.answers}
    s = {mid: v for mid, v in s.items() if v is not None}
    rows = []
    for p in pairs:
        refs = [r for r in p["references"] if r in s]
        if p["parent"] not in s or p["suspect"] not in s:
            continue
        row = {"suspect": p["suspect"], "parent": p["parent"], "derived": p["derived"], "split": p["split"]}
        for subset, pick in REFERENCE_SUBSETS.items():
            chosen = pick(refs, p["parent"], s)
            for statistic in CHECKED_STATISTICS:
                v = rm.decide(p["suspect"], p["parent"], chosen, statistic, chars, alpha) if chosen else None
                if v is not None:
                    row[f"{statistic}, {subset}"] = {"references": chosen, "p_value": v.p_value, "derived": v.derived}
        rows.append(row)
    return {"strength": s, "pairs": rows,
            "summary": {k: confusion([(r[k]["derived"], r["derived"]) for r in rows if k in r])
                        for k in dict.fromkeys(k for r in rows for k in r if k.startswith("likelihood"))}}


# How many references does a verdict need? Each pair again with random subsets of k of its
# references (up to REFERENCE_DRAWS per pair and k, seeded): the share of unrelated pairs called
# derived and of derived pairs found, per statistic. The headline uses all (6 to 11 here).
REFERENCE_COUNTS, REFERENCE_DRAWS = (1, 2, 3, 5), 15


def reference_count_check(rm: RealModels, pairs: list[dict], chars: int = 80, alpha: float = 0.01, seed: int = 0) -> dict:
    rng = random.Random(seed)
    rows = {}
    for k in REFERENCE_COUNTS:
        draws = []  # (pair, references)
        for p in pairs:
            subsets = [list(c) for c in itertools.combinations(p["references"], k)]
            rng.shuffle(subsets)
            draws += [(p, sub) for sub in subsets[:REFERENCE_DRAWS]]
        for statistic in CHECKED_STATISTICS:
            verdicts = [(v.derived, p["derived"]) for p, sub in draws
                        if (v := rm.decide(p["suspect"], p["parent"], sub, statistic, chars, alpha)) is not None]
            rows[f"{statistic}, {k} random"] = confusion(verdicts)
    return rows


def real_provenance(cfg: dict, out: dict) -> None:
    """Build (--models), score (--suspects) or test every pair of REAL_SUSPECTS at the settings in
    REAL_PROV_SETTINGS; nothing is tuned here (the headline was chosen on the seen pairs)."""
    t_start = time.perf_counter()
    rm = RealModels(cfg["real_prov"], Cache(cfg.get("cache")))
    only = cfg.get("models") or set()
    rm.build_all(only)
    if only - {"cached"}:  # a build run stops here, so processes building side by side do not also test
        print(f"  --models {','.join(sorted(only))}: done; run with --models cached to test every cached model", flush=True)
        return
    settings = REAL_PROV_SETTINGS
    windows = sorted({chars for statistic, chars, _ in settings.values() if statistic != "agreement"})
    focus = REAL_PAIR_SETS.get(cfg.get("pairs", "all"))  # None: every pair
    if cfg.get("suspects"):  # score only: these suspects' likelihoods of every other model's answers, and their strength
        for mid in sorted(cfg["suspects"] & set(rm.answers)):
            # a pair needs its suspect's row and the column of its answers in every other row
            srcs = None if focus is None or mid in focus else [src for src in rm.answers if src in focus]
            for chars in windows:
                rm.logliks(mid, chars, srcs)
            if mid not in REAL_FRESH and focus is None:  # the seen grid's other window, over seen models only
                rm.logliks(mid, 40, [src for src in rm.answers if src != mid and src not in REAL_FRESH])
            rm.strength(mid)
        print(f"  --suspects {','.join(sorted(cfg['suspects']))}: scored; run without --suspects to test every pair", flush=True)
        return

    pairs = real_pairs(rm, settings, focus)

    def summarise(rows):
        return {name: {"pairs": sum(name in r for r in rows),
                       **{k: v for k, v in confusion([(r[name]["derived"], r["derived"]) for r in rows if name in r]).items() if k != "f1"}}
                for name in settings}

    summary = {split: summarise([r for r in pairs if r["split"] == split]) for split in ("fresh", "seen")}
    for batch, name in ((REAL_FRESH - REAL_FRESH_2, "fresh, first batch"), (REAL_FRESH_2, "fresh, second batch")):
        summary[name] = summarise([r for r in pairs if r["suspect"] in batch])
    seen = [r for r in pairs if "grid" in r]
    grid = {f"{key}, alpha {a}": confusion([(r["grid"][key] < a, r["derived"]) for r in seen])
            for key in (seen[0]["grid"] if seen else {}) for a in (0.001, 0.01, 0.05)}
    strength = strength_check(rm, pairs)
    strength["reference_counts"] = reference_count_check(rm, pairs)
    out["real_provenance"] = {"pairs": pairs, "summary": summary, "seen_grid": grid, "strength_check": strength,
                              "model_seconds": rm.seconds, "config": rm.rp, "settings": settings,
                              "seconds": time.perf_counter() - t_start}
    print_real(out["real_provenance"])


def print_real(r: dict) -> None:
    pairs, summary, grid, settings = r["pairs"], r["summary"], r["seen_grid"], r["settings"]
    if grid:
        print(f"\nthe headline's choice: F1 on the {sum('grid' in p for p in pairs)} seen pairs per statistic, window and alpha")
        for k, c in grid.items():
            print(f"  {k}: F1 {c['f1']:.2f} (tp {c['tp']}, fp {c['fp']}, fn {c['fn']})")
    names = list(settings)
    print("\nsettings: " + "; ".join(f"[{i + 1}] {n}" for i, n in enumerate(names)))
    print("\n| split | suspect | parent | truly derived | " + " | ".join(f"p [{i + 1}]" for i in range(len(names)))
          + " | similarity to parent / closest reference [1] |\n|---|---|---|---|" + "---|" * len(names) + "---|")
    for p in pairs:
        cells = [f"{p[n]['p_value']:.2g} {'D' if p[n]['derived'] else '-'}" if n in p else "n/a" for n in names]
        a = p[names[0]]
        print(f"| {p['split']} | {p['suspect']} | {p['parent']} | {'yes' if p['derived'] else 'no'} | " + " | ".join(cells) +
              f" | {a['parent_similarity']:.2f} / {a['closest_reference_similarity'] or 0:.2f} ({a['closest_reference']}) |")
    print("(D: called derived at that setting's alpha)")
    for split, per in summary.items():
        for name, s_ in per.items():
            if not s_["pairs"]:
                continue
            print(f"\n{split} pairs, {name}: {s_['pairs']} pairs; | truly derived | {s_['tp']} | {s_['fn']} |  | not derived | {s_['fp']} | {s_['tn']} |; "
                  f"precision {100 * s_['precision']:.0f}%, recall {100 * s_['recall']:.0f}%")
    sc = r["strength_check"]
    if sc["strength"]:
        print(f"\nstrength: log-likelihood per character of {STRENGTH_TEXTS} held-out paragraphs (first {STRENGTH_CHARS} characters)")
        for mid, v in sorted(sc["strength"].items(), key=lambda x: -x[1]):
            print(f"  {mid}: {v:.3f}")
        print("\n| statistic, references | tests (pair, references) | derived called | not derived called (false) | precision | recall |\n|---|---|---|---|---|---|")
        for k, c in [*sc["summary"].items(), *sc.get("reference_counts", {}).items()]:
            print(f"| {k} | {c['tp'] + c['fp'] + c['fn'] + c['tn']} | {c['tp']} of {c['tp'] + c['fn']} | {c['fp']} of {c['fp'] + c['tn']} | "
                  f"{100 * c['precision']:.0f}% | {100 * c['recall']:.0f}% |")


def _arm_panel(ax, rows: list[dict], modes: list[tuple[str, str]], title: str) -> None:
    order = list(dict.fromkeys(r["arm"] for r in rows))
    dose = {r["arm"]: r["dose"] for r in rows if r.get("dose") and r["arm"].startswith("watermarked")}
    arms = sorted(order, key=lambda a: (0, -dose[a]) if a in dose else (1, order.index(a)))  # watermarked by dose, then the rest
    width = 0.6 / max(1, len(modes))
    for j, (key, label) in enumerate(modes):
        for i, arm in enumerate(arms):
            ps = [max(r[key], 1e-50) for r in rows if r["arm"] == arm and key in r]
            ax.scatter([i + (j - (len(modes) - 1) / 2) * width] * len(ps), ps, marker="osD^"[j], color=f"C{j}", s=18,
                       label=label if i == 0 else None)
    ax.set_yscale("log")
    ax.axhline(0.01, color="grey", ls="--", lw=0.8)
    ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("p-value (true key)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def picture(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, m, b) = plt.subplots(1, 3, figsize=(15, 4.6))
    if out.get("radioactivity"):
        _arm_panel(a, out["radioactivity"], [("open_p", "open weights, top-1"), ("dist_p", "open weights, distribution"),
                                             ("api_p", "API only")], "Radioactivity, tiny scale (per arm and dose)")
    if out.get("real_radioactivity"):
        _arm_panel(m, out["real_radioactivity"], [("open_p", "open weights"), ("open_filtered_p", "open weights, filtered"),
                                                  ("api_p", "API only")], "Radioactivity, SmolLM2 teacher / pruned students")
    curves = []  # (label, [(p-value, truly derived)], p-value threshold marked)
    prov = out.get("provenance", {})
    rep = [(p["p_value"], p["derived"]) for p in prov.get("pairs", []) if p["split"] == "report"]
    if rep:
        curves.append((f"tiny scale, {len(rep)} reported pairs", rep, prov["chosen"]["alpha"]))
    key, (_, _, alpha) = next(iter(REAL_PROV_SETTINGS.items()))
    for split in ("fresh", "seen"):
        real = [r for r in out.get("real_provenance", {}).get("pairs", []) if r.get("split", "seen") == split and key in r]
        if real:
            curves.append((f"SmolLM2 / Gemma-3, {len(real)} {split} pairs", [(r[key]["p_value"], r["derived"]) for r in real], alpha))
    for i, (label, pts, alpha) in enumerate(curves):
        curve = [confusion([(q <= t, d) for q, d in pts]) for t in sorted({q for q, _ in pts} | {1.0})]
        b.plot([c["recall"] for c in curve], [c["precision"] for c in curve], marker=".", color=f"C{i}", label=label)
        at = confusion([(q < alpha, d) for q, d in pts])
        b.scatter([at["recall"]], [at["precision"]], color=f"C{i}", edgecolor="red", s=60, zorder=3, label=f"alpha = {alpha}")
    if curves:
        b.set_xlabel("recall")
        b.set_ylabel("precision")
        b.set_ylim(0, 1.05)
        b.set_xlim(0, 1.05)
        b.legend(fontsize=7)
        b.set_title("Provenance test: precision/recall over the threshold on p", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="the setting that runs in minutes on a shared 2-core machine")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", choices=sorted(SETTINGS), help="small, medium (a larger real-model radioactivity section) or full")
    ap.add_argument("--cache", type=Path, help="real-model sections: keep teacher answers, models and scores here (resume; --arms, --models, --suspects); "
                    "put it outside the checkout, which a fresh clone does not carry")
    ap.add_argument("--arms", default="", help="real-model section: run only these arm ids (wm100, para, plain, wmNN for each "
                    "other dose NN%%, base, teacher, other; 'cached': none), reading the others from --cache; without it every arm runs and all are summarised")
    ap.add_argument("--models", default="", help="real provenance section: build only these suspects (REAL_SUSPECTS ids), "
                    "reading the others from --cache ('cached': none); without it every suspect is built and all pairs are tested")
    ap.add_argument("--suspects", default="", help="real provenance section: only score these suspects' likelihoods of "
                    "every other model's answers (into --cache), so processes can share the scoring; a run without it tests the pairs")
    ap.add_argument("--pairs", choices=sorted(REAL_PAIR_SETS) + ["all"], default="all", help="real provenance section: score "
                    "(--suspects) and test only what these pairs need (their suspects' rows, every model's scores of their "
                    "answers): the fresh ones, or the second fresh batch's")
    ap.add_argument("--real-seeds", default="", help="real radioactivity section: train these student seeds (e.g. 1,2) "
                    "instead of the setting's 0..seeds-1")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: cost,radio,realradio,prov,real")
    ap.add_argument("--doses", default="", help="comma-separated watermarked shares overriding the setting's, e.g. 0.25,0.5")
    ap.add_argument("--delta", type=float, default=wm.DELTA, help="the watermark's logit bias in the cost section")
    ap.add_argument("--confident", type=float, default=1.0, help="cost section: leave steps whose top token is above this probability unmarked")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "provenance-results.json")
    ap.add_argument("--picture", type=Path, default=ROOT / "docs" / "provenance.png")
    ap.add_argument("--picture-from", nargs="+", type=Path, metavar="JSON",
                    help="run nothing: draw the picture from saved results (later files override earlier ones, except "
                    "the real radioactivity students, which add up: pass each medium run that trained its own)")
    args = ap.parse_args()
    if args.picture_from:
        merged: dict = {}
        for f in args.picture_from:
            res = json.loads(f.read_text())
            res["real_radioactivity"] = merged.get("real_radioactivity", []) + res.get("real_radioactivity", [])
            merged.update(res)
        picture(merged, args.picture)
        return
    setting = args.setting or ("smoke" if args.smoke else "small" if args.small else "full")
    cfg = dict(SETTINGS[setting])
    cfg["cache"], cfg["arms"] = args.cache, set(filter(None, args.arms.split(",")))
    cfg["models"] = set(filter(None, args.models.split(",")))
    cfg["suspects"] = set(filter(None, args.suspects.split(",")))
    cfg["pairs"] = args.pairs
    if (cfg["arms"] or cfg["models"]) and not args.cache:
        ap.error("--arms and --models need --cache (the other arms' or models' results are read from it)")
    for flag in ("models", "suspects"):
        if cfg[flag] - set(REAL_SUSPECTS) - {"cached"}:
            ap.error(f"--{flag}: unknown {sorted(cfg[flag] - set(REAL_SUSPECTS))}; choose from {sorted(REAL_SUSPECTS)}")
    cfg["delta"], cfg["confident"] = args.delta, args.confident
    if args.real_seeds:
        cfg["real_radio"] = {**cfg["real_radio"], "seed_list": [int(x) for x in args.real_seeds.split(",")]}
    if args.doses:
        cfg["doses"] = [float(d) for d in args.doses.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    out: dict = {"setting": setting, "config": {k: v for k, v in cfg.items() if k not in ("cache", "arms", "models", "suspects", "pairs")},
                 "times": {}}
    start = time.perf_counter()

    def section(name, fn, *a):
        t0 = time.perf_counter()
        print(f"\n## {name}", flush=True)
        r = fn(*a)
        out["times"][name] = time.perf_counter() - t0
        print(f"({name}: {out['times'][name]:.0f} s)", flush=True)
        return r

    torch.manual_seed(0)
    if "cost" not in skip:
        section("watermark cost (SmolLM2-135M-Instruct)", watermark_cost, cfg, out)
    ctx = None
    if "radio" not in skip or "prov" not in skip:
        ctx = section("radioactivity (tiny scale)", radioactivity, cfg, out)
    print("\n## calibration under random keys\n| null | p-values | KS p | FPR at 0.01 |\n|---|---|---|---|")
    rows = []
    if "_plain_long" in out:
        keys = random_keys(cfg["keys"])
        rows.append(calibration_row("plain SmolLM2 answers, text detection", [wm.score_ids(k, out["_plain_long"]).p_value for k in keys]))
    if "_null_radio" in out:
        rows.append(calibration_row("control students, open weights (top-1 pairs, randomised p)", out["_null_radio"]["open"]))
        rows.append(calibration_row("control students, open weights (distribution, normal tail)", out["_null_radio"]["dist"]))
        rows.append(calibration_row("control students, API only", out["_null_radio"]["api"]))
    out["calibration"] = rows
    if "realradio" not in skip:
        section("radioactivity (SmolLM2-135M teacher, pruned students)", real_radioactivity, cfg, out)
        rows.append(calibration_row("real students, open weights, random keys", out["_null_real"]["open"]))
        rows.append(calibration_row("real students, open weights filtered, random keys", out["_null_real"]["open_filtered"]))
        rows.append(calibration_row("real students, open weights distribution filtered, random keys", out["_null_real"]["dist_filtered"]))
        rows.append(calibration_row("real students, API only, random keys", out["_null_real"]["api"]))
    if "prov" not in skip:
        section("provenance (tiny scale)", provenance_pairs, cfg, ctx, out)
    if "real" not in skip:
        section("provenance (SmolLM2 / Gemma-3 lineages)", real_provenance, cfg, out)
    out["times"]["total"] = time.perf_counter() - start
    print(f"\ntotal {out['times']['total']:.0f} s (setting {out['setting']}; machine shared with other jobs)")
    picture(out, args.picture)
    args.out.write_text(json.dumps({k: v for k, v in out.items() if not k.startswith("_")}, indent=1, default=str))


if __name__ == "__main__":
    main()
