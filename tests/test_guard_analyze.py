"""`stillhouse guard analyze`: the detector on small synthetic logs with known answers, and bad logs."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stillhouse.errors import StillhouseError
from stillhouse.guard import clusters, log_schema as L, simulate as S
from stillhouse.guard.analyze import analyze, feature_table
from stillhouse.guard.features import parse_window
from stillhouse.guard.logsource import open_log

from support import subprocess_env


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    """~250 benign accounts of every persona, a 40-account coverage campaign, a 10-account
    reasoning campaign and a 10-account logprob campaign, as Parquet and as SQLite."""
    root = tmp_path_factory.mktemp("guardlog")
    sim = S.Simulator(5)
    sim.chat(220); sim.app(2); sim.eval(2); sim.researcher(3); sim.power(5)
    sim.campaign("coverage", 40, per_account=(20, 60))
    sim.campaign("reasoning", 10, per_account=(20, 60))
    sim.campaign("logprob", 10, per_account=(20, 60))
    table = sim.table()
    S.write_parquet_days(table, root / "pq")
    S.write_sqlite(table, root / "log.db")
    return root, sim.truth().to_pylist()


def test_batch_signatures_are_the_gateway_signatures():
    texts = S.public_prompts()[:40] + ["", "one", "two words", "Which model are you?"]
    assert L.prompt_signatures(texts) == [L.prompt_signature(t) for t in texts]


def test_banding_finds_the_candidates_datasketch_lsh_finds():
    from datasketch import MinHash, MinHashLSH

    base = "Explain {} of {} to a beginner, with a detailed worked answer."
    texts = [base.format(a, f) for a in S.ASPECTS[:6] for f in S.FIELDS[:6]] + S.public_prompts()[:40]
    sigs = np.stack([L.signature_array(s) for s in L.prompt_signatures(texts)])
    keys = clusters.band_keys(sigs)
    ours = {(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts)) if (keys[i] == keys[j]).any()}
    lsh = MinHashLSH(num_perm=L.SIGNATURE_PERM, params=(clusters.BANDS, clusters.ROWS))
    mh = [MinHash(num_perm=L.SIGNATURE_PERM, hashvalues=s.astype(np.uint64), scheme="affine32") for s in sigs]
    for i, m in enumerate(mh):
        lsh.insert(i, m)
    theirs = {(min(i, j), max(i, j)) for i, m in enumerate(mh) for j in lsh.query(m) if i != j}
    assert ours == theirs and len(ours) > 50  # the templated prompts do collide


@pytest.mark.xfail(strict=True, reason=(
    "known evasion since the own-template rule (clusters.PRIVATE/OWN): each account here sweeps a narrow, contiguous "
    "slice of the topic list, so two of its prompts share template + field words in a bucket no other account "
    "reaches; it then looks like a researcher's own script and joins no cluster. docs/guard.md, 'Where it falls short'"))
def test_shared_template_accounts_form_exactly_one_cluster(tmp_path):
    """Five accounts filling one skeleton (two prompts each at least) are one actor; five chat users are not."""
    sim = S.Simulator(3)
    pool = S.public_prompts()
    rows, names = [], []
    for k in range(5):
        acct = f"acct-t{k}"
        names.append(acct)
        for i in range(12):
            a, f = S.ASPECTS[(k * 12 + i) % 16], S.FIELDS[(k * 12 + i) // 16]
            rows.append(dict(ts=S.T0 + 60 * (k * 12 + i), text=f"You are a patient expert tutor. Explain {a} of {f} to a beginner, with a detailed worked answer and a short summary at the end.",
                             user_agent="x/1", param_shape="messages,model", route="chat", account=acct))
    for k in range(5):
        for i in range(12):
            rows.append(dict(ts=S.T0 + 7 * (k * 12 + i), text=pool[(k * 12 + i) * 7], user_agent="y/1",
                             param_shape="messages,model", route="chat", account=f"acct-c{k}"))
    sim.actors.append(S.Actor("coverage", "c", names, True, rows))
    S.write_parquet_days(sim.table(), tmp_path / "pq")
    feats = feature_table(open_log(tmp_path / "pq"), None).to_pylist()
    cl = {r["account"]: r["cluster"] for r in feats}
    assert len({cl[n] for n in names}) == 1
    assert all(cl[f"acct-c{k}"] != cl[names[0]] for k in range(5))
    by = {r["account"]: r for r in feats}
    assert by[names[0]]["cluster_size"] == pytest.approx(np.log1p(4))
    assert by[names[0]]["cluster_novelty"] == 1.0  # every prompt new: coverage, not repetition
    assert by["acct-c0"]["cluster_size"] == 0.0


def _log_features(tmp_path, rows_by_account: dict[str, list[str]]) -> dict[str, dict]:
    """Feature rows (window 'all') of a log in which each account sends its prompts a minute apart."""
    sim = S.Simulator(3)
    rows = []
    for k, (acct, texts) in enumerate(rows_by_account.items()):
        rows += [dict(ts=S.T0 + 3600 * k + 60 * i, text=t, user_agent="x/1", param_shape="messages,model", route="chat", account=acct)
                 for i, t in enumerate(texts)]
    sim.actors.append(S.Actor("coverage", "c", list(rows_by_account), True, rows))
    S.write_parquet_days(sim.table(), tmp_path / "pq")
    return {r["account"]: r for r in feature_table(open_log(tmp_path / "pq"), None).to_pylist()}


# topics long enough that prompts on one topic share whole LSH bands whatever template frames them
_TOPICS = [f"{a} of {f} as taught to {lv} in a standard university course" for a in S.ASPECTS[:8] for f in S.FIELDS[:6]
           for lv in S.LEVELS[:2]]


def test_an_account_filling_its_own_template_is_its_own_actor(tmp_path):
    """A researcher's script and a campaign sweep one topic list: the topic words put their prompts
    in common buckets, but the researcher's prompts all fill its own template, so it joins no
    cluster and its topic buckets do not count as shared skeletons; the campaign stays one actor."""
    camp = {f"acct-c{k}": [f"Explain {t}, with a detailed worked answer." for t in _TOPICS[k::8]] for k in range(8)}
    res = {"acct-r": [f"Compose one encyclopedia paragraph with references and a glossary entry about {t}." for t in _TOPICS]}
    feats = _log_features(tmp_path, {**camp, **res})
    r = feats["acct-r"]
    assert r["template_own"] >= 0.5 and r["template_self"] >= 0.5
    assert r["cluster_size"] == 0 and r["template_shared"] <= 0.1
    assert sum(feats[c]["cluster"] == r["cluster"] for c in camp) == 0
    assert len({feats[c]["cluster"] for c in camp}) == 1 and feats["acct-c0"]["cluster_size"] > 1
    assert max(feats[c]["template_own"] for c in camp) < 0.5


def test_one_prompt_in_a_skeleton_many_accounts_fill_ties_an_account(tmp_path):
    """A hydra's thin accounts each fill its skeleton once, among ordinary prompts: they join the
    accounts that fill it often. A chat user with no templated prompt joins nobody."""
    pool = S.public_prompts()
    tmpl = "You are a patient expert tutor. Explain {} to me, with a detailed worked answer and a short summary at the end."
    # the topics: the openings of unrelated real prompts (no topic words in common to own buckets by)
    topics = [" ".join(p.split()[:8]) for p in pool[200:300]]
    core = {f"acct-c{k}": [tmpl.format(t) for t in topics[10 * k : 10 * k + 10]] for k in range(4)}
    thin = {f"acct-t{k}": [tmpl.format(topics[90 - k])] + pool[10 * k : 10 * k + 9] for k in range(3)}
    chat = {"acct-u": pool[100:110]}
    feats = _log_features(tmp_path, {**core, **thin, **chat})
    cid = feats["acct-c0"]["cluster"]
    assert all(feats[a]["cluster"] == cid for a in [*core, *thin])
    assert feats["acct-u"]["cluster"] != cid and feats["acct-u"]["cluster_size"] == 0


def test_detector_finds_the_campaigns_and_spares_benign_users(traffic):
    root, truth = traffic
    res = analyze(root / "pq", window="1d")
    flagged = {a["account"] for a in res.accounts if a["flagged"]}
    kind = {r["account"]: r["kind"] for r in truth}
    attackers = [r["account"] for r in truth if r["attack"]]
    benign = [r["account"] for r in truth if not r["attack"]]
    assert sum(a in flagged for a in attackers) >= 0.9 * len(attackers)
    assert sum(b in flagged for b in benign) <= 0.02 * len(benign)
    # the coverage campaign is one cluster, ranked as such, with its reasons in words
    cov = [c for c in res.clusters if sum(kind[m] == "coverage" for m in c["members"]) >= len(c["members"]) // 2 and c["accounts"] >= 30]
    assert cov and cov[0]["flagged"]
    assert any("share prompt skeletons" in r for r in cov[0]["reasons"])
    top = res.accounts[0]
    assert top["flagged"] and top["reasons"] and kind[top["account"]] in S.FAMILIES
    reasons = {a["account"]: " ".join(a["reasons"]) for a in res.accounts}
    assert any("hidden reasoning" in reasons[a] for a in attackers if kind[a] == "reasoning")
    assert any("log-probs" in reasons[a] for a in attackers if kind[a] == "logprob")


def test_sqlite_and_parquet_logs_give_the_same_analysis(traffic):
    root, _ = traffic
    a = analyze(root / "pq", window="all")
    b = analyze(root / "log.db", window="all")
    assert [(x["account"], x["score"]) for x in a.accounts] == [(x["account"], x["score"]) for x in b.accounts]


def test_cli_writes_json_and_html(traffic, tmp_path):
    root, _ = traffic
    proc = subprocess.run([sys.executable, "-m", "stillhouse.cli", "guard", "analyze", str(root / "log.db"), "--out", str(tmp_path / "r"), "--limit", "5"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Accounts" in proc.stdout and "FLAG" in proc.stdout
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["summary"]["flagged_accounts"] > 0 and data["accounts"][0]["reasons"]
    page = (tmp_path / "r" / "report.html").read_text()
    assert page.startswith("<!doctype html>") and data["accounts"][0]["account"] in page


def _bad(tmp_path: Path) -> dict[str, Path]:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not a database" * 100)
    wrong = tmp_path / "wrong.db"
    con = sqlite3.connect(wrong)
    con.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY, ts REAL, account TEXT)")
    con.commit(); con.close()
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"SQLite format 3\x00" + b"\x13" * 5000)
    trunc = tmp_path / "trunc"
    (trunc / "day=2026-11-02").mkdir(parents=True)
    (trunc / "day=2026-11-02" / "part-0.parquet").write_bytes(b"PAR1" + b"\x00" * 300)
    empty = tmp_path / "emptydir"
    empty.mkdir()
    return {"junk": junk, "wrong": wrong, "corrupt": corrupt, "trunc": trunc, "empty": empty, "missing": tmp_path / "nope.db"}


def test_bad_logs_are_one_line_errors(tmp_path):
    for name, path in _bad(tmp_path).items():
        with pytest.raises(StillhouseError) as e:
            open_log(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), name
        if name == "wrong":
            assert "missing column(s) org, key_id" in str(e.value)


@pytest.mark.parametrize("which", ["junk", "wrong", "trunc"])
def test_cli_bad_log_exits_2_and_writes_nothing(tmp_path, which):
    path = _bad(tmp_path)[which]
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "stillhouse.cli", "guard", "analyze", str(path), "--out", str(out)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("stillhouse: error:") and str(path) in lines[0], proc.stderr
    assert not out.exists()


def test_window_parsing():
    assert parse_window("1d") == 86400 and parse_window("30m") == 1800 and parse_window("all") is None
    for bad in ("fortnight", "5s", "-1h"):
        with pytest.raises(StillhouseError, match="--window"):
            parse_window(bad)


def test_every_feature_has_words_and_a_group():
    from stillhouse.guard.scoring import FEATURES, FLOOR, GROUPS, ONE_SIDED, REASONS

    assert set(REASONS) == set(FEATURES) == set(FLOOR) and set(ONE_SIDED) <= set(FEATURES)
    assert set(FEATURES) == {f for cols in GROUPS.values() if cols for f in cols}


def _tuning_table(n_benign: int, attackers: np.ndarray, seed: int = 0):
    """A feature table: benign windows around typical values, plus the given attacker rows."""
    import pyarrow as pa

    from stillhouse.guard.scoring import FEATURES

    rng = np.random.default_rng(seed)
    ben = np.abs(rng.normal(0.2, 0.1, size=(n_benign, len(FEATURES))))
    X = np.vstack([ben, attackers])
    n = len(X)
    cols = {f: X[:, i] for i, f in enumerate(FEATURES)}
    return pa.table({"account": [f"a{i}" for i in range(n)], "window_start": np.zeros(n), "attack": [i >= n_benign for i in range(n)],
                     "kind": ["chat"] * n_benign + ["x"] * len(attackers), "campaign": [f"c{i}" for i in range(n)], **cols})


def test_calibration_reads_benign_traffic_only():
    """No attacker row is fitted: the thresholds are the same whatever attackers the tuning split holds."""
    from stillhouse.guard.scoring import FEATURES, calibrate

    fprs = {"1%": 0.01, "0": 0.0}
    far = np.full((30, len(FEATURES)), 5.0)
    near = np.full((30, len(FEATURES)), 0.2)
    a, _ = calibrate(_tuning_table(600, far), fprs)
    b, _ = calibrate(_tuning_table(600, near), fprs)
    assert a == b


def test_detector_flags_what_lies_outside_the_benign_envelope_and_holds_its_fpr():
    from stillhouse.guard.scoring import FEATURES, Detector, calibrate

    fprs = {"1%": 0.01, "0.3%": 0.003, "0": 0.0}
    tune = _tuning_table(2000, np.zeros((0, len(FEATURES))), seed=1)
    meta, _ = calibrate(tune, fprs)
    det = Detector(tune, meta | {"default_fpr": "0.3%"})
    fresh = _tuning_table(2000, np.zeros((0, len(FEATURES))), seed=2)  # new benign traffic, same population
    assert np.mean(det.score(fresh) >= meta["thresholds"]["1%"]) < 0.03
    i = FEATURES.index("probe_reasoning")
    odd = np.full((3, len(FEATURES)), 0.2)
    odd[:, i] = [2.0, 3.0, 4.0]  # one kind of evidence far outside benign traffic is enough
    low = np.full((1, len(FEATURES)), 0.0)  # less of everything than benign users is no evidence
    scores = det.score(_tuning_table(0, np.vstack([odd, low])))
    assert (scores[:3] >= det.threshold).all() and scores[3] < meta["thresholds"]["1%"]
    assert det.score_and_evidence(_tuning_table(0, odd))[1][0] in ("prompt content", "all evidence")
