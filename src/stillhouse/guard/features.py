"""Per-account behaviour over time windows, aggregated in DuckDB from the request log.

One row per (account, window). Every feature is a number whose meaning a reviewer can read
back in words (scoring.REASONS); none needs the prompt text.
"""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa

from ..errors import StillhouseError

SESSION_GAP = 3600.0  # gaps longer than this start a new session and are left out of timing regularity
SIGNUP_WINDOW = 1800.0  # accounts with one client fingerprint first seen within +-30 min count as one sign-up burst

WINDOW_FEATURES = [
    "log_requests",      # log1p(requests in the window)
    "hours_active",      # distinct clock hours with traffic / hours in the window
    "gap_regularity",    # 1 - coefficient of variation of in-session gaps, clipped to [0, 1]: scripts are regular
    "distinct_prompts",  # distinct prompts / requests
    "log_prompt_chars",  # log1p(mean prompt characters)
    "probe_reasoning",   # share of prompts asking for hidden reasoning
    "probe_system",      # share probing the system prompt
    "probe_identity",    # share probing the model's identity
    "logprob_share",     # share requesting top log-probs
    "echo_share",        # share with echo (prompt log-probs)
    "short_output",      # share with max_tokens <= 16: distribution harvesting rather than answers
    "long_output",       # share with max_tokens >= 4096
    "limited_share",     # share refused for rate limits or quotas
]


def parse_window(text: str | None) -> float | None:
    """'1d', '6h', '30m', '3600s' -> seconds; 'all' or None -> the whole log as one window."""
    if text in (None, "", "all"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not m:
        raise StillhouseError(f"--window {text!r}: expected a duration like 1d, 6h, 30m or 'all'")
    sec = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if sec < 60:
        raise StillhouseError(f"--window {text!r}: windows shorter than a minute say nothing about behaviour")
    return sec


def window_features(con: duckdb.DuckDBPyConnection, window: float | None) -> pa.Table:
    """account, window_start, requests and WINDOW_FEATURES for every (account, window)."""
    t0, t1 = con.execute("SELECT min(ts), max(ts) FROM requests").fetchall()[0]
    if t0 is None:
        raise StillhouseError("the request log is empty")
    win = window or max(t1 - t0, 3600.0) + 1.0
    hours = max(1.0, min(win, t1 - t0 + 1.0) / 3600.0)
    return _arrow(con.sql(
        f"""
        WITH r AS (
            SELECT account, ts, prompt_sha256, prompt_chars, probe, top_logprobs, echo, max_tokens, outcome,
                   floor((ts - {t0}) / {win}) AS w,
                   ts - lag(ts) OVER (PARTITION BY account ORDER BY ts) AS gap
            FROM requests WHERE account IS NOT NULL
        )
        SELECT account, {t0} + w * {win} AS window_start, count(*) AS requests,
               ln(1 + count(*)) AS log_requests,
               count(DISTINCT floor(ts / 3600)) / {hours} AS hours_active,
               greatest(0.0, least(1.0, 1 - coalesce(stddev_samp(gap) FILTER (gap < {SESSION_GAP})
                                                    / nullif(avg(gap) FILTER (gap < {SESSION_GAP}), 0), 1.0))) AS gap_regularity,
               count(DISTINCT prompt_sha256) / count(*) AS distinct_prompts,
               ln(1 + avg(coalesce(prompt_chars, 0))) AS log_prompt_chars,
               avg(CASE WHEN probe LIKE '%reasoning%' THEN 1 ELSE 0 END) AS probe_reasoning,
               avg(CASE WHEN probe LIKE '%system_prompt%' THEN 1 ELSE 0 END) AS probe_system,
               avg(CASE WHEN probe LIKE '%identity%' THEN 1 ELSE 0 END) AS probe_identity,
               avg(CASE WHEN coalesce(top_logprobs, 0) > 0 THEN 1 ELSE 0 END) AS logprob_share,
               avg(CASE WHEN echo THEN 1 ELSE 0 END) AS echo_share,
               avg(CASE WHEN max_tokens <= 16 THEN 1 ELSE 0 END) AS short_output,
               avg(CASE WHEN max_tokens >= 4096 THEN 1 ELSE 0 END) AS long_output,
               avg(CASE WHEN outcome IN ('rate_limited', 'quota_exceeded') THEN 1 ELSE 0 END) AS limited_share
        FROM r GROUP BY account, w ORDER BY account, w
        """
    ))


def account_profile(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """Per account over the whole log: org, first seen, dominant client fingerprint, and how many
    other accounts with that fingerprint were first seen within SIGNUP_WINDOW (a sign-up burst),
    against how many a uniform arrival of that fingerprint's accounts would put there."""
    return _arrow(con.sql(
        f"""
        WITH a AS (
            SELECT account, any_value(org) AS org, min(ts) AS first_seen, count(*) AS requests,
                   mode(coalesce(user_agent, '') || ' | ' || coalesce(param_shape, '')) AS fingerprint
            FROM requests WHERE account IS NOT NULL GROUP BY account
        ), span AS (SELECT greatest(max(first_seen) - min(first_seen), {SIGNUP_WINDOW}) AS s FROM a)
        SELECT a.account, org, first_seen, requests, fingerprint,
               count(*) OVER (PARTITION BY fingerprint ORDER BY first_seen
                              RANGE BETWEEN {SIGNUP_WINDOW} PRECEDING AND {SIGNUP_WINDOW} FOLLOWING) - 1 AS signup_peers,
               (count(*) OVER (PARTITION BY fingerprint) - 1) * least(1.0, {2 * SIGNUP_WINDOW} / span.s) AS signup_expected,
               count(*) OVER (PARTITION BY fingerprint) AS fingerprint_accounts
        FROM a, span ORDER BY a.account
        """
    ))


def _arrow(rel) -> pa.Table:
    return rel.to_arrow_table()
