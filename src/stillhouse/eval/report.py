"""Reports: evaluations and training histories as one document (report.md + report.html + PNGs).

Read from artifacts only (never re-runs anything): `eval` artifacts give the comparison table,
the Pareto chart and pass rates per task; `train` model artifacts give the training curves
(`metrics.jsonl`); manifests give the lineage. Every table and chart names its artifact.
Used by the recipe's `report` stage and by `stillhouse report`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import MANIFEST, Artifact, ArtifactStore
from ..errors import StillhouseError
from ..fsutil import write_text_atomic
from . import charts
from .document import Bullets, Document, Figure, Section, Table, to_html, to_markdown


def _fmt(v, spec: str = ".3f", suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def _mean_of(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _x(v) -> str:
    return "" if v is None else f" ({v:.2f}x)"


# -- reading artifacts ---------------------------------------------------------------------
def load_results(artifact: Artifact) -> dict:
    return json.loads(artifact.file("results.json").read_text())


def read_history(artifact: Artifact) -> list[dict]:
    path = artifact.file("metrics.jsonl")
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _suite_names(res: dict) -> list[str]:
    if "suites" in res:
        return [s["name"] for s in res["suites"]]
    return [res["task"]["name"]]  # results written before suites existed


def table_rows(res: dict) -> list[dict]:
    """One row per model; reads both current results and the first (single-task) format."""
    rows = []
    suite_names = _suite_names(res)
    for label, r in res["models"].items():
        vs = r.get("vs_teacher") or {"pass_at_1": r.get("pass_at_1_vs_teacher"), "decode_tok_per_s": r.get("speedup_vs_teacher"),
                                     "params": r.get("params_vs_teacher")}
        suites = r.get("suites") or {suite_names[0]: {"pass_at_1": r["pass_at_1"], "n": r.get("n_problems")}}
        rows.append({
            "model": label, "role": r["role"], "layers": r.get("layers"), "params": r["params"], "params_m": r["params"] / 1e6,
            "pass_at_1": r["pass_at_1"], "ci": r.get("pass_at_1_ci"), "diff_ci": r.get("pass_at_1_diff_ci"),
            "n": r.get("n_problems"), "agreement": r.get("agreement_with_teacher"), "kl": r.get("kl_to_teacher"),
            "kl_note": r.get("kl_note"), "decode_tok_s": r["decode_tok_per_s"], "decode_tok_s_b1": r.get("decode_tok_per_s_b1"),
            "speed_batch": r.get("speed_batch", 16), "ttft_s": r.get("ttft_s"), "disk": r.get("disk_bytes"),
            "rss": r.get("peak_rss_bytes"), "ppl": r.get("perplexity"), "vs": vs, "artifact": r.get("artifact"),
            "spec": r.get("spec"), "suites": {k: {**v, "ci": v.get("pass_at_1_ci")} for k, v in suites.items()},
        })
    return rows


def _verdict(diff_ci) -> str:
    if not diff_ci:
        return ""
    lo, hi = diff_ci
    return " noise" if lo <= 0 <= hi else (" better" if lo > 0 else " worse")


def _teacher_pass(rows: list[dict]) -> float | None:
    return next((x["pass_at_1"] for x in rows if x["role"] == "teacher"), None)


def _name(r: dict) -> str:
    return f"**{r['model']}**" if r["role"] == "teacher" else r["model"]


def accuracy_table(rows: list[dict]) -> Table:
    """Rows models: accuracy with its interval, and closeness to the teacher."""
    n = rows[0]["n"]
    headers = ["model", f"pass@1 (n={n}) [95% CI]", "vs teacher", "difference to teacher [95% CI]",
               "agrees with teacher", "KL to teacher", "perplexity"]
    t_pass, out = _teacher_pass(rows), []
    for r in rows:
        vs = r["vs"] if r["role"] != "teacher" else {}
        ci = f" [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if r["ci"] else ""
        diff = (f"{r['pass_at_1'] - t_pass:+.3f} [{r['diff_ci'][0]:+.3f}, {r['diff_ci'][1]:+.3f}]{_verdict(r['diff_ci'])}"
                if r["diff_ci"] and t_pass is not None else "-")
        kl = "n/a (tokenizers differ)" if r["kl"] is None and r["kl_note"] else _fmt(r["kl"])
        out.append([_name(r), f"{r['pass_at_1']:.3f}{ci}", _fmt(vs.get("pass_at_1"), ".2f", "x"), diff,
                    _fmt(r["agreement"], ".3f"), kl, _fmt(r["ppl"], ".2f")])
    return Table(headers, out, [False] + [True] * (len(headers) - 1))


def speed_table(rows: list[dict]) -> Table:
    """Rows models: size, speed and memory; a student's figures also as a fraction of the teacher's."""
    from .charts import human_bytes, human_count

    b = rows[0]["speed_batch"]
    headers = ["model", "params", "layers", "decode tok/s (batch 1)", f"decode tok/s (batch {b})", "time to first token",
               "disk", "peak RSS"]
    out = []
    for r in rows:
        vs = r["vs"] if r["role"] != "teacher" else {}
        out.append([
            _name(r), human_count(r["params"]) + _x(vs.get("params")), str(r["layers"] or "-"),
            _fmt(r["decode_tok_s_b1"], ".0f") + _x(vs.get("decode_tok_per_s_b1")),
            f"{r['decode_tok_s']:.0f}{_x(vs.get('decode_tok_per_s'))}",
            _fmt(None if r["ttft_s"] is None else r["ttft_s"] * 1000, ".1f", " ms") + _x(vs.get("ttft_s")),
            ("-" if r["disk"] is None else human_bytes(r["disk"])) + _x(vs.get("disk_bytes")),
            ("-" if r["rss"] is None else human_bytes(r["rss"])) + _x(vs.get("peak_rss_bytes")),
        ])
    return Table(headers, out, [False] + [True] * (len(headers) - 1))


def print_tables(rows: list[dict], title: str, out=None) -> None:
    print_table(accuracy_table(rows), f"{title}: accuracy", out)
    print_table(speed_table(rows), f"{title}: speed and size", out)


def print_table(table: Table, title: str, out=None) -> None:
    """On `out` (a rich Console; default: the progress console on stderr)."""
    from rich.table import Table as RichTable

    from ..progress import console

    console = out or console
    rows = [[c.replace("**", "") for c in row] for row in table.rows]
    t = RichTable(title=title)
    mins = []
    for i, h in enumerate(table.headers):
        # a header may wrap between words, never inside one; a cell (a figure) never wraps
        mins.append(max([len(w) for w in h.split()] + [len(r[i]) for r in rows]))
        t.add_column(h, justify="right" if table.numeric[i] else "left", min_width=mins[i], overflow="fold")
    for row in rows:
        t.add_row(*row)
    # narrower than that (80 columns, a CI log) the table runs wider than the console instead of folding letters
    console.print(t, width=max(console.width, sum(mins) + 3 * len(mins) + 1), crop=False)


# -- which artifacts a report covers ---------------------------------------------------------
@dataclass
class Sources:
    evals: list[Artifact] = field(default_factory=list)
    trainings: list[Artifact] = field(default_factory=list)
    roots: set[Path] = field(default_factory=set)  # workspaces in which to look up parents

    def add(self, art: Artifact) -> None:
        self.roots.add(art.path.parent.parent)
        if art.kind == "eval" and all(a.id != art.id for a in self.evals):
            self.evals.append(art)
        elif art.kind == "model" and art.manifest.get("stage") == "train" and all(a.id != art.id for a in self.trainings):
            self.trainings.append(art)

    def add_models_of_evals(self) -> None:
        """Training curves of every trained model an evaluation covered (found by its artifact directory)."""
        for ev in list(self.evals):
            for r in load_results(ev)["models"].values():
                spec = r.get("spec")
                if spec and (Path(spec) / MANIFEST).is_file():
                    self.add(Artifact.open(spec))

    def index(self) -> dict[str, Artifact]:
        idx = {}
        for root in self.roots:
            for a in ArtifactStore(root).all():
                idx.setdefault(a.id, a)
        return idx


def resolve_targets(targets: list[str], workspace: Path) -> Sources:
    """A workspace (every evaluation and trained model in it), or artifacts by path/id (a report
    artifact stands for what it covered)."""
    src = Sources()
    store = ArtifactStore(workspace)
    for t in targets:
        p = Path(t)
        if p.is_dir() and not (p / MANIFEST).is_file() and any((p / k).is_dir() for k in ("eval", "model")):
            ws = ArtifactStore(p)
            arts = [a for a in ws.all() if a.kind in ("eval", "model")]
            for a in arts:
                src.add(a)
            src.roots.add(p)
            continue
        art = store.find(t)
        if art.kind == "report":
            idx = {a.id: a for a in ArtifactStore(art.path.parent.parent).all()}
            for pid in art.manifest.get("parents", []):
                if pid in idx:
                    src.add(idx[pid])
        elif art.kind == "eval" or (art.kind == "model" and art.manifest.get("stage") == "train"):
            src.add(art)
        else:
            raise StillhouseError(f"cannot report on {art.kind} artifact {art.id} ({art.manifest.get('stage')}): "
                                  "give an eval artifact, a trained model, a report or a workspace")
    src.add_models_of_evals()
    if not src.evals and not src.trainings:
        raise StillhouseError(f"nothing to report in {', '.join(targets)}: no eval artifact or trained model")
    return src


# -- the document ---------------------------------------------------------------------------
def lineage_items(art: Artifact, index: dict[str, Artifact], names: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """The chain of parents of an artifact from the manifests, as (depth, text), newest first."""
    items, seen = [], set()

    def walk(a: Artifact, depth: int):
        if a.id in seen:
            items.append((depth, f"`{a.id}` (see above)"))
            return
        seen.add(a.id)
        name = (names or {}).get(a.id) or a.manifest.get("name") or a.id
        teachers = ", ".join(f"{t['spec']} ({t.get('license', '?')})" for t in a.manifest.get("teachers", []))
        items.append((depth, f"`{name}`: {a.kind} `{a.id}` from stage {a.manifest.get('stage')}"
                      + (f"; teachers: {teachers}" if teachers else "")))
        for pid in a.manifest.get("parents", []):
            if pid in index:
                walk(index[pid], depth + 1)
            else:
                items.append((depth + 1, f"`{pid}` (not in this workspace)"))

    walk(art, 0)
    return items


def lineage_graph(art: Artifact) -> Figure | None:
    """The lineage package's picture of an artifact's ancestry (stages, artifacts, teachers)."""
    import tempfile

    from ..lineage import load_lineage
    from ..lineage.render import draw

    try:
        lin = load_lineage(ArtifactStore(art.path.parent.parent), str(art.path))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "lineage.png"
            draw(lin, out)
            return Figure(f"lineage-{art.id[:8]}.png", out.read_bytes(), f"lineage graph of {art.id}")
    except (StillhouseError, OSError, ValueError, KeyError):
        return None  # a partial lineage (artifacts moved or deleted) still has the list below


def build_document(src: Sources, title: str, names: dict[str, str] | None = None) -> Document:
    sections, points = [], []
    for ev in src.evals:
        res = load_results(ev)
        rows = table_rows(res)
        suites = _suite_names(res)
        label = (names or {}).get(ev.id) or ev.manifest.get("name") or "evaluation"
        teacher = res.get("teacher")
        blocks = [accuracy_table(rows), speed_table(rows)]
        if teacher:
            blocks.append(f"Students are compared with **{teacher}** on the same problems; 'vs teacher' and the figures "
                          "in parentheses are the student's as a fraction of the teacher's. Intervals are 95% bootstrap "
                          "intervals over problems; the difference interval is paired (same problems), and 'noise' means "
                          "it includes zero. Speeds are best-of-two wall-clock runs on the machine that ran the evaluation.")
        blocks.append(Figure(f"pass-rates-{ev.id[:8]}.png", charts.pass_rates(suites, rows, f"eval artifact {ev.id}"),
                             "pass rate per task"))
        split = f" ({res['split']} split)" if res.get("split") else ""  # which tasks split the figures come from
        sections.append(Section(f"{label}: {', '.join(suites)}{split}", blocks, f"eval artifact `{ev.id}` (results.json)"))
        prefix = f"{label}/" if len(src.evals) > 1 else ""
        points += [{**r, "model": prefix + r["model"]} for r in rows]
    if points:
        sections.insert(len(src.evals), Section(
            "Accuracy against speed", [Figure("pareto.png", charts.pareto(points, "eval artifact(s) " + ", ".join(e.id for e in src.evals)),
                                                      "accuracy vs decode speed")],
            "eval artifact(s) " + ", ".join(f"`{e.id}`" for e in src.evals)))
    if src.trainings:
        hists = {((names or {}).get(t.id) or t.manifest.get("name") or t.id): read_history(t) for t in src.trainings}
        blocks = []
        for t in src.trainings:
            hist = read_history(t)
            n = len(hist)
            tail = hist[-10:]  # the manifest's own summary when there is one, else the last steps'
            m = {"final_loss": _mean_of(tail, "loss"), "final_kl": _mean_of(tail, "kl"), "tokens_per_s": _mean_of(tail, "tokens_per_s"),
                 **{k: v for k, v in t.manifest.get("metrics", {}).items() if v is not None}}
            blocks.append(f"`{(names or {}).get(t.id) or t.manifest.get('name')}`: {n} steps, final loss {_fmt(m.get('final_loss'))}, "
                          f"KL to teacher {_fmt(m.get('final_kl'))}, {_fmt(m.get('tokens_per_s'), '.0f')} training tokens/s.")
        if any(hists.values()):
            blocks.append(Figure("training.png", charts.training_curves({k: v for k, v in hists.items() if v},
                                                                     "model artifact(s) " + ", ".join(t.id for t in src.trainings)),
                                 "training loss, KL to teacher and learning rate"))
        else:
            blocks.append("No per-step metrics (metrics.jsonl) in these training artifacts.")
        sections.append(Section("Training", blocks, "model artifact(s) " + ", ".join(f"`{t.id}` (metrics.jsonl)" for t in src.trainings)))
    index = src.index()
    for a in src.evals + src.trainings:
        index.setdefault(a.id, a)
    items = []
    tops = src.evals or src.trainings
    for a in tops:
        items += lineage_items(a, index, names)
    graphs = [f for f in (lineage_graph(a) for a in tops) if f is not None]
    sections.append(Section("Lineage", [*graphs, "The chain of parents, from the manifests:", Bullets(items)],
                            "manifest.json of each artifact listed"))
    intro = (f"{len(src.evals)} evaluation(s) and {len(src.trainings)} training run(s), read from artifacts; "
             "every table and chart names the artifact it came from.")
    return Document(title, intro, sections)


def write_document(doc: Document, out_dir: Path) -> None:
    for f in doc.figures():
        tmp = out_dir / f".{f.filename}.tmp"
        tmp.write_bytes(f.png)
        tmp.replace(out_dir / f.filename)
    write_text_atomic(out_dir / "report.md", to_markdown(doc))
    write_text_atomic(out_dir / "report.html", to_html(doc))


# -- the recipe stage and the command ---------------------------------------------------------
def run_report(ctx) -> None:
    c = ctx.config
    title = c.title or f"stillhouse report: {ctx.recipe_name}"
    src = Sources()
    for name in c.evals:
        src.add(ctx.runner.results[name])
    for name in c.training:
        src.add(ctx.runner.results[name])
    src.add_models_of_evals()
    names = {a.id: n for n, a in ctx.runner.results.items()}
    doc = build_document(src, title, names)
    for ev in src.evals:
        res = load_results(ev)
        split = f", {res['split']} split" if res.get("split") else ""
        print_tables(table_rows(res), f"{title} ({names.get(ev.id, ev.id)}{split})")
    write_document(doc, ctx.out.path)
    ctx.out.metrics["models"] = {r["model"]: {k: r[k] for k in ("pass_at_1", "decode_tok_s", "params_m", "kl")}
                                 for ev in src.evals for r in table_rows(load_results(ev))}
    ctx.out.counts.update(tables=len(src.evals), figures=len(doc.figures()))


def run_report_artifacts(ctx) -> None:
    """The `report_artifacts` stage: a report on artifacts named by directory (`stillhouse report`)."""
    c = ctx.config
    src = Sources()
    for p in c.artifacts:
        src.add(Artifact.open(p))
    src.add_models_of_evals()
    doc = build_document(src, c.title or "stillhouse report")
    write_document(doc, ctx.out.path)
    ctx.out.counts.update(tables=len(src.evals), figures=len(doc.figures()))
    ctx.out.extra["parents"] = [a.id for a in src.evals + src.trainings]  # outside the recipe: lineage follows them


def make_report(targets: list[str], workspace: Path, title: str | None = None, force: bool = False) -> Artifact:
    """`stillhouse report`: a one-stage recipe (`report_artifacts`) run in `workspace`, so an
    existing report of the same artifacts and title is reused."""
    from .compare import run_one_stage

    src = resolve_targets(targets, workspace)  # bad targets are named before anything is written
    stage = {"type": "report_artifacts", "artifacts": [str(a.path.resolve()) for a in src.evals + src.trainings],
             "title": title or "stillhouse report"}
    return run_one_stage("report", stage, workspace, force)[0]
