"""Benchmark of the guard's detection half (`stillhouse guard analyze`).

  python bench/guard.py --tune     simulate the tuning split (4 attack families), calibrate on its
                                   benign accounts only (out-of-fold thresholds; no attacker is
                                   fitted), write src/stillhouse/guard/tuning/, print the tuning
                                   split's out-of-fold table (every family unseen by construction)
  python bench/guard.py --validate simulate a validation split (seed 33): the tuning split's four
                                   families at the test split's sizes (campaigns over 1,000 accounts),
                                   never the adaptive family; the tuned thresholds' FPR and TPR there,
                                   and which evidence group flags each benign account (what design
                                   changes are judged on; the test split is not)
  python bench/guard.py --eval     simulate the test split (adds the unseen `adaptive` family and
                                   campaigns over 100 and 1,000 accounts); TPR of campaigns and
                                   attacker accounts at benign-account FPR 1%, 0.3%, 0.1%, 0, with
                                   Wilson 95% intervals, per persona and family; the MMD baseline
                                   (arXiv 2606.05725) on a fixed sample of the same traffic
                                   (MMD_SAMPLE; embeddings cached in WORK); docs/guard-scores.png
  python bench/guard.py --scale 100000 1000000 10000000
                                   time and peak memory of `stillhouse guard analyze` on synthetic
                                   logs written directly in the schema (day-partitioned Parquet)

The traffic is written in the gateway's log schema by guard/simulate.py (not through a running
gateway). Thresholds are never fitted on the test split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from stillhouse.guard import log_schema as L, simulate as S  # noqa: E402
from stillhouse.guard.analyze import feature_table  # noqa: E402
from stillhouse.guard.logsource import open_log  # noqa: E402
from stillhouse.guard.scoring import FEATURES, TUNING_DIR, calibrate, thresholds_at  # noqa: E402

FPRS = {"1%": 0.01, "0.3%": 0.003, "0.1%": 0.001, "0": 0.0}
TUNE = dict(seed=11, chat=3000, app=20, eval_teams=10, researcher=30, power=100,
            families=("coverage", "reasoning", "logprob", "probing"), sizes=(3, 10, 30, 100, 300))
TEST = dict(seed=22, chat=4000, app=30, eval_teams=12, researcher=40, power=150,
            families=S.FAMILIES, sizes=(3, 10, 30, 100, 100, 1000))
# validation: a third seed, the tuning families only (adaptive stays unseen), the test split's sizes
VALID = dict(seed=33, chat=4000, app=30, eval_teams=12, researcher=40, power=150,
             families=TUNE["families"], sizes=(3, 10, 30, 100, 100, 1000))
WINDOW = 86400.0


def simulate(spec: dict, out: Path, log_text: bool) -> pa.Table:
    t = time.perf_counter()
    sim = S.Simulator(spec["seed"])
    sim.chat(spec["chat"]); sim.app(spec["app"]); sim.eval(spec["eval_teams"])
    sim.researcher(spec["researcher"]); sim.power(spec["power"])
    for fam in spec["families"]:
        for size in spec["sizes"]:
            sim.campaign(fam, size, per_account=(20, 80))
    table = sim.table(log_text=log_text)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    S.write_parquet_days(table, out)
    truth = sim.truth()
    pq.write_table(truth, out.parent / (out.name + "-truth.parquet"))
    print(f"simulated {out.name}: {table.num_rows:,} requests, {truth.num_rows:,} accounts "
          f"({sum(truth['attack'].to_pylist()):,} attacker) in {time.perf_counter() - t:.0f}s", flush=True)
    return truth


def labelled_features(log: Path, truth: pa.Table) -> pa.Table:
    con = open_log(log)
    feats = feature_table(con, WINDOW)
    con.close()
    return feats.join(truth, "account")


def account_max(accounts: list[str], scores: np.ndarray) -> dict[str, float]:
    best: dict[str, float] = {}
    for a, s in zip(accounts, scores):
        best[a] = max(best.get(a, -1.0), float(s))
    return best


def thresholds_from(benign_scores: np.ndarray) -> dict[str, float]:
    """Lowest threshold flagging at most floor(fpr * n) benign accounts (flag = score >= t)."""
    return thresholds_at(benign_scores, FPRS)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" if n else "-"


# ------------------------------------------------------------------ tune
def tune(work: Path) -> None:
    """Benign-only calibration (scoring.calibrate): no attacker row is fitted, so the tuning
    split's attack families are a held-out check of what the detector catches unseen."""
    truth = simulate(TUNE, work / "tune", log_text=False)
    feats = labelled_features(work / "tune", truth)
    meta, oof = calibrate(feats, FPRS)
    TUNING_DIR.mkdir(parents=True, exist_ok=True)
    keep = ["account", "window_start", "attack", "kind", "campaign"] + FEATURES
    pq.write_table(feats.select(keep), TUNING_DIR / "features.parquet", compression="zstd")
    att = dict(zip(truth["account"].to_pylist(), truth["attack"].to_pylist()))
    best = account_max(feats["account"].to_pylist(), oof)
    meta |= {"default_fpr": "0.3%", "benign_accounts": int(sum(not v for v in att.values())),
             "attacker_accounts": int(sum(att.values())),
             "note": "written by bench/guard.py --tune; benign-only, out-of-fold by account; attackers never fitted"}
    (TUNING_DIR / "thresholds.json").write_text(json.dumps(meta, indent=2) + "\n")
    print("tuning thresholds", json.dumps(meta["thresholds"]), flush=True)
    report("tuning split, out-of-fold (no family was fitted: each is unseen)", truth.to_pylist(), best, meta["thresholds"],
           families=TUNE["families"])


