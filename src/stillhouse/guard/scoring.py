"""From features to a score and reasons in words, calibrated on benign traffic only.

No attack family is ever fitted. For each group of evidence (GROUPS) the detector measures how
far an account's window lies from the nearest benign window of the *tuning split*, in a space
where every feature is scaled by its benign spread and a value below the benign median counts
as the median (ONE_SIDED: fewer probes, less sharing, lower volume are never evidence). Each
group's distance is divided by its own benign 99th percentile (out-of-fold: a benign account is
never its own neighbour), and the account's statistic is its largest such ratio over groups and
windows. Thresholds are benign-account quantiles of that statistic, also out-of-fold, at the
false-positive rates bench/guard.py reports (calibrate(); bench/guard.py --tune writes them and
the tuning features to guard/tuning/). Because nothing is learned from attackers, every family
of the tuning split is as unseen to the detector as the test split's adaptive one.

The score shown is stat / (1 + stat): 0.5 is one unit out on its strongest evidence (the unit is
that group's benign 99th percentile or GROUP_FLOOR benign spreads, whichever is larger), and it
only grows from there.

Reasons are model-free: the features where an account lies beyond the 99th percentile of the
benign tuning accounts, most extreme first, each said in words.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import StillhouseError
from .clusters import CLUSTER_FEATURES, TEMPLATE_FEATURES
from .features import WINDOW_FEATURES

ACCOUNT_FEATURES = ["signup_burst"]  # log1p(peers first seen with its fingerprint within 30 min) - log1p(expected)
FEATURES = WINDOW_FEATURES + ACCOUNT_FEATURES + TEMPLATE_FEATURES + CLUSTER_FEATURES
# Features where only "more than usual" is evidence: below the benign median they count as the
# median. The two others (how distinct an account's prompts are, how long) are odd either way.
ONE_SIDED = [f for f in FEATURES if f not in ("distinct_prompts", "log_prompt_chars")]
# Smallest spread a feature is scaled by: shares move in steps of 0.1, logs in steps of 0.5, so
# a feature that never moves in benign traffic (reasoning probes) does not make 1% a verdict.
FLOOR = {f: 0.5 if f.startswith("log_") or f in ("signup_burst", "skeleton_reach", "cluster_size", "cluster_signups") else 0.1
         for f in FEATURES}
FOLDS = 5         # out-of-fold calibration: benign accounts in 5 folds, each scored against the other 4
GROUP_SCALE = 0.99  # a group's distances are divided by this benign quantile of them ...
GROUP_FLOOR = 1.0   # ... or by this many units, if larger: a group in which 99% of benign accounts sit
                    # exactly on a benign neighbour (actor clusters) would otherwise call any step a verdict
LOCAL_FLOOR = 1.0  # distances are in units of the benign neighbour's own spacing (its distance to its nearest
                   # benign neighbour), or of one benign spread where the spacing is smaller (dense chat
                   # traffic): a rare benign persona (30 researchers) is sparse, and being as far from one of
                   # them as they are from each other is not unusual (a local outlier factor with k = 1)
REFERENCE = 4000  # benign windows kept as neighbours (a fixed sample): cost grows with it, not with the tuning split

# Evidence groups, each measured on its own; an account is as suspicious as its strongest
# evidence. One distance over everything lets twenty ordinary features drown one extreme one;
# per-group distances keep every kind of evidence in play, and "all evidence" adds the
# combinations no single group shows (harvesting parameters of an eval harness, without its
# shared benchmark prompts).
GROUPS = {
    "volume and timing": ["log_requests", "hours_active", "gap_regularity", "limited_share"],
    "prompt content": ["probe_reasoning", "probe_system", "probe_identity", "log_prompt_chars", "distinct_prompts"],
    "harvesting parameters": ["logprob_share", "echo_share", "short_output", "long_output"],
    "shared templates": ["template_self", "template_shared", "exact_shared", "skeleton_reach", "distinct_prompts"],
    "actor cluster": ["cluster_size", "cluster_novelty", "cluster_fingerprint", "cluster_signups", "signup_burst"],
    "all evidence": None,  # every feature
}
TUNING_DIR = Path(__file__).parent / "tuning"

REASONS = {
    "log_requests": "{requests:,} requests in one window",
    "hours_active": "active in {hours_active:.0%} of the window's hours",
    "gap_regularity": "machine-regular timing (gap regularity {gap_regularity:.2f})",
    "distinct_prompts": "{distinct_prompts:.0%} of prompts distinct",
    "log_prompt_chars": "unusual prompt length",
    "probe_reasoning": "{probe_reasoning:.0%} of prompts ask for hidden reasoning",
    "probe_system": "{probe_system:.0%} of prompts probe the system prompt",
    "probe_identity": "{probe_identity:.0%} of prompts probe the model's identity",
    "logprob_share": "{logprob_share:.0%} of requests harvest top log-probs",
    "echo_share": "{echo_share:.0%} of requests echo prompt log-probs",
    "short_output": "{short_output:.0%} of requests ask for <= 16 tokens (distribution harvesting)",
    "long_output": "{long_output:.0%} of requests ask for >= 4096 tokens",
    "limited_share": "{limited_share:.0%} of requests hit rate limits or quotas",
    "signup_burst": "first seen in a burst of accounts with the same client fingerprint",
    "template_self": "{template_self:.0%} of prompts fill its own templates",
    "template_shared": "{template_shared:.0%} of prompts use a skeleton shared with other accounts",
    "exact_shared": "{exact_shared:.0%} of prompts sent verbatim by other accounts",
    "skeleton_reach": "its prompt skeletons are shared with ~{reach_others:,} other accounts on average",
    "cluster_size": "tied by shared skeletons to {cluster_others:,} other accounts",
    "cluster_novelty": "its cluster never repeats a prompt (novelty {cluster_novelty:.2f}): systematic coverage",
    "cluster_fingerprint": "{cluster_fingerprint:.0%} of its cluster share one client fingerprint",
    "cluster_signups": "its cluster's accounts signed up in a burst",
}


class Envelope:
    """The benign envelope: scaling, and per group the benign windows to measure distance to."""

    def __init__(self, benign: np.ndarray):
        self.median = np.median(benign, axis=0)
        spread = np.quantile(benign, 0.99, axis=0) - self.median
        self.scale = np.maximum(spread, np.array([FLOOR[f] for f in FEATURES]))
        self.one_sided = np.array([f in ONE_SIDED for f in FEATURES])
        ref = self.z(benign)
        if len(ref) > REFERENCE:  # a fixed sample, not the first rows: the tuning split is sorted by account
            ref = ref[np.random.default_rng(0).choice(len(ref), REFERENCE, replace=False)]
        self.nn = {}
        with _one_thread():
            from sklearn.neighbors import NearestNeighbors

            for name, idx in _group_index().items():
                pts = np.unique(ref[:, idx], axis=0)
                nn = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(pts)
                # each benign window's own spacing: distance to its nearest other benign window
                spacing = nn.kneighbors(pts, n_neighbors=min(2, len(pts)))[0][:, -1]
                self.nn[name] = (idx, nn, np.maximum(spacing, LOCAL_FLOOR))

    def z(self, X: np.ndarray) -> np.ndarray:
        X = np.where(self.one_sided, np.maximum(X, self.median), X)
        return (X - self.median) / self.scale

    def distances(self, X: np.ndarray) -> np.ndarray:
        """(rows, groups): distance of each row to the nearest benign window, per group, in units
        of that window's own spacing from its benign neighbours (at least LOCAL_FLOOR)."""
        if len(X) == 0:
            return np.zeros((0, len(self.nn)))
        Z = self.z(X)
        out = []
        with _one_thread():
            for idx, nn, spacing in self.nn.values():
                d, j = nn.kneighbors(Z[:, idx])
                out.append(d[:, 0] / spacing[j[:, 0]])
        return np.column_stack(out)


