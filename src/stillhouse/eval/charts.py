"""Report charts as PNG bytes (matplotlib, headless): embedded in HTML, written beside the Markdown."""

from __future__ import annotations

import io

TEACHER = "#4c72b0"
PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def human_count(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for div, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if n >= div:
            return f"{n / div:.{1 if div == 1e9 else 0}f} {unit}"
    return f"{n:.0f} B"


def colors_for(rows: list[dict]) -> list[str]:
    """The teacher in blue, each other model its own colour: the same in every chart of a report."""
    others = iter(PALETTE[1:] * 4)
    return [TEACHER if r["role"] == "teacher" else next(others) for r in rows]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, source: str | None = None) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    if source:  # the image names its artifact even when copied out of the report
        fig.subplots_adjust(bottom=fig.subplotpars.bottom + 0.04)
        fig.text(0.995, 0.005, source, ha="right", va="bottom", fontsize=7, color="#777777")
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return buf.getvalue()


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better on both), by x."""
    keep = [i for i, (x, y) in enumerate(points)
            if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(keep, key=lambda i: points[i][0])


def pareto(rows: list[dict], source: str | None = None) -> bytes:
    """Accuracy against decode speed; marker area follows parameter count; error bars are the CIs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pts = [(r["decode_tok_s"], r["pass_at_1"]) for r in rows]
    biggest = max(r["params"] for r in rows) or 1
    for r, (x, y), color in zip(rows, pts, colors_for(rows)):
        lo, hi = r.get("ci") or (y, y)
        ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], fmt="none", ecolor=color, alpha=0.5, capsize=3)
        ax.scatter(x, y, s=80 + 900 * r["params"] / biggest, color=color, alpha=0.75, edgecolor="black", linewidth=0.6)
        ax.annotate(f"{r['model']} ({human_count(r['params'])})", (x, y), textcoords="offset points", xytext=(8, 8), fontsize=9)
    front = pareto_frontier(pts)
    if len(front) > 1:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="#888888", lw=1, label="Pareto front")
        ax.legend(loc="lower left", fontsize=8)
    xs = [p[0] for p in pts]
    ax.set_xlim(0, max(xs) * 1.3)
    ax.set_ylim(-0.03, min(1.05, max(max((r.get("ci") or (0, r["pass_at_1"]))[1] for r in rows), 0.05) * 1.3))
    ax.set_xlabel(f"decode tokens/s (batch {rows[0].get('speed_batch') or 16})")
    ax.set_ylabel("pass@1 (greedy), 95% CI")
    ax.set_title("accuracy vs speed (marker area = parameters)")
    ax.grid(alpha=0.3)
    return _png(fig, source)


def training_curves(histories: dict[str, list[dict]], source: str | None = None) -> bytes:
    """Loss, KL to the teacher and learning rate per optimiser step; phases (heal, task) run back to back."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for i, (name, hist) in enumerate(histories.items()):
        color = PALETTE[i % len(PALETTE)]
        steps = list(range(1, len(hist) + 1))
        for ax, key in zip(axes, ("loss", "kl", "lr")):
            ys = [h.get(key) for h in hist]
            if any(y is not None for y in ys):
                ax.plot(steps, [float("nan") if y is None else y for y in ys], color=color, label=name, lw=1.2)
        phases = [h.get("phase") for h in hist]
        for s in range(1, len(phases)):
            if phases[s] != phases[s - 1]:
                for ax in axes:
                    ax.axvline(s + 0.5, color=color, ls=":", lw=1)
    for ax, title in zip(axes, ("training loss", "KL to teacher", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    for ax, key in zip(axes[:2], ("loss", "kl")):  # losses span orders of magnitude; plain 1-2-5 labels read better than 6x10^0
        if not any((h.get(key) or 0) > 0 for hist in histories.values() for h in hist):
            continue  # e.g. KL is 0 throughout an SFT-only run: nothing to put on a log axis
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    axes[0].legend(fontsize=8)
    return _png(fig, source)


def pass_rates(suites: list[str], models: list[dict], source: str | None = None) -> bytes:
    """Grouped bars: pass@1 per suite (task) and model, with 95% CIs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 1.4 * len(suites) * max(1, len(models)) / 2), 3.8))
    width = 0.8 / max(1, len(models))
    for j, (m, color) in enumerate(zip(models, colors_for(models))):
        xs, ys, errs = [], [], [[], []]
        for i, su in enumerate(suites):
            r = m["suites"].get(su)
            if r is None:
                continue
            lo, hi = r.get("ci") or (r["pass_at_1"], r["pass_at_1"])
            xs.append(i + (j - (len(models) - 1) / 2) * width)
            ys.append(r["pass_at_1"])
            errs[0].append(r["pass_at_1"] - lo)
            errs[1].append(hi - r["pass_at_1"])
        ax.bar(xs, ys, width=width * 0.95, color=color, label=m["model"], yerr=errs, capsize=3, ecolor="#333333")
    ax.set_xticks(range(len(suites)), suites)
    ax.set_ylabel("pass@1 (greedy)")
    top = max([(r.get("ci") or (0, r["pass_at_1"]))[1] for m in models for r in m["suites"].values()] + [0.05])
    ax.set_ylim(0, min(1.0, top * 1.25))
    ax.set_title("pass rate per task, 95% CI")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig, source)
