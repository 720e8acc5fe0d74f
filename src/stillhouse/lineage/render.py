"""Showing a lineage: a rich tree for the terminal, a JSON document, Graphviz DOT and a picture
(rendered by `dot` when Graphviz is installed, by matplotlib otherwise)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from rich.tree import Tree

from ..errors import StillhouseError
from ..fsutil import write_text_atomic
from .graph import UNKNOWN_ORIGIN, Lineage, Node
from .shares import Share, teacher_shares
from .terms import lookup, obligations

COLOURS = {"dataset": "#cfe2ff", "model": "#d1e7dd", "eval": "#fff3cd", "report": "#e2e3e5", "origin": "#f8d7da", "external": "#f8d7da"}


def describe(node: Node) -> str:
    if node.key == UNKNOWN_ORIGIN:
        return "unknown origin (not declared: its terms cannot be checked)"
    if node.external:
        ident = node.identity
        what = "declared origin" if node.kind == "origin" else ident.get("source", "outside")
        sha = f", sha256 {str(ident.get('weights_sha256'))[:12]}" if ident.get("weights_sha256") else ""
        return f"{node.label} ({what}, {lookup(node.license)['id']}{sha})"
    m = node.manifest
    return f"{node.label}: {m['kind']} {node.key} ({m['stage']})"


def tree(lin: Lineage) -> Tree:
    shares = {s.key: s for s in teacher_shares(lin)}
    root = Tree(f"[bold]{describe(lin.nodes[lin.root])}[/bold]")
    seen: set[str] = set()

    def add(branch: Tree, key: str) -> None:
        for e in [e for e in lin.edges if e.child == key]:
            node = lin.nodes[e.parent]
            label = f"[dim]{e.role}[/dim] {describe(node)}"
            if e.parent in shares and e.role in ("teacher", "origin"):
                label += f" [bold magenta]{shares[e.parent].share:.1%} of the training signal[/bold magenta]"
            if node.key in seen and not node.external:
                branch.add(label + " [dim](shown above)[/dim]")
                continue
            seen.add(node.key)
            add(branch.add(label), e.parent)

    add(root, lin.root)
    return root


def teachers_summary(shares: list[Share], lin: Lineage) -> list[str]:
    lines = []
    for s in shares:
        vias = sorted({" -> ".join(lin.nodes[k].label for k in p[1:-1]) or "direct" for p, _ in s.paths})
        lines.append(f"{s.share:7.1%}  {s.spec} ({lookup(s.node.license)['id']})  via {'; '.join(vias)}")
    return lines


def to_json(lin: Lineage) -> dict:
    from .cards import distillation_block

    root = lin.nodes[lin.root]
    doc = {
        "root": lin.root,
        "nodes": [{"key": n.key, "kind": n.kind, "label": n.label, "external": n.external,
                   **({"stage": n.manifest.get("stage"), "created_at": n.manifest.get("created_at")} if n.manifest else {"identity": n.identity})}
                  for n in lin.nodes.values()],
        "edges": [{"child": e.child, "parent": e.parent, "role": e.role} for e in lin.edges],
        "teachers": [s.to_dict(lin) for s in teacher_shares(lin)],
        "obligations": obligations(lin),
    }
    if root.kind == "model":
        doc["card"] = distillation_block(lin)
    return doc


def to_dot(lin: Lineage) -> str:
    shares = {s.key: s.share for s in teacher_shares(lin)}
    ids = {k: f"n{i}" for i, k in enumerate(lin.nodes)}
    out = ["digraph lineage {", "  rankdir=BT;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for k, n in lin.nodes.items():
        label = (n.label + ("\\n" + lookup(n.license)["id"] if n.external else f"\\n{n.manifest['stage']} {k[:8]}")).replace('"', "'")
        if k in shares:
            label += f"\\n{shares[k]:.1%} of signal"
        colour = COLOURS["external"] if n.external else COLOURS.get(n.kind, "#ffffff")
        out.append(f'  {ids[k]} [label="{label}", fillcolor="{colour}"{", penwidth=2" if k == lin.root else ""}];')
    for e in lin.edges:
        out.append(f'  {ids[e.parent]} -> {ids[e.child]} [label="{e.role}"];')
    out.append("}")
    return "\n".join(out) + "\n"


def draw(lin: Lineage, out: Path) -> str:
    """Write the picture; returns which renderer drew it ('dot', 'matplotlib' or 'dot-source')."""
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    if fmt == "dot":
        write_text_atomic(out, to_dot(lin))
        return "dot-source"
    if fmt not in ("png", "svg", "pdf"):
        raise StillhouseError(f"--graph {out}: unsupported picture format '.{fmt}' (use .png, .svg, .pdf or .dot)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if shutil.which("dot"):
        subprocess.run(["dot", f"-T{fmt}", "-o", str(tmp)], input=to_dot(lin).encode(), check=True)
        tmp.replace(out)
        return "dot"
    _matplotlib(lin, tmp, fmt)
    tmp.replace(out)
    return "matplotlib"


def _layers(lin: Lineage) -> dict[str, int]:
    """Depth of each node below the root (longest path), so parents sit under their children."""
    depth = {lin.root: 0}
    changed = True
    while changed:
        changed = False
        for e in lin.edges:
            if e.child in depth and depth.get(e.parent, -1) < depth[e.child] + 1:
                depth[e.parent] = depth[e.child] + 1
                changed = True
    return depth


def _matplotlib(lin: Lineage, path: Path, fmt: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = _layers(lin)
    rows: dict[int, list[str]] = {}
    for k, d in sorted(depth.items(), key=lambda kv: kv[1]):
        rows.setdefault(d, []).append(k)
    width = max(len(r) for r in rows.values())
    fig, ax = plt.subplots(figsize=(max(6, 3.2 * width), max(3, 1.4 * len(rows))))
    pos = {k: ((i + 0.5) / len(r) * width, -d) for d, r in rows.items() for i, k in enumerate(r)}
    shares = {s.key: s.share for s in teacher_shares(lin)}
    roles: dict[tuple[str, str], list[str]] = {}
    for e in lin.edges:  # one arrow per pair, labelled with every role (a model can be teacher and base)
        roles.setdefault((e.parent, e.child), []).append(e.role)
    for (parent, child), rs in roles.items():
        (x0, y0), (x1, y1) = pos[parent], pos[child]
        ax.annotate("", xy=(x1, y1 - 0.18), xytext=(x0, y0 + 0.18), arrowprops={"arrowstyle": "->", "color": "#555"})
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, ", ".join(rs), fontsize=7, color="#555", ha="center")
    for k, (x, y) in pos.items():
        n = lin.nodes[k]
        label = n.label + ("\n" + lookup(n.license)["id"] if n.external else f"\n{n.manifest['stage']}")
        if k in shares:
            label += f"\n{shares[k]:.1%}"
        colour = COLOURS["external"] if n.external else COLOURS.get(n.kind, "#ffffff")
        ax.text(x, y, label, ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round", "facecolor": colour, "edgecolor": "#333", "linewidth": 2 if k == lin.root else 0.8})
    ax.set_xlim(0, width)
    ax.set_ylim(-max(rows) - 0.6, 0.6)
    ax.axis("off")
    ax.set_title(f"lineage of {lin.nodes[lin.root].label}")
    fig.tight_layout()
    fig.savefig(path, format=fmt, dpi=110)
    plt.close(fig)