class Detector:
    """The benign envelope of the tuning split, its per-group scales and thresholds, and the
    benign percentiles that phrase reasons."""

    def __init__(self, table: pa.Table, meta: dict):
        benign = matrix(table.filter(pc.invert(table["attack"])))
        self.envelope = Envelope(benign)
        self.group_scale = np.array([meta["group_scale"][g] for g in GROUPS])
        self.thresholds: dict[str, float] = meta["thresholds"]
        self.default_fpr: str = meta["default_fpr"]
        self.p99 = np.quantile(benign, 0.99, axis=0)
        self.spread = np.maximum(self.p99 - np.quantile(benign, 0.5, axis=0), 1e-6)

    @property
    def threshold(self) -> float:
        return self.thresholds[self.default_fpr]

    def ratios(self, table: pa.Table) -> np.ndarray:
        """(rows, groups): distance from the benign envelope over that group's benign 99th percentile."""
        return self.envelope.distances(matrix(table)) / self.group_scale

    def score(self, table: pa.Table) -> np.ndarray:
        return self.score_and_evidence(table)[0]

    def score_and_evidence(self, table: pa.Table) -> tuple[np.ndarray, list[str]]:
        """Each row's score, and the evidence group whose distance gave it."""
        if table.num_rows == 0:
            return np.zeros(0), []
        r = self.ratios(table)
        names = list(GROUPS)
        return to_score(r.max(axis=1)), [names[i] for i in r.argmax(axis=1)]

    def reasons(self, row: dict, limit: int = 4) -> list[str]:
        x = np.array([row[f] for f in FEATURES], dtype=float)
        over = (x - self.p99) / self.spread
        # only the directions that mean abuse: more probing, sharing, volume, regularity (never "too few prompts")
        said = [i for i in np.argsort(-over) if over[i] > 0 and FEATURES[i] in ONE_SIDED]
        words = {**row, "cluster_others": int(round(np.expm1(row["cluster_size"]))),
                 "reach_others": int(round(np.expm1(row["skeleton_reach"])))}
        return [REASONS[FEATURES[i]].format(**words) for i in said[:limit]]


