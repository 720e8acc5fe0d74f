"""Is the radioactivity null calibrated on real models, with Sander et al.'s context filter on?

SmolLM2-135M-Instruct (the provider) serves watermarked answers to 64 prompts (their tokens are
the filter's contexts); five suspects that never saw the random keys below (the teacher itself,
two depth-pruned copies, and pruned students SFT-trained one epoch on its plain and on its
watermarked answers) are teacher-forced on held-out docs paragraphs. Their p-values under random
keys are pooled two ways, `--reps` times each:

- shared: the same keys for every suspect (how bench/provenance.py pooled them before);
- own: keys of its own for every suspect (what `radioactivity.null_pvalues` does, and
  bench/provenance.py now).

Pooled p-values are an independent sample only in the second case (suspects share scored pairs,
and a shared pair has the same green bit under a shared key), so only there may KS be read.
Per suspect, KS over 1000 keys of its own checks each one's p-values directly.

    OMP_NUM_THREADS=1 nice -n 19 python bench/radioactivity_null.py   # ~11 min on a shared 2-core machine
    OMP_NUM_THREADS=1 nice -n 19 python bench/radioactivity_null.py --simulate 0.15 0.5 0.9 --reps 20   # no models
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kstest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as B  # noqa: E402  (its prompts, docs paragraphs, generate and sft helpers)

from stillhouse import models  # noqa: E402
from stillhouse.guard import radioactivity as ra  # noqa: E402
from stillhouse.guard import watermark as wm  # noqa: E402
from stillhouse.teachers.hf import encode_prompt  # noqa: E402
from stillhouse.train.students import prune_depth  # noqa: E402


def suspects_pairs(args) -> tuple[dict, set]:
    smol = models.load("smollm2-135m-instruct")
    tok = smol.tokenizer
    train_p = B.real_prompts()[: args.train]
    gen = dict(max_new_tokens=40, temperature=0.8)
    marked = B.generate(smol.model, tok, train_p, wm.WatermarkProcessor(B.KEY), seed=0, **gen)
    plain = B.generate(smol.model, tok, train_p, None, seed=1, **gen)
    contexts = ra.watermark_contexts([c.token_ids for c in marked])
    probe_ids = [encode_prompt(tok, t)[:256] for t in B.held_out_text(args.probe_texts)]
    n = smol.model.config.num_hidden_layers
    kept = list(range(12)) + [n - 2, n - 1]
    suspects = {"teacher": smol.model, "pruned 14": prune_depth(smol.model, kept).eval(),
                "pruned 20": prune_depth(smol.model, list(range(18)) + [n - 2, n - 1]).eval()}
    torch.manual_seed(0)
    for name, comps, seed in [("SFT on plain", plain, 0), ("SFT on watermarked", marked, 1)]:
        suspects[name] = B.sft(prune_depth(smol.model, kept), tok, train_p, comps, seed=seed, epochs=1, lr=3e-4)
    preds = {name: ra.predicted_pairs(m, probe_ids, tok.pad_token_id) for name, m in suspects.items()}
    return preds, contexts


def _seeds(n: int, seed: int) -> list[int]:
    return [wm.key_seed(k) for k in B.random_keys(n, seed=seed)]


def null_check(sets: dict, keys: int, reps: int) -> dict:
    """Rep 0's shared keys are the ones bench/provenance.py shared between students (seed 99)."""
    names = list(sets)
    pairsets = {k: set(zip(*(a.tolist() for a in sets[k][:2]))) for k in names}
    overlap = [len(pairsets[a] & pairsets[b]) / min(len(pairsets[a]), len(pairsets[b]))
               for i, a in enumerate(names) for b in names[i + 1:]]
    shared, own = [], []
    for r in range(reps):
        common = _seeds(keys, 99 + r)
        ps = [ra.score_unique(k, *sets[s]).p_value for s in names for k in common]
        shared.append((kstest(ps, "uniform").pvalue, np.mean(np.array(ps) < 0.01)))
        ps = [ra.score_unique(k, *sets[s]).p_value for i, s in enumerate(names) for k in _seeds(keys, 1000 + i + 100 * r)]
        own.append((kstest(ps, "uniform").pvalue, np.mean(np.array(ps) < 0.01)))
    per = {s: float(kstest([ra.score_unique(k, *sets[s]).p_value for k in _seeds(1000, 7)], "uniform").pvalue) for s in names}
    summary = lambda runs: {"ks_p_rep0": float(runs[0][0]), "fpr_0.01_rep0": float(runs[0][1]),  # noqa: E731
                            "ks_p_median": float(np.median([k for k, _ in runs])),
                            "ks_rejects_at_0.05": f"{sum(k < 0.05 for k, _ in runs)}/{len(runs)}",
                            "fpr_0.01_max": float(max(f for _, f in runs))}
    return {"scored_pairs": {s: len(sets[s][0]) for s in names}, "pair_overlap_mean": float(np.mean(overlap)),
            "pair_overlap_max": float(np.max(overlap)), "shared_keys": summary(shared), "own_keys": summary(own),
            "per_suspect_ks_p_1000_keys": per,
            "true_key_p": {s: ra.score_unique(wm.key_seed(B.KEY), *sets[s]).p_value for s in names}}


