"""`stillhouse guard analyze LOG`: rank accounts and clusters of accounts by how much their
traffic looks like an extraction campaign, with the reasons in words. It flags; it never bans.

Pipeline: the log (SQLite or day-partitioned Parquet, logsource.py) -> per (account, window)
behaviour in DuckDB (features.py) + sign-up bursts per client fingerprint (features.py) +
shared prompt skeletons and the actor clusters they imply (clusters.py) -> a score per
(account, window): how far it lies outside the benign traffic of the tuning split (scoring.py);
an account's score is its worst window, a cluster's the mean of its accounts'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .clusters import template_analysis
from .features import account_profile, parse_window, window_features
from .logsource import open_log
from .scoring import FEATURES, Detector, load_detector


@dataclass
class Analysis:
    accounts: list[dict]  # ranked, highest score first
    clusters: list[dict]  # clusters of >= 2 accounts, ranked
    summary: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"summary": self.summary, "accounts": self.accounts, "clusters": self.clusters}


def feature_table(con, window: float | None) -> pa.Table:
    """One row per (account, window): identifiers, `requests`, `cluster` and every scoring feature."""
    win = window_features(con, window)
    prof = account_profile(con)
    tmpl = template_analysis(con, prof)
    burst = pc.subtract(pc.ln(pc.add(pc.cast(prof["signup_peers"], pa.float64()), 1.0)),
                        pc.ln(pc.add(pc.cast(prof["signup_expected"], pa.float64()), 1.0)))
    acct = pa.table({"account": prof["account"], "org": prof["org"], "fingerprint": prof["fingerprint"],
                     "first_seen": prof["first_seen"], "signup_burst": burst}).join(tmpl, "account")
    return win.join(acct, "account").sort_by([("account", "ascending"), ("window_start", "ascending")])


def analyze(log: str | Path, window: str | None = "1d", detector: Detector | None = None,
            threshold: float | None = None, top: int | None = None) -> Analysis:
    t_start = time.perf_counter()
    detector = detector or load_detector()
    cut = detector.threshold if threshold is None else threshold
    con = open_log(log)
    feats = feature_table(con, parse_window(window))
    scores, evidence = detector.score_and_evidence(feats)
    rows = feats.to_pylist()
    for r, g in zip(rows, evidence):
        r["evidence"] = g
    best: dict[str, tuple[float, dict]] = {}
    for s, r in zip(scores, rows):
        if r["account"] not in best or s > best[r["account"]][0]:
            best[r["account"]] = (float(s), r)
    accounts = []
    for name, (s, r) in best.items():
        accounts.append({
            "account": name, "org": r["org"], "score": round(s, 4), "flagged": s >= cut,
            "window_start": r["window_start"], "requests": r["requests"], "cluster": int(r["cluster"]),
            "evidence": r["evidence"],  # the evidence group whose model gave the score
            "reasons": detector.reasons(r) if s >= cut or top else detector.reasons(r, limit=2),
            "features": {f: round(float(r[f]), 4) for f in FEATURES},
            "fingerprint": r["fingerprint"],
        })
    accounts.sort(key=lambda a: (-a["score"], a["account"]))
    clusters = cluster_summaries(accounts, cut)
    n_rows = con.execute("SELECT count(*) FROM requests").fetchall()[0][0]
    summary = {
        "log": str(log), "requests": n_rows, "accounts": len(accounts), "window": window or "all",
        "threshold": cut, "threshold_fpr": detector.default_fpr if threshold is None else None,
        "flagged_accounts": sum(a["flagged"] for a in accounts),
        "flagged_clusters": sum(c["flagged"] for c in clusters),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    con.close()
    if top:
        accounts = accounts[:top]
    return Analysis(accounts, clusters, summary)


def cluster_summaries(accounts: list[dict], cut: float) -> list[dict]:
    """Clusters of >= 2 accounts tied by shared skeletons: mean score, and why in words."""
    by: dict[int, list[dict]] = {}
    for a in accounts:
        by.setdefault(a["cluster"], []).append(a)
    out = []
    for cid, members in by.items():
        if len(members) < 2:
            continue
        s = float(np.mean([m["score"] for m in members]))
        f = members[0]["features"]
        fps = {}
        for m in members:
            fps[m["fingerprint"]] = fps.get(m["fingerprint"], 0) + 1
        fp, fp_n = max(fps.items(), key=lambda kv: kv[1])
        reasons = [f"{len(members):,} accounts share prompt skeletons",
                   f"{sum(m['requests'] for m in members):,} requests in their worst windows together"]
        if f["cluster_novelty"] > 0.9:
            reasons.append(f"they almost never repeat a prompt (novelty {f['cluster_novelty']:.2f}): systematic coverage")
        if fp_n / len(members) >= 0.5:
            reasons.append(f"{fp_n / len(members):.0%} share the client fingerprint '{fp[:60]}'")
        if f["cluster_signups"] > 1.0:
            reasons.append("their accounts signed up in a burst")
        for key, words in (("probe_reasoning", "ask for hidden reasoning"), ("logprob_share", "harvest log-probs"),
                           ("probe_system", "probe the system prompt"), ("probe_identity", "probe the model's identity")):
            share = float(np.mean([m["features"][key] for m in members]))
            if share >= 0.2:
                reasons.append(f"{share:.0%} of their prompts {words}")
        out.append({"cluster": cid, "accounts": len(members), "score": round(s, 4), "flagged": s >= cut,
                    "flagged_accounts": sum(m["flagged"] for m in members), "reasons": reasons,
                    "members": [m["account"] for m in members[:20]]})
    out.sort(key=lambda c: (-c["score"], -c["accounts"]))
    return out
