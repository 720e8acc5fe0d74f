"""The `stillhouse guard analyze` command (registered in guard/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def analyze(
    log: Path = typer.Argument(..., help="Request log: the gateway's SQLite file, or a directory of day-partitioned Parquet."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for report.json and report.html (both written atomically)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full analysis as JSON here."),
    html_path: Optional[Path] = typer.Option(None, "--html", help="Write an HTML page here."),
    window: str = typer.Option("1d", help="Time window per account score (30m, 6h, 1d, ... or 'all'); an account scores its worst window."),
    threshold: Optional[float] = typer.Option(None, help="Flag at this score instead of the tuned threshold (0.3% benign FPR on the tuning split)."),
    limit: int = typer.Option(20, help="Rows per table in the terminal."),
    quiet: bool = typer.Option(False, help="No terminal tables (for scripts)."),
):
    """Rank accounts and clusters of accounts by signs of an extraction campaign, with reasons. Flags only; never bans."""
    import os

    # before OpenMP/BLAS load: the nearest-neighbour search contends badly for threads on a shared machine
    # (scoring.py also limits itself to one thread); DuckDB keeps its own threads
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ..fsutil import write_text_atomic
    from .analyze import analyze as run
    from .report import print_tables, to_html, to_json

    result = run(log, window=window, threshold=threshold)
    if out:
        json_path = json_path or out / "report.json"
        html_path = html_path or out / "report.html"
    if json_path:
        write_text_atomic(json_path, to_json(result))
    if html_path:
        write_text_atomic(html_path, to_html(result))
    if not quiet:
        print_tables(result, limit=limit)
