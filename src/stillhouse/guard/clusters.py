"""Shared prompt skeletons and the accounts they tie into one actor.

Locality-sensitive hashing over the stored MinHash signatures, the scheme of datasketch's
MinHashLSH (b bands of r rows; two prompts are candidates when one band matches exactly),
done as one vectorised group-by rather than a Python index, so that it runs over millions of
rows. tests/test_guard_analyze.py checks it finds the pairs datasketch's MinHashLSH finds.

Each account contributes a deterministic sample of at most SAMPLE distinct prompts: cost grows
with accounts, not requests, and an account's template habits show in 64 prompts.
A bucket (band, key) is a *skeleton* when it holds at least MIN_PROMPTS distinct prompts, nearly
all of them sent once (NOVEL);
an account *uses* a skeleton when at least two of its own distinct prompts fall in it (one
prompt may be a coincidence, two are a template), or when one does and at least SHARED accounts
use that skeleton: a hydra's accounts may each fill one of its many skeletons only once (an
attacker with more paraphrase skeletons than prompts per account), and one prompt in a skeleton
that many accounts fill is no longer a coincidence. Accounts that use a common skeleton are
joined (connected components over the account-skeleton graph): one actor, even when each
account stays under its limits. An account most of whose prompts fill buckets of its own (its
own script) is its own actor and joins no cluster.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from . import log_schema as L

BANDS, ROWS = 16, 4  # 16 x 4 = SIGNATURE_PERM; a pair at Jaccard 0.5 collides with p = 1-(1-0.5^4)^16 = 0.64
SAMPLE = 64          # distinct prompts per account that enter template analysis
MIN_PROMPTS = 8      # distinct prompts that make a bucket a skeleton, not one popular prompt and its few variants
NOVEL = 0.8          # ... of which at least this share are sent by one account only: a template filled
                     # afresh each time, not a popular prompt (or benchmark item) many accounts send
SHARED = 3           # accounts that make a prompt or skeleton "shared" (and let one prompt tie an account to a skeleton)
PRIVATE = 0.9        # a bucket is an account's own when it holds >= 2 of its prompts and at least this share of the bucket's distinct prompts
OWN = 0.5            # an account with at least this share of its prompts in skeletons of its own is its own actor

TEMPLATE_FEATURES = [
    "template_self",    # share of the account's prompts that share a skeleton with another of its own prompts
    "template_shared",  # share of its prompts in a skeleton used by >= SHARED accounts
    "exact_shared",     # share of its prompts sent verbatim by >= SHARED accounts
    "skeleton_reach",   # mean over its prompts of log1p(other accounts in the prompt's widest skeleton): hydra breadth
]
CLUSTER_FEATURES = [
    "cluster_size",     # log1p(accounts tied to this one by shared skeletons), 0 alone
    "cluster_novelty",  # distinct prompts / prompts across the cluster (coverage: every prompt new), 0 alone
    "cluster_fingerprint",  # share of the cluster's other accounts with its most common client fingerprint, 0 alone
    "cluster_signups",  # log1p(other accounts first seen per hour of the cluster's sign-up span), 0 alone
]


def band_keys(sigs: np.ndarray) -> np.ndarray:
    """(n, 64) uint32 signatures -> (n, BANDS) uint64 bucket keys, one per band of ROWS values."""
    s = sigs.reshape(len(sigs), BANDS, ROWS).astype(np.uint64)
    mult = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], dtype=np.uint64)
    with np.errstate(over="ignore"):
        return (s * mult[:ROWS]).sum(axis=2, dtype=np.uint64) ^ (s[:, :, 0] << np.uint64(32))


def sample_prompts(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """account, h (prompt hash), sig: at most SAMPLE distinct prompts per account, chosen by hash."""
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE pick AS
        SELECT account, h FROM (SELECT DISTINCT account, hash(prompt_sha256) AS h FROM requests
                                WHERE account IS NOT NULL AND prompt_sig IS NOT NULL)
        QUALIFY row_number() OVER (PARTITION BY account ORDER BY h) <= {SAMPLE}"""
    )
    return con.sql(
        """SELECT r.account, hash(r.prompt_sha256) AS h, any_value(r.prompt_sig) AS sig
           FROM requests r SEMI JOIN pick p ON r.account = p.account AND hash(r.prompt_sha256) = p.h
           GROUP BY ALL ORDER BY r.account, h"""
    ).to_arrow_table()


