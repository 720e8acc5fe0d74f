"""`stillhouse guard ...`: the provider-side commands (registered in cli.py with one add_typer)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .analyze_cli import analyze
from .provenance_cli import detect, keygen, probes, provenance, radioactivity

app = typer.Typer(help="Provider guard: a gateway that enforces keys and quotas, logs requests and withholds reasoning; analysis of its log for extraction campaigns; watermark, radioactivity and provenance tests.", no_args_is_help=True)
app.command("analyze")(analyze)
for _command in (keygen, detect, radioactivity, probes, provenance):  # was this model distilled from mine? (docs/provenance.md)
    app.command()(_command)
keys_app = typer.Typer(help="API keys for the gateway and `stillhouse serve --api-keys` (stored hashed; a key is shown once); also `stillhouse keys`.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@app.command("serve")
def serve(
    upstream: str = typer.Option(..., "--upstream", help="The OpenAI-compatible upstream, e.g. http://127.0.0.1:8000/v1."),
    config: Path = typer.Option(..., "--config", help="guard.yaml (keys, limits, log, reasoning)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8080, help="Port to listen on."),
):
    """Run the gateway: OpenAI API in front of UPSTREAM with keys, quotas, a request log and reasoning withheld."""
    from .gateway import serve as run

    run(upstream, config, host=host, port=port)


@app.command("export")
def export(
    log: Path = typer.Argument(..., help="The gateway's SQLite request log."),
    out_dir: Path = typer.Argument(..., help="Output directory (replaced): Parquet under day=YYYY-MM-DD/."),
):
    """Export the request log to Parquet partitioned by UTC day (for DuckDB, Spark, Ray)."""
    from .reqlog import export_parquet

    n = export_parquet(log, out_dir)
    print(f"{n} requests exported to {out_dir}", file=sys.stderr)


@keys_app.command("add")
def keys_add(
    file: Path = typer.Argument(..., help="Key file (created if missing)."),
    account: str = typer.Option("default", help="Account the key belongs to."),
    org: str = typer.Option("default", help="Organisation of the account."),
    rpm: Optional[int] = typer.Option(None, "--rpm", help="Requests per minute (overrides guard.yaml limits.key)."),
    rpd: Optional[int] = typer.Option(None, "--rpd", help="Requests per day."),
    tpm: Optional[int] = typer.Option(None, "--tpm", help="Tokens per minute."),
    tpd: Optional[int] = typer.Option(None, "--tpd", help="Tokens per day."),
    max_top_logprobs: Optional[int] = typer.Option(None, "--max-top-logprobs", help="Cap on top_logprobs (0: none)."),
    no_logprobs: bool = typer.Option(False, "--no-logprobs", help="Refuse requests for log-probs."),
):
    """Make a key; print it once (only its hash is stored)."""
    from pydantic import ValidationError

    from ..apikeys import KeyStore
    from ..errors import StillhouseError
    from .config import Limits

    given = {"requests_per_minute": rpm, "requests_per_day": rpd, "tokens_per_minute": tpm, "tokens_per_day": tpd,
             "max_top_logprobs": max_top_logprobs, "logprobs": False if no_logprobs else None}
    limits = {k: v for k, v in given.items() if v is not None}
    try:
        Limits.model_validate(limits)
    except ValidationError as e:
        first = e.errors()[0]
        raise StillhouseError(f"limit {first['loc'][0]}: {first['msg']}") from None
    rec, key = KeyStore.load(file, create=True).add(account=account, org=org, limits=limits)
    print(key)
    print(f"key id {rec.id} (account {rec.account}, org {rec.org}) added to {file}; the key is not shown again", file=sys.stderr)


@keys_app.command("revoke")
def keys_revoke(file: Path = typer.Argument(..., help="Key file."), key_id: str = typer.Argument(..., help="The key's id (8 hex chars).")):
    """Revoke a key by its id (a running gateway notices within a second)."""
    from ..apikeys import KeyStore

    KeyStore.load(file).revoke(key_id)
    print(f"key {key_id} revoked", file=sys.stderr)


@keys_app.command("list")
def keys_list(file: Path = typer.Argument(..., help="Key file.")):
    """Key ids, accounts, organisations, states and limits (never the keys)."""
    import json

    from ..apikeys import KeyStore

    for r in KeyStore.load(file).records:
        print(f"{r.id}\t{r.account}\t{r.org}\t{'active' if r.active else 'revoked'}\t{json.dumps(r.limits, sort_keys=True)}")