# ------------------------------------------------------------------ validate
def validate(work: Path) -> None:
    """The tuned detector on the validation split: the report, and for every flagged benign account
    (and every missed attacker) the evidence group that scored it and its reasons. Per-account
    scores, groups and features go to WORK/valid-accounts.parquet for closer reading."""
    from stillhouse.guard.scoring import GROUPS, load_detector

    truth = simulate(VALID, work / "valid", log_text=False)
    det = load_detector()
    feats = labelled_features(work / "valid", truth)
    ratios = det.ratios(feats)
    scores = det.score(feats)
    acc = feats["account"].to_pylist()
    best = account_max(acc, scores)
    report("validation split (tuning families, test sizes; thresholds from tuning)", truth.to_pylist(), best, det.thresholds,
           families=VALID["families"])
    # each account's worst window, with its per-group ratios
    worst: dict[str, int] = {}
    for i, (a, s) in enumerate(zip(acc, scores)):
        if a not in worst or s > scores[worst[a]]:
            worst[a] = i
    idx = np.array(list(worst.values()))
    out = feats.take(pa.array(idx)).append_column("score", pa.array(scores[idx]))
    for j, g in enumerate(GROUPS):
        out = out.append_column("ratio: " + g, pa.array(ratios[idx, j]))
    pq.write_table(out, work / "valid-accounts.parquet")
    t = det.threshold
    names = list(GROUPS)
    print(f"\nwhich evidence group scores the flagged benign accounts (threshold {t:.3f}):")
    counts: dict[tuple[str, str], int] = {}
    for r, i in zip(out.to_pylist(), idx):
        if not r["attack"] and r["score"] >= t:
            g = names[int(np.argmax(ratios[i]))]
            counts[(r["kind"], g)] = counts.get((r["kind"], g), 0) + 1
    for (k, g), c in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:12s} {g:24s} {c}")
    print("\naccounts tied into a cluster of >= 2 accounts, per persona or family:")
    for k in list(S.BENIGN) + list(VALID["families"]):
        sel = [r for r in out.to_pylist() if r["kind"] == k]
        print(f"  {k:12s} {sum(r['cluster_size'] > 0 for r in sel)}/{len(sel)}")


# ------------------------------------------------------------------ evaluate
def evaluate(work: Path, baseline: bool, picture: Path | None) -> None:
    import pyarrow.compute as pc

    from stillhouse.guard.scoring import load_detector

    truth = simulate(TEST, work / "test", log_text=baseline)
    t = time.perf_counter()
    det = load_detector()
    feats = labelled_features(work / "test", truth)
    scores = det.score(feats)
    best = account_max(feats["account"].to_pylist(), scores)
    print(f"detector: {len(best):,} accounts scored in {time.perf_counter() - t:.0f}s (features + model)", flush=True)
    rows = truth.to_pylist()
    results = {"detector": report("detector", rows, best, det.thresholds)}
    if baseline:
        sample = mmd_sample(rows, MMD_SAMPLE["chat"], MMD_SAMPLE["per_campaign"])
        base, base_th = mmd_scores(work, sample)
        results["mmd"] = report("MMD baseline (arXiv 2606.05725), on a sample of the test accounts", sample, base, base_th)
        results["detector-on-mmd-sample"] = report("detector, on the same sample", sample, best, det.thresholds)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    if picture:
        plot(rows, best, det.thresholds, picture, results.get("mmd") and base)