def template_analysis(con: duckdb.DuckDBPyConnection, profile: pa.Table) -> pa.Table:
    """account, TEMPLATE_FEATURES, template_own (share of its prompts in buckets of its own; not
    scored, it decides who joins clusters), cluster id and CLUSTER_FEATURES."""
    smp = sample_prompts(con)
    accounts = profile["account"].to_pylist()
    index = {a: i for i, a in enumerate(accounts)}
    acc = np.array([index[a] for a in smp["account"].to_pylist()], dtype=np.int64)
    h = smp["h"].to_numpy().astype(np.uint64)
    blobs = smp["sig"].to_pylist()
    ok = np.array([b is not None and len(b) == 4 * L.SIGNATURE_PERM for b in blobs])
    sigs = np.frombuffer(b"".join(b for b, k in zip(blobs, ok) if k), dtype="<u4").reshape(-1, L.SIGNATURE_PERM)
    acc, h = acc[ok], h[ok]
    keys = band_keys(sigs)
    n = len(acc)
    bands = pa.table({
        "acc": np.repeat(acc, BANDS), "h": np.repeat(h, BANDS),
        "band": np.tile(np.arange(BANDS, dtype=np.int8), n), "key": keys.reshape(-1),
    })
    con.register("bands", bands)
    # per (account, prompt): in a skeleton it shares with its own prompts / with >= SHARED accounts
    per_prompt = con.sql(
        f"""
        WITH b AS (SELECT band, key, count(DISTINCT h) AS np, count(DISTINCT acc) AS na,
                          count(DISTINCT h) >= {MIN_PROMPTS} AND count(DISTINCT h) >= {NOVEL} * count(*) AS skel
                   FROM bands GROUP BY band, key),
             ab AS (SELECT acc, band, key, count(DISTINCT h) AS own FROM bands GROUP BY acc, band, key),
             ex AS (SELECT h, count(DISTINCT acc) AS na FROM bands WHERE band = 0 GROUP BY h)
        SELECT x.acc, x.h,
               max(CASE WHEN ab.own >= 2 THEN 1 ELSE 0 END) AS self_t,
               max(CASE WHEN b.skel AND b.na >= {SHARED} THEN 1 ELSE 0 END) AS shared_t,
               any_value(ex.na) >= {SHARED} AS exact,
               max(CASE WHEN b.skel THEN ln(b.na) ELSE 0 END) AS reach,
               max(CASE WHEN ab.own >= 2 AND ab.own >= {PRIVATE} * b.np THEN 1 ELSE 0 END) AS private_t
        FROM bands x JOIN b USING (band, key) JOIN ab USING (acc, band, key) JOIN ex USING (h)
        GROUP BY x.acc, x.h
        """
    ).to_arrow_table()
    # account -- skeleton edges: >= 2 own distinct prompts in a skeleton that >= 2 accounts use that way
    edges = con.sql(
        f"""
        WITH ab AS (SELECT acc, band, key, count(DISTINCT h) AS own FROM bands GROUP BY acc, band, key),
             b AS (SELECT band, key FROM bands GROUP BY band, key
                   HAVING count(DISTINCT h) >= {MIN_PROMPTS} AND count(DISTINCT h) >= {NOVEL} * count(*)),
             used AS (SELECT band, key, count(*) AS users FROM ab SEMI JOIN b USING (band, key) WHERE own >= 2
                      GROUP BY band, key HAVING count(*) >= 2)
        SELECT ab.acc, dense_rank() OVER (ORDER BY band, key) - 1 AS bucket FROM ab JOIN used USING (band, key)
        WHERE ab.own >= 2 OR used.users >= {SHARED}
        """
    ).to_arrow_table()
    con.unregister("bands")
    n_acc = len(accounts)

    feats = {f: np.zeros(n_acc) for f in TEMPLATE_FEATURES}
    pa_acc = per_prompt["acc"].to_numpy()
    cnt = np.bincount(pa_acc, minlength=n_acc).astype(float)

    def share(per_prompt_value: np.ndarray) -> np.ndarray:
        """Each account's mean of a per-prompt value over its sampled prompts (0 with none)."""
        return np.divide(np.bincount(pa_acc, weights=per_prompt_value, minlength=n_acc), cnt, out=np.zeros(n_acc), where=cnt > 0)
    # A prompt in a bucket of the account's own (it holds >= PRIVATE of the bucket's prompts: its own
    # script) is explained by that template; the skeletons it shares with other accounts through the
    # topic words it fills in are not a shared template, so they count for prompts without one only.
    own = per_prompt["private_t"].to_numpy().astype(float)
    for f, col in (("template_self", "self_t"), ("template_shared", "shared_t"), ("exact_shared", "exact"), ("skeleton_reach", "reach")):
        v = per_prompt[col].to_numpy().astype(float)
        if f in ("template_shared", "skeleton_reach"):
            v = v * (1.0 - own)
        feats[f] = share(v)

    # An account most of whose prompts fill a skeleton nobody else fills (a researcher's own script)
    # is its own actor. Its prompts also land in buckets that other accounts reach through the topic
    # words alone (an aspect and a level of the same topic grid); such a bucket is not a template,
    # and it must not chain the account into a campaign sweeping that grid. A campaign's accounts
    # share their templates, so none of them owns one. (Comparing shared against own-template
    # shares failed here: the more campaign traffic sweeps the grid, the more topic buckets a
    # researcher shares, so a 1,000-account campaign pulled most researchers in.)
    private = share(own)
    e_acc = edges["acc"].to_numpy()
    keep = private[e_acc] < OWN
    cluster = _components(n_acc, e_acc[keep], edges["bucket"].to_numpy()[keep])
    feats.update(_cluster_features(cluster, acc, h, profile))
    return pa.table({"account": accounts, **feats, "template_own": private, "cluster": cluster})