def simulate(args) -> dict:
    """No models: 6 key-independent suspects that share `share` of 1,750 scored pairs (the rest
    their own), pooled under shared keys vs keys of their own, `--reps` times each."""
    out = {}
    for share in args.simulate:
        rng = np.random.default_rng(0)
        prev, tok = rng.integers(0, 2000, 1750), rng.integers(0, 49152, 1750)
        sets = {}
        for i in range(6):
            t = tok.copy()
            own = rng.random(len(t)) > share
            t[own] = rng.integers(0, 49152, own.sum())
            sets[f"s{i}"] = wm.distinct_pairs(prev.tolist(), t.tolist())
        r = null_check(sets, args.keys, args.reps)
        out[f"share {share}"] = {k: r[k] for k in ("pair_overlap_mean", "shared_keys", "own_keys")}
        print(f"| {share:.2f} | {r['pair_overlap_mean']:.2f} | {r['shared_keys']['ks_rejects_at_0.05']} | "
              f"{r['own_keys']['ks_rejects_at_0.05']} |", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=64, help="prompts the provider answers (filter contexts, SFT data)")
    ap.add_argument("--probe-texts", type=int, default=60, help="held-out docs paragraphs the suspects are teacher-forced on")
    ap.add_argument("--keys", type=int, default=200, help="random keys per suspect in one pooled null")
    ap.add_argument("--reps", type=int, default=20, help="pooled nulls per way of pooling")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "radioactivity-null.json")
    ap.add_argument("--simulate", type=float, nargs="+", metavar="SHARE",
                    help="run no model: synthetic suspects sharing these fractions of their pairs (seconds)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.simulate:
        print("| shared pairs | measured overlap | shared keys: KS rejects at 0.05 | own keys: KS rejects at 0.05 |\n|---|---|---|---|")
        res = simulate(args)
        print(f"total {time.perf_counter() - t0:.0f} s")
        args.out.with_name("radioactivity-null-simulated.json").write_text(json.dumps(res, indent=1))
        return
    preds, contexts = suspects_pairs(args)
    out = {"config": vars(args) | {"out": str(args.out)}}
    for filt, c in [("unfiltered", None), ("filtered", contexts)]:
        out[filt] = null_check({s: wm.distinct_pairs(*preds[s], c) for s in preds}, args.keys, args.reps)
        print(filt, json.dumps(out[filt], indent=1), flush=True)
    out["seconds"] = time.perf_counter() - t0
    print("| pairs | suspects x keys | shared keys: KS p rep 0, rejects at 0.05 over reps | own keys: KS p rep 0, rejects | own keys: FPR at 0.01, rep 0 / max |")
    print("|---|---|---|---|---|")
    for filt in ("unfiltered", "filtered"):
        r, sh, ow = out[filt], out[filt]["shared_keys"], out[filt]["own_keys"]
        print(f"| {filt} | {len(preds)} x {args.keys} | {sh['ks_p_rep0']:.3f}, {sh['ks_rejects_at_0.05']} | "
              f"{ow['ks_p_rep0']:.3f}, {ow['ks_rejects_at_0.05']} | {100 * ow['fpr_0.01_rep0']:.1f}% / {100 * ow['fpr_0.01_max']:.1f}% |")
    print(f"total {out['seconds']:.0f} s (machine shared with other jobs)")
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
