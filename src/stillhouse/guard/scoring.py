"""From features to a score in [0, 1] and reasons in words.

The score is the largest of several scikit-learn HistGradientBoostingClassifiers, one per
group of evidence (GROUPS), fitted on the *tuning split* of the simulated traffic (bench/guard.py --tune writes its feature table to guard/tuning/), with
monotone constraints: more probing, more shared skeletons, a bigger or burstier cluster can
only raise a score, so the model cannot learn that a signal of abuse is a sign of innocence
from the quirks of one simulation. Thresholds were fixed there too, from out-of-fold scores
(grouped by actor), at the benign false-positive rates bench/guard.py reports.

Reasons are model-free: the features where an account lies beyond the 99th percentile of the
benign tuning accounts, most extreme first, each said in words.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import StillhouseError
from .clusters import CLUSTER_FEATURES, TEMPLATE_FEATURES
from .features import WINDOW_FEATURES

ACCOUNT_FEATURES = ["signup_burst"]  # log1p(peers first seen with its fingerprint within 30 min) - log1p(expected)
FEATURES = WINDOW_FEATURES + ACCOUNT_FEATURES + TEMPLATE_FEATURES + CLUSTER_FEATURES
# +1: higher can only mean more suspicious; 0: either way (volume, timing, prompt length, distinctness)
MONOTONE = {f: 1 for f in FEATURES} | {f: 0 for f in ("log_requests", "hours_active", "gap_regularity", "distinct_prompts", "log_prompt_chars", "long_output")}

_HIGH_IS_ODD = ("log_requests", "hours_active", "gap_regularity")
# Evidence groups, each scored by its own model; an account is as suspicious as its strongest
# evidence. A single model over everything learns the easiest tell of each family seen in tuning
# (e.g. max_tokens) and ignores the rest; per-group models keep every kind of evidence in play,
# which is what carries over to a family tuning never saw.
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


class Detector:
    """The fitted model, its thresholds and the benign percentiles that phrase reasons."""

    def __init__(self, table: pa.Table, meta: dict):
        X = matrix(table)
        y = np.asarray(table["attack"].to_pylist(), dtype=int)
        self.model = make_model().fit(X, y)
        self.thresholds: dict[str, float] = meta["thresholds"]
        self.default_fpr: str = meta["default_fpr"]
        benign = X[y == 0]
        self.p99 = np.quantile(benign, 0.99, axis=0)
        self.spread = np.maximum(np.quantile(benign, 0.99, axis=0) - np.quantile(benign, 0.5, axis=0), 1e-6)

    @property
    def threshold(self) -> float:
        return self.thresholds[self.default_fpr]

    def score(self, table: pa.Table) -> np.ndarray:
        if table.num_rows == 0:
            return np.zeros(0)
        return self.model.predict_proba(matrix(table))[:, 1]

    def strongest(self, table: pa.Table) -> list[str]:
        """The evidence group whose model gave each row its score."""
        return self.model.strongest(matrix(table))

    def reasons(self, row: dict, limit: int = 4) -> list[str]:
        x = np.array([row[f] for f in FEATURES], dtype=float)
        over = (x - self.p99) / self.spread
        # only the directions that mean abuse: more probing, sharing, volume, regularity (never "too few prompts")
        said = [i for i in np.argsort(-over) if over[i] > 0 and (MONOTONE[FEATURES[i]] == 1 or FEATURES[i] in _HIGH_IS_ODD)]
        words = {**row, "cluster_others": int(round(np.expm1(row["cluster_size"]))),
                 "reach_others": int(round(np.expm1(row["skeleton_reach"])))}
        return [REASONS[FEATURES[i]].format(**words) for i in said[:limit]]


class GroupMax:
    """One monotone gradient-boosted model per evidence group; the score is the largest."""

    def __init__(self):
        self.models: dict[str, object] = {}

    def fit(self, X: np.ndarray, y: np.ndarray) -> "GroupMax":
        with _one_thread():
            return self._fit(X, y)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> "GroupMax":
        from sklearn.ensemble import HistGradientBoostingClassifier

        for name, cols in GROUPS.items():
            idx = [FEATURES.index(c) for c in (cols or FEATURES)]
            m = HistGradientBoostingClassifier(
                max_iter=150, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=20, l2_regularization=1.0,
                monotonic_cst=[MONOTONE[FEATURES[i]] for i in idx], class_weight="balanced", random_state=0)
            self.models[name] = (idx, m.fit(X[:, idx], y))
        return self

    def _all(self, X: np.ndarray) -> np.ndarray:
        with _one_thread():
            return np.column_stack([m.predict_proba(X[:, idx])[:, 1] for idx, m in self.models.values()])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        p = self._all(X).max(axis=1)
        return np.column_stack([1 - p, p])

    def strongest(self, X: np.ndarray) -> list[str]:
        names = list(self.models)
        return [names[i] for i in self._all(X).argmax(axis=1)]


def _one_thread():
    """sklearn's boosting runs OpenMP per tree; on a shared 2-core machine the threads contend and a
    predict takes 10x longer than on one thread (measured: 107 s vs 12 s to fit the tuning split)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="openmp")


def make_model() -> GroupMax:
    return GroupMax()


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
    missing = [f for f in FEATURES if f not in table.column_names]
    if missing:
        raise StillhouseError(f"{d}: tuning table lacks {', '.join(missing)}; rerun bench/guard.py --tune")
    return Detector(table, meta)
