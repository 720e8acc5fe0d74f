"""The report stage: a terminal table, `report.md` and a PNG chart, each figure naming its artifact."""

from __future__ import annotations

import json

from rich.table import Table

from .stages import load_results
from ..fsutil import write_text_atomic
from ..progress import console


def _fmt(v, spec: str = ".3f", suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def table_rows(results: dict) -> list[dict]:
    """One row per model: the figures a reader compares, students also relative to the teacher."""
    rows = []
    for label, r in results["models"].items():
        rows.append({
            "model": label,
            "role": r["role"],
            "layers": r.get("layers"),
            "params_m": r["params"] / 1e6,
            "pass_at_1": r["pass_at_1"],
            "pass_vs_teacher": r.get("pass_at_1_vs_teacher"),
            "decode_tok_s": r["decode_tok_per_s"],
            "speedup": r.get("speedup_vs_teacher"),
            "kl_to_teacher": r.get("kl_to_teacher"),
            "artifact": r.get("artifact"),
        })
    return rows


def markdown_table(rows: list[dict], n_problems: int) -> str:
    head = ("| model | layers | params | pass@1 (n=%d) | vs teacher | decode tok/s (batch 16) | speed-up | KL to teacher |" % n_problems)
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['params_m']:.1f}M | {r['pass_at_1']:.3f} | {_fmt(r['pass_vs_teacher'], '.2f')} "
            f"| {r['decode_tok_s']:.0f} | {_fmt(r['speedup'], '.2f', 'x')} | {_fmt(r['kl_to_teacher'])} |"
        )
    return "\n".join(lines)


def print_table(rows: list[dict], title: str) -> None:
    t = Table(title=title)
    for col in ("model", "layers", "params", "pass@1", "vs teacher", "decode tok/s", "speed-up", "KL to teacher"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(r["model"], str(r["layers"]), f"{r['params_m']:.1f}M", f"{r['pass_at_1']:.3f}", _fmt(r["pass_vs_teacher"], ".2f"),
                  f"{r['decode_tok_s']:.0f}", _fmt(r["speedup"], ".2f", "x"), _fmt(r["kl_to_teacher"]))
    console.print(t)


def _read_history(artifact) -> list[dict]:
    path = artifact.file("metrics.jsonl")
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chart(rows: list[dict], histories: dict[str, list[dict]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_panels = 3 if histories else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 4))
    names = [r["model"] for r in rows]
    colors = ["#4c72b0" if r["role"] == "teacher" else "#dd8452" for r in rows]
    axes[0].bar(names, [r["pass_at_1"] for r in rows], color=colors)
    axes[0].set_title("held-out pass@1 (greedy)")
    axes[0].set_ylim(0, min(1.0, max(r["pass_at_1"] for r in rows) * 1.25 + 0.02))
    axes[1].bar(names, [r["decode_tok_s"] for r in rows], color=colors)
    axes[1].set_title("decode tokens/s (batch 16)")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=20)
    if histories:
        ax = axes[2]
        for name, hist in histories.items():
            steps = range(1, len(hist) + 1)  # heal and task phases run back to back
            ax.plot(steps, [h["loss"] for h in hist], label=f"{name} loss")
            ax.plot(steps, [h["kl"] for h in hist], label=f"{name} KL", alpha=0.7)
        ax.set_title("training")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lineage_chain(artifact, runner) -> list[str]:
    """The chain of parents of an artifact, from the manifests, newest first."""
    by_id = {a.id: (name, a) for name, a in runner.results.items()}
    lines, seen = [], set()

    def walk(a, depth):
        if a.id in seen:
            return
        seen.add(a.id)
        name = by_id.get(a.id, (a.manifest.get("name"), a))[0]
        teachers = ", ".join(f"{t['spec']} ({t.get('license', '?')})" for t in a.manifest.get("teachers", []))
        lines.append(f"{'  ' * depth}- `{name}` {a.kind} `{a.id}` ({a.manifest['stage']})" + (f"; teachers: {teachers}" if teachers else ""))
        for pid in a.manifest.get("parents", []):
            if pid in by_id:
                walk(by_id[pid][1], depth + 1)

    walk(artifact, 0)
    return lines


def run_report(ctx) -> None:
    c = ctx.config
    title = c.title or f"stillhouse report: {ctx.recipe_name}"
    sections = [f"# {title}", ""]
    all_rows, histories = [], {}
    for i, ev_name in enumerate(c.evals):
        art = ctx.runner.results[ev_name]
        res = load_results(art)
        rows = table_rows(res)
        all_rows += rows
        n = next(iter(res["models"].values()))["n_problems"]
        print_table(rows, f"{title} ({res['task']['name']})")
        sections += [f"## {ev_name}: {res['task']['name']} (eval artifact `{art.id}`)", "", markdown_table(rows, n), ""]
    for tr_name in c.training:
        art = ctx.runner.results[tr_name]
        histories[tr_name] = _read_history(art)
        m = art.manifest.get("metrics", {})
        sections += [f"Training `{tr_name}` (model artifact `{art.id}`): {len(histories[tr_name])} steps, "
                     f"final loss {_fmt(m.get('final_loss'))}, KL {_fmt(m.get('final_kl'))}, {m.get('tokens_per_s')} tok/s.", ""]
    chart(all_rows, histories, ctx.out.path / "chart.png")
    sections += ["![results](chart.png)", "", f"Chart from eval artifact(s) {', '.join(ctx.runner.results[e].id for e in c.evals)}"
                 + (f" and training artifact(s) {', '.join(ctx.runner.results[t].id for t in c.training)}" if c.training else "") + ".", ""]
    sections += ["## Lineage (from manifests)", ""]
    for ev_name in c.evals:
        sections += lineage_chain(ctx.runner.results[ev_name], ctx.runner)
    write_text_atomic(ctx.out.path / "report.md", "\n".join(sections) + "\n")
    ctx.out.metrics["models"] = {r["model"]: {k: r[k] for k in ("pass_at_1", "decode_tok_s", "speedup", "params_m", "kl_to_teacher")} for r in all_rows}
    ctx.out.counts["tables"] = len(c.evals)