def report(name: str, rows: list[dict], score: dict[str, float], th: dict[str, float], families=S.FAMILIES) -> dict:
    """Markdown tables: benign FPR per persona, attacker TPR per family, campaign TPR per family
    and per campaign size; a campaign counts as flagged when at least half its accounts are."""
    out: dict = {"thresholds": th}
    print(f"\n### {name}\n")
    print("| threshold (set on tuning split at benign FPR) | " + " | ".join(FPRS) + " |")
    print("|---|" + "---|" * len(FPRS))
    benign = [r for r in rows if not r["attack"]]
    attack = [r for r in rows if r["attack"]]

    def line(label, group, key=lambda r: True):
        cells = []
        for f, t in th.items():
            k = sum(score[r["account"]] >= t for r in group if key(r))
            n = sum(1 for r in group if key(r))
            cells.append(rate(k, n))
            out.setdefault(label, {})[f] = [k, n]
        print(f"| {label} | " + " | ".join(cells) + " |")

    line("benign accounts flagged (FPR), all", benign)
    for p in S.BENIGN:
        line(f"  benign: {p}", benign, lambda r, p=p: r["kind"] == p)
    line("attacker accounts flagged (TPR), all", attack)
    for fam in families:
        line(f"  attackers: {fam}", attack, lambda r, fam=fam: r["kind"] == fam)
    camps: dict[str, list[dict]] = {}
    for r in attack:
        camps.setdefault(r["campaign"], []).append(r)
    cam_rows = [{"account": c, "kind": m[0]["kind"], "size": len(m)} for c, m in camps.items()]
    cscore = {}
    for c, m in camps.items():
        cscore[c] = float(np.median([score[r["account"]] for r in m]))  # half flagged <=> median >= t
    for label, sel in [("campaigns flagged, all", lambda r: True)] + [(f"  campaigns: {fam}", lambda r, fam=fam: r["kind"] == fam) for fam in families] \
            + [(f"  campaigns over {s} accounts", lambda r, s=s: r["size"] == s) for s in sorted({c['size'] for c in cam_rows})]:
        cells = []
        for f, t in th.items():
            grp = [c for c in cam_rows if sel(c)]
            k = sum(cscore[c["account"]] >= t for c in grp)
            cells.append(rate(k, len(grp)))
            out.setdefault(label.strip(), {})[f] = [k, len(grp)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return out


MMD_SAMPLE = dict(per=8, ref=200, cal=500, chat=400, per_campaign=10)


def mmd_sample(rows: list[dict], n_chat: int, per_campaign: int) -> list[dict]:
    """The test accounts the baseline scores (embedding every query is hours on this machine):
    every non-chat benign account, `n_chat` chat users, and up to `per_campaign` accounts of each
    campaign, drawn with a fixed seed."""
    rng = np.random.default_rng(1)
    chat = [r for r in rows if r["kind"] == "chat"]
    keep = [r for r in rows if not r["attack"] and r["kind"] != "chat"]
    keep += [chat[i] for i in sorted(rng.choice(len(chat), min(n_chat, len(chat)), replace=False))]
    camps: dict[str, list[dict]] = {}
    for r in rows:
        if r["attack"]:
            camps.setdefault(r["campaign"], []).append(r)
    for m in camps.values():
        keep += [m[i] for i in sorted(rng.choice(len(m), min(per_campaign, len(m)), replace=False))]
    return keep


def mmd_scores(work: Path, test_rows: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """Baseline: per account, MMD^2 of up to `per` embedded queries against a benign reference
    (`ref` benign tuning accounts); thresholds from `cal` other benign tuning accounts against the
    same reference. Embeddings are cached on disk by prompt hash (work/mmd-embeddings.safetensors)."""
    from stillhouse.guard import mmd

    cfg = MMD_SAMPLE
    t = time.perf_counter()
    tune_truth = simulate(TUNE, work / "tune-text", log_text=True)  # the tuning traffic again, now with text

    def texts(log: Path, accounts: set[str]) -> dict[str, list[str]]:
        con = open_log(log)
        rows = con.sql(f"""SELECT account, prompt_text FROM requests WHERE account IS NOT NULL
                          QUALIFY row_number() OVER (PARTITION BY account ORDER BY hash(prompt_sha256)) <= {cfg['per']}""").fetchall()
        by: dict[str, list[str]] = {}
        for a, x in rows:
            if a in accounts:
                by.setdefault(a, []).append(x)
        return by

    rng = np.random.default_rng(0)
    benign_tune = [r["account"] for r in tune_truth.to_pylist() if not r["attack"]]
    rng.shuffle(benign_tune)
    ref_accts, cal_accts = benign_tune[: cfg["ref"]], benign_tune[cfg["ref"] : cfg["ref"] + cfg["cal"]]
    tune_txt = texts(work / "tune-text", set(ref_accts + cal_accts))
    test_txt = texts(work / "test", {r["account"] for r in test_rows})
    enc = mmd.load_encoder()
    need = [x for v in tune_txt.values() for x in v] + [x for v in test_txt.values() for x in v]
    vec = mmd.embed(enc, need, cache=work / "mmd-embeddings.safetensors")
    print(f"MMD baseline: {len(vec):,} distinct queries of {len(test_txt):,} test and {len(tune_txt):,} tuning accounts "
          f"embedded in {time.perf_counter() - t:.0f}s (cached)", flush=True)
    ref = np.stack([vec[x] for a in ref_accts for x in tune_txt[a]])
    sigma = mmd.bandwidth(ref)
    yy = mmd.self_term(ref, sigma)
    cal = np.array([mmd.mmd2(np.stack([vec[x] for x in tune_txt[a]]), ref, sigma, yy) for a in cal_accts])
    th = thresholds_from(cal)
    score = {a: mmd.mmd2(np.stack([vec[x] for x in v]), ref, sigma, yy) for a, v in test_txt.items()}
    return score, th


def plot(rows: list[dict], best: dict[str, float], th: dict[str, float], path: Path, base=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    bins = np.linspace(0, 1, 51)
    ben = [best[r["account"]] for r in rows if not r["attack"]]
    ax.hist(ben, bins=bins, alpha=0.6, label=f"benign accounts ({len(ben):,})", color="tab:blue", log=True)
    for fam, colour in zip(S.FAMILIES, ["tab:red", "tab:orange", "tab:purple", "tab:brown", "black"]):
        v = [best[r["account"]] for r in rows if r["kind"] == fam]
        ax.hist(v, bins=bins, histtype="step", lw=1.6, label=f"{fam} ({len(v):,})" + (" [unseen in tuning]" if fam == "adaptive" else ""), color=colour, log=True)
    ax.axvline(th["0.3%"], ls="--", color="grey", label="threshold at 0.3% tuning FPR")
    ax.set_xlabel("account score (worst daily window)")
    ax.set_ylabel("accounts (log scale)")
    ax.set_title("guard analyze on the test split (bench/guard.py --eval)")
    ax.legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ------------------------------------------------------------------ scale
def synth_log(n: int, out: Path, seed: int = 0) -> None:
    """n requests in the schema, fast: ~n/60 accounts, 5% of them in a few template campaigns;
    signatures drawn from a pool of real ones (the analysis cost does not depend on their text)."""
    rng = np.random.default_rng(seed)
    pool_txt = S.public_prompts()
    camp_txt = [S.COVERAGE_TEMPLATES[i % 3].format(a=a, f=f, l=l) for i, (a, f, l) in enumerate(
        (a, f, l) for f in S.FIELDS for a in S.ASPECTS for l in S.LEVELS)]
    pool = L.prompt_signatures(pool_txt) + L.prompt_signatures(camp_txt)
    n_pool = len(pool_txt)
    n_acc = max(10, n // 60)
    days = 7
    if out.exists():
        import shutil

        shutil.rmtree(out)
    chunk = 1_000_000
    sig_arr = np.array(pool, dtype=object)
    ua = np.array(S.COMMON_UA + ["python-requests/2.32.3"], dtype=object)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        acc = rng.zipf(1.3, size=m) % n_acc
        attack = acc < n_acc // 20
        ts = np.sort(S.T0 + rng.uniform(0, days * S.DAY, size=m))
        idx = np.where(attack, n_pool + rng.integers(0, len(camp_txt), size=m), rng.integers(0, n_pool, size=m))
        table = pa.table({
            "ts": ts, "account": pa.array([f"acct-{a:07d}" for a in acc]), "org": pa.array([f"org-{a:07d}" for a in acc]),
            "key_id": pa.array([f"{a:08x}" for a in acc]), "route": pa.array(np.where(rng.random(m) < 0.1, "completions", "chat")),
            "model": pa.array(["teacher-1"] * m), "prompt_sha256": pa.array([f"{i:064x}" for i in idx]),
            "prompt_sig": pa.array(sig_arr[idx].tolist(), type=pa.binary()), "prompt_chars": rng.integers(20, 2000, size=m).astype(np.int32),
            "system_sha256": pa.nulls(m, pa.string()), "probe": pa.array(np.where(rng.random(m) < 0.01, "reasoning", "")),
            "prompt_tokens": rng.integers(5, 500, size=m).astype(np.int32), "completion_tokens": rng.integers(5, 800, size=m).astype(np.int32),
            "withheld_tokens": np.zeros(m, np.int32), "n": np.ones(m, np.int16), "max_tokens": rng.choice([256, 1024, 4096], size=m).astype(np.int32),
            "temperature": rng.choice([0.0, 0.7, 1.0], size=m).astype(np.float32), "top_logprobs": np.where(rng.random(m) < 0.05, 5, 0).astype(np.int16),
            "echo": rng.random(m) < 0.01, "stream": rng.random(m) < 0.5, "user_agent": pa.array(ua[acc % len(ua)].tolist()),
            "param_shape": pa.array(["max_tokens,messages,model,temperature"] * m), "client_ip": pa.nulls(m, pa.string()),
            "status": np.full(m, 200, np.int16), "outcome": pa.array(["ok"] * m), "latency_ms": rng.uniform(50, 2000, size=m).astype(np.float32),
            "prompt_text": pa.nulls(m, pa.string()),
        }, schema=L.ARROW_SCHEMA)
        days_col = (ts * 1000).astype("datetime64[ms]").astype("datetime64[D]")
        for d in np.unique(days_col):
            part = out / f"day={d}"
            part.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.filter(pa.array(days_col == d)), part / f"part-{lo // chunk:04d}.parquet")


def scale(work: Path, sizes: list[int]) -> None:
    print("| requests | accounts | analyse wall time | peak RSS | ms per 1k requests |")
    print("|---|---|---|---|---|")
    for n in sizes:
        log = work / f"scale-{n}"
        t = time.perf_counter()
        synth_log(n, log)
        gen = time.perf_counter() - t
        cmd = [sys.executable, "-m", "stillhouse.cli", "guard", "analyze", str(log), "--json", str(work / f"scale-{n}.json"), "--quiet"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        if status != 0:
            print(f"| {n:,} | analyse failed (status {status}) |")
            continue
        acc = json.loads((work / f"scale-{n}.json").read_text())["summary"]["accounts"]
        print(f"| {n:,} | {acc:,} | {wall:.1f} s | {usage.ru_maxrss / 1024:.0f} MiB | {1000 * wall / n * 1000:.1f} |  (log written in {gen:.0f}s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--no-baseline", action="store_true", help="skip the MMD baseline (it embeds ~100k queries)")
    ap.add_argument("--scale", type=int, nargs="*")
    ap.add_argument("--work", type=Path, default=Path("/tmp/stillhouse-bench-guard"))
    ap.add_argument("--picture", type=Path, default=ROOT / "docs" / "guard-scores.png")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.tune:
        tune(a.work)
    if a.validate:
        validate(a.work)
    if a.eval:
        evaluate(a.work, baseline=not a.no_baseline, picture=a.picture)
    if a.scale:
        scale(a.work, a.scale)


if __name__ == "__main__":
    main()
