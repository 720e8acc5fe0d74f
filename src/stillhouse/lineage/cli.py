"""`stillhouse lineage`: the command's logic, kept out of cli.py."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from ..artifacts import ArtifactStore
from ..fsutil import write_text_atomic
from .graph import load_lineage
from .render import describe, draw, teachers_summary, to_json, tree
from .shares import matches, teacher_shares
from .terms import obligations

out = Console(soft_wrap=True)  # stdout, so the output can be piped


def run_lineage(ref: str, workspace: Path, *, as_json=False, prov=False, graph=None, from_spec=None, terms=False, card=None,
                bom=None) -> int:
    store = ArtifactStore(workspace)
    lin = load_lineage(store, ref)
    code = 0
    if bom is not None:
        print_bom(lin, bom)
    elif prov:
        from .prov import to_prov, validate_prov

        doc = to_prov(lin)
        validate_prov(doc)
        print(json.dumps(doc, indent=2))
    elif as_json:
        print(json.dumps(to_json(lin), indent=2, default=str))
    elif from_spec:
        code = answer_from(lin, from_spec)
    elif terms:
        print_terms(lin)
    elif graph is None and card is None:
        Console().print(tree(lin))  # a tree wraps long labels instead of cropping them
        shares = teacher_shares(lin)
        if shares:
            out.print("\n[bold]Original teachers[/bold] (share of the training signal, path):")
            for line in teachers_summary(shares, lin):
                out.print("  " + line, highlight=False)
    if graph is not None:
        how = draw(lin, graph)
        out.print(f"wrote {graph} ({how})")
    if card is not None:
        from . import card_for

        write_text_atomic(card, card_for(store, lin.root))
        out.print(f"wrote {card}")
    return code


def print_bom(lin, fmt: str) -> None:
    """The AI bill of materials on stdout, validated against the format's schema when the
    validator is installed (extra `bom`); said on stderr when it is not."""
    from ..errors import StillhouseError
    from .bom import to_cyclonedx, validate_cyclonedx

    if fmt != "cyclonedx":
        raise StillhouseError(f"--bom: unknown format '{fmt}' (known: cyclonedx)")
    doc = to_cyclonedx(lin)
    try:
        validate_cyclonedx(doc)
    except StillhouseError as e:
        if "needs cyclonedx-python-lib" not in str(e):
            raise
        Console(stderr=True).print(f"note: BOM not validated ({e})", highlight=False)
    print(json.dumps(doc, indent=2))


def answer_from(lin, spec: str) -> int:
    """yes/no: is the root distilled (through any number of stages) from `spec`? Exit code 1 for no."""
    root = describe(lin.nodes[lin.root])
    hits = [s for s in teacher_shares(lin) if matches(s, spec)]
    if hits:
        total = sum(s.share for s in hits)
        out.print(f"yes: {root} owes {total:.1%} of its training signal to {spec}", highlight=False)
        for s in hits:
            for p, share in s.paths:
                out.print(f"  {share:7.1%}  " + " <- ".join(lin.nodes[k].label for k in p), highlight=False)
        return 0
    bases = [b.get("spec") for b in (lin.nodes[lin.root].manifest or {}).get("base_models") or [] if spec in (b.get("spec"), b.get("weights_sha256"))]
    note = f" (its weights were initialised from {spec}, but no training signal came from it)" if bases else ""
    teachers = ", ".join(s.spec for s in teacher_shares(lin)) or "none"
    out.print(f"no: {root} is not distilled from {spec}{note}; its teachers: {teachers}", highlight=False)
    return 1


def print_terms(lin) -> None:
    obs = obligations(lin)
    root = describe(lin.nodes[lin.root])
    if not obs:
        out.print(f"{root}: no inherited obligations recorded", highlight=False)
        return
    out.print(f"[bold]Obligations inherited by {root}[/bold] (summaries, not legal advice):", highlight=False)
    for o in obs:
        flag = " [yellow](uncertain)[/yellow]" if o["uncertain"] else ""
        blocks = f" [red]refused for: {', '.join(o['blocks'])}[/red]" if o["blocks"] else ""
        out.print(f"- [bold]{o['terms']}[/bold] / {o['rule']} ({o['kind']}){flag}{blocks}", highlight=False)
        out.print(f"    from {o['source']} ({', '.join(o['reach'])}) via {'; '.join(o['paths'])}", highlight=False)
        out.print(f"    {o['text']} [{o['clause']}]", highlight=False, markup=False)