def to_score(stat: np.ndarray) -> np.ndarray:
    """Largest group ratio -> [0, 1): 0.5 at one unit out on the strongest group."""
    return stat / (1.0 + stat)


def calibrate(table: pa.Table, fprs: dict[str, float]) -> tuple[dict, np.ndarray]:
    """Out-of-fold benign calibration from a tuning table (rows: account windows; `attack` is
    read only to pick the benign rows). Returns the meta (per-group scales, thresholds at each
    benign-account FPR in `fprs`) and every row's out-of-fold score, for reporting."""
    acc = np.asarray(table["account"].to_pylist())
    attack = np.asarray(table["attack"].to_pylist(), dtype=bool)
    X = matrix(table)
    ben_accounts = np.unique(acc[~attack])
    fold_of = dict(zip(ben_accounts, np.random.default_rng(0).permutation(len(ben_accounts)) % FOLDS))
    fold = np.array([fold_of.get(a, -1) for a in acc])
    dist = np.zeros((len(X), len(GROUPS)))
    for k in range(FOLDS):
        env = Envelope(X[~attack & (fold != k)])
        rows = (fold == k) | (attack & (np.arange(len(X)) % FOLDS == k))  # attackers: each once, for the report
        dist[rows] = env.distances(X[rows])
    scale = np.maximum(np.quantile(dist[~attack], GROUP_SCALE, axis=0), GROUP_FLOOR)
    score = to_score((dist / scale).max(axis=1))
    best: dict[str, float] = {}
    for a, s in zip(acc, score):
        best[a] = max(best.get(a, -1.0), float(s))
    benign = np.array([best[a] for a in ben_accounts])
    return {"group_scale": dict(zip(GROUPS, scale.tolist())), "thresholds": thresholds_at(benign, fprs)}, score


def thresholds_at(benign_scores: np.ndarray, fprs: dict[str, float]) -> dict[str, float]:
    """Lowest threshold flagging at most floor(fpr * n) benign accounts (flag = score >= t)."""
    s = np.sort(benign_scores)[::-1]
    out = {}
    for name, f in fprs.items():
        k = int(np.floor(f * len(s)))
        out[name] = float(np.nextafter(s[k], 2.0)) if k < len(s) else 0.0
    return out


def _group_index() -> dict[str, list[int]]:
    return {name: [FEATURES.index(c) for c in (cols or FEATURES)] for name, cols in GROUPS.items()}


def _one_thread():
    """One BLAS/OpenMP thread: on a shared 2-core machine threads contend and a query takes many
    times longer than on one thread."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def matrix(table: pa.Table) -> np.ndarray:
    return np.column_stack([np.nan_to_num(table[f].to_numpy(zero_copy_only=False).astype(float)) for f in FEATURES])


@lru_cache(maxsize=1)
def load_detector(directory: str | None = None) -> Detector:
    """The detector fitted on the tuning split shipped in guard/tuning/ (or `directory`)."""
    import pyarrow.parquet as pq

    d = Path(directory) if directory else TUNING_DIR
    try:
        table = pq.read_table(d / "features.parquet")
        meta = json.loads((d / "thresholds.json").read_text())
    except (OSError, ValueError) as e:
        raise StillhouseError(f"{d}: no tuned detector ({e}); run bench/guard.py --tune") from None
    missing = [f for f in FEATURES + ["attack"] if f not in table.column_names]
    if missing or "group_scale" not in meta:
        raise StillhouseError(f"{d}: tuning table lacks {', '.join(missing) or 'group scales'}; rerun bench/guard.py --tune")
    return Detector(table, meta)