def _components(n_acc: int, e_acc: np.ndarray, e_bucket: np.ndarray) -> np.ndarray:
    """Connected components of the bipartite account-skeleton graph, labelled per account."""
    n_b = int(e_bucket.max()) + 1 if len(e_bucket) else 0
    g = coo_matrix((np.ones(len(e_acc)), (e_acc, n_acc + e_bucket)), shape=(n_acc + n_b, n_acc + n_b))
    _, labels = connected_components(g, directed=False)
    return labels[:n_acc].astype(np.int64)


def _cluster_features(cluster: np.ndarray, acc: np.ndarray, h: np.ndarray, profile: pa.Table) -> dict[str, np.ndarray]:
    n_acc = len(cluster)
    _, cl = np.unique(cluster, return_inverse=True)
    size = np.bincount(cl)
    # novelty: distinct prompts over sampled prompts, across the whole cluster
    pair = np.unique(np.stack([cl[acc], h.view(np.int64)], axis=1), axis=0)
    distinct = np.bincount(pair[:, 0], minlength=len(size))
    total = np.bincount(cl[acc], minlength=len(size))
    novelty = np.divide(distinct, total, out=np.zeros(len(size)), where=total > 0)
    # fingerprint: share of the other accounts sharing the cluster's most common one
    fp = np.unique(np.asarray(profile["fingerprint"].to_pylist(), dtype=object), return_inverse=True)[1]
    fp_top = np.zeros(len(size))
    order = np.lexsort((fp, cl))
    pairs, counts = np.unique(np.stack([cl[order], fp[order]], axis=1), axis=0, return_counts=True)
    np.maximum.at(fp_top, pairs[:, 0], counts)
    first = profile["first_seen"].to_numpy()
    lo = np.full(len(size), np.inf)
    hi = np.full(len(size), -np.inf)
    np.minimum.at(lo, cl, first)
    np.maximum.at(hi, cl, first)
    others = size - 1
    alone = others == 0
    safe = np.maximum(others, 1)
    per_cluster = {
        "cluster_size": np.log1p(others),
        "cluster_novelty": np.where(alone, 0.0, novelty),
        "cluster_fingerprint": np.where(alone, 0.0, (fp_top - 1) / safe),
        "cluster_signups": np.where(alone, 0.0, np.log1p(others / ((hi - lo) / 3600.0 + 1.0))),
    }
    return {k: v[cl] for k, v in per_cluster.items()}
