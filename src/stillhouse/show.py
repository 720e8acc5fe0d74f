"""Readable rendering of a manifest on the terminal."""

from __future__ import annotations

import json

from rich.table import Table

from rich.console import Console

console = Console()  # stdout, so `stillhouse show ID > file` works


def render_manifest(art) -> None:
    m = art.manifest
    console.print(f"[bold]{m['kind']}[/bold] {m['id']}  stage [bold]{m['stage']}[/bold] ({m.get('name')})  recipe {m.get('recipe')}")
    console.print(f"path     {art.path}")
    console.print(f"created  {m['created_at']}  stillhouse {m['stillhouse_version']}  took {m.get('duration_s')}s")
    console.print(f"parents  {', '.join(m['parents']) or '-'}")
    if m.get("teachers"):
        t = Table(title="teachers")
        for col in ("spec", "licence / terms", "share", "weights sha256"):
            t.add_column(col)
        for x in m["teachers"]:
            t.add_row(x["spec"], x.get("license", "unknown"), f"{x.get('token_share', 0):.0%}", (x.get("weights_sha256") or "none (API)")[:16])
        console.print(t)
    for b in m.get("base_models", []):
        console.print(f"base model  {b['spec']} ({b.get('license', 'unknown')})")
    for section in ("counts", "metrics"):
        if m.get(section):
            console.print(f"[bold]{section}[/bold]")
            for k, v in m[section].items():
                console.print(f"  {k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
    for w in m.get("warnings", []):
        console.print(f"[yellow]warning[/yellow] {w}")
    console.print("[bold]config[/bold]")
    console.print_json(json.dumps(m["config"]))
