"""An analysis three ways: a rich terminal table, JSON, and a self-contained HTML page."""

from __future__ import annotations

import datetime as dt
import html
import json

from .analyze import Analysis


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def print_tables(a: Analysis, limit: int = 20, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s = a.summary
    console.print(f"[bold]{s['requests']:,} requests, {s['accounts']:,} accounts[/bold] ({s['log']}, window {s['window']}); "
                  f"flagged: {s['flagged_accounts']:,} accounts, {s['flagged_clusters']:,} clusters at score >= {s['threshold']:.3f}"
                  + (f" (benign FPR {s['threshold_fpr']} on the tuning split)" if s.get("threshold_fpr") else "")
                  + ". Flags are for review: nothing is blocked.")
    t = Table(title="Clusters of accounts (one actor?)", show_lines=False)
    for c in ("#", "cluster", "accounts", "score", "flag", "reasons"):
        t.add_column(c, overflow="fold")
    for i, c in enumerate(a.clusters[:limit], 1):
        t.add_row(str(i), str(c["cluster"]), f"{c['accounts']:,}", f"{c['score']:.3f}", "FLAG" if c["flagged"] else "", "; ".join(c["reasons"]))
    if a.clusters:
        console.print(t)
    t = Table(title="Accounts", show_lines=False)
    for c in ("#", "account", "score", "flag", "window", "requests", "cluster", "strongest evidence", "reasons"):
        t.add_column(c, overflow="fold")
    for i, r in enumerate(a.accounts[:limit], 1):
        t.add_row(str(i), r["account"], f"{r['score']:.3f}", "FLAG" if r["flagged"] else "", _when(r["window_start"]),
                  f"{r['requests']:,}", str(r["cluster"]), r["evidence"], "; ".join(r["reasons"]))
    console.print(t)


def to_json(a: Analysis) -> str:
    return json.dumps(a.to_json(), indent=1, default=str) + "\n"


def to_html(a: Analysis, limit: int = 500) -> str:
    e = html.escape
    s = a.summary

    def rows(items, cols):
        return "\n".join("<tr>" + "".join(f"<td>{e(str(fn(x)))}</td>" for _, fn in cols) + "</tr>" for x in items)

    acols = [("account", lambda r: r["account"]), ("org", lambda r: r["org"]), ("score", lambda r: f"{r['score']:.3f}"),
             ("flag", lambda r: "FLAG" if r["flagged"] else ""), ("window", lambda r: _when(r["window_start"])),
             ("requests", lambda r: f"{r['requests']:,}"), ("cluster", lambda r: r["cluster"]),
             ("strongest evidence", lambda r: r["evidence"]), ("reasons", lambda r: "; ".join(r["reasons"]))]
    ccols = [("cluster", lambda c: c["cluster"]), ("accounts", lambda c: f"{c['accounts']:,}"), ("score", lambda c: f"{c['score']:.3f}"),
             ("flag", lambda c: "FLAG" if c["flagged"] else ""), ("flagged accounts", lambda c: c["flagged_accounts"]),
             ("reasons", lambda c: "; ".join(c["reasons"])), ("members (first 20)", lambda c: ", ".join(c["members"]))]
    head = lambda cols: "<tr>" + "".join(f"<th>{e(n)}</th>" for n, _ in cols) + "</tr>"  # noqa: E731
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>stillhouse guard analyze</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;vertical-align:top}}th{{background:#eee}}</style></head><body>
<h1>Extraction-campaign analysis</h1>
<p>{s['requests']:,} requests from {s['accounts']:,} accounts in <code>{e(s['log'])}</code>, window {e(str(s['window']))}.
Flagged {s['flagged_accounts']:,} accounts and {s['flagged_clusters']:,} clusters at score &ge; {s['threshold']:.3f}.
These are flags for a person to review; nothing was blocked.</p>
<h2>Clusters</h2><table>{head(ccols)}{rows(a.clusters[:limit], ccols)}</table>
<h2>Accounts</h2><table>{head(acols)}{rows(a.accounts[:limit], acols)}</table>
</body></html>
"""
