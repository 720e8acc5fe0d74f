"""The quickstart's figures from a finished workspace, each naming the split it comes from.

    .venv/bin/python bench/quickstart_figures.py WORKSPACE [--eval STAGE] [--student LABEL]

Reads the newest eval artifact (or the one of stage STAGE: results.json, per-problem
outputs.parquet) and the tasks artifact it measured (train.parquet, and eval.parquet = the
test split or validation.parquet, whichever the eval stage read). "Unseen" test problems are those
whose question text never occurs in the training split; with the quickstart's disjoint splits
that is all of them, so the breakdown by operand digits against the size of chain_sum's problem
space shows how much of each part of the space training covered (1-digit sums: 200 questions).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stillhouse.data.dedup import normalize
from stillhouse.eval.metrics import bootstrap_ci
from stillhouse.records import read_rows

TARGETS = {"unseen_ratio": 1.3, "layers_fraction": 0.5, "speedup": 1.8, "wall_s": 900, "rss_gb": 6.0}


def chain_sum_space(terms: int, digits: int) -> int:
    """Distinct chain_sum questions (no negation): operands 0..9 for 1 digit, else 10^(d-1)..10^d - 1; +/- between."""
    values = 10 if digits == 1 else 9 * 10 ** (digits - 1)
    return values**terms * 2 ** (terms - 1)


def pass_rate(outcomes: list[bool]) -> float:
    return sum(outcomes) / len(outcomes) if outcomes else float("nan")


def paired_interval(student: list[bool], teacher: list[bool], seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95% interval of student-minus-teacher pass@1 over the same problems."""
    return bootstrap_ci([float(s) - float(t) for s, t in zip(student, teacher)], resamples=2000, seed=seed)


def _latest(ws: Path, kind: str, **match: str) -> Path:
    cands = []
    for m in (ws / kind).glob("*/manifest.json"):
        manifest = json.loads(m.read_text())
        if all(manifest.get(k) == v for k, v in match.items()):
            cands.append(m.parent)
    if not cands:
        raise SystemExit(f"{ws}: no {kind} artifact {match or ''}")
    return max(cands, key=lambda p: p.stat().st_mtime)


def figures(ws: Path, student: str = "distilled", eval_stage: str | None = None) -> dict:
    """Figures of one eval artifact; the student's (and its targets) only if it was evaluated."""
    ev = _latest(ws, "eval", **({"name": eval_stage} if eval_stage else {}))
    res = json.loads((ev / "results.json").read_text())
    split = res.get("split", "test")
    rows = read_rows(ev / "outputs.parquet")
    tasks = _latest(ws, "dataset", stage="tasks")
    train_q = {normalize(r["question"]) for r in read_rows(tasks / "train.parquet")}
    test = {r["id"]: r for r in read_rows(tasks / ("eval.parquet" if split == "test" else "validation.parquet"))}
    teacher_label = res["teacher"]
    student = student if student in res["models"] else None
    by_model: dict[str, dict[str, bool]] = {}
    for r in rows:
        if r["id"] in test:
            by_model.setdefault(r["model"], {})[r["id"]] = bool(r["passed"])
    ids = sorted(test)
    unseen = [i for i in ids if normalize(test[i]["question"]) not in train_q]
    meta = {i: json.loads(test[i]["entry"]).get("metadata", {}) for i in ids}
    out = {"split": split, "n": len(ids), "n_unseen": len(unseen), "n_distinct": len({normalize(test[i]["question"]) for i in ids}),
           "teacher": teacher_label, "student": student, "models": {}, "by_digits": {}, "by_answer": {}}
    for label, m in res["models"].items():
        got = by_model.get(label, {})
        out["models"][label] = {"layers": m["layers"], "params": m["params"], "decode_tok_per_s": m["decode_tok_per_s"],
                                "speed_batch": m.get("speed_batch"), "pass_at_1": pass_rate([got[i] for i in ids]),
                                "pass_at_1_unseen": pass_rate([got[i] for i in unseen])}
    t, s = by_model[teacher_label], by_model.get(student)
    out["unseen_diff_ci"] = paired_interval([s[i] for i in unseen], [t[i] for i in unseen]) if s else None
    train_rows = read_rows(tasks / "train.parquet")
    train_meta = [json.loads(r["entry"]).get("metadata", {}) for r in train_rows]
    for d in sorted({m.get("num_digits") for m in meta.values()} - {None}):
        sel = [i for i in unseen if meta[i].get("num_digits") == d]
        terms = {meta[i].get("num_terms") for i in sel}
        space = chain_sum_space(next(iter(terms)), d) if len(terms) == 1 and res["task"]["name"] == "chain_sum" else None
        # training questions of the same shape (digits and number of terms) as these test problems
        same = [r for r, m in zip(train_rows, train_meta) if m.get("num_digits") == d and m.get("num_terms") in terms]
        trained = {normalize(r["question"]) for r in same}
        out["by_digits"][d] = {"n_unseen": len(sel), "teacher": pass_rate([t[i] for i in sel]),
                               "student": pass_rate([s[i] for i in sel]) if s else None,
                               "space": space, "train_distinct": len(trained), "train_rows": len(same),
                               "diff_ci": paired_interval([s[i] for i in sel], [t[i] for i in sel]) if s else None}
    if res["task"]["name"] == "gcd":
        # most gcd pairs the teacher misses are coprime (answer 1): does the student's lead come only from saying "1"?
        for name, keep in (("answer 1 (coprime)", lambda a: a == "1"), ("answer > 1", lambda a: a != "1")):
            sel = [i for i in unseen if keep(str(test[i]["answer"]).strip())]
            out["by_answer"][name] = {"n_unseen": len(sel), "teacher": pass_rate([t[i] for i in sel]),
                                      "student": pass_rate([s[i] for i in sel]) if s else None,
                                      "diff_ci": paired_interval([s[i] for i in sel], [t[i] for i in sel]) if s and sel else None}
    return out


def print_figures(ws: Path, run: dict | None = None, student: str = "distilled", eval_stage: str | None = None) -> None:
    f = figures(ws, student, eval_stage)
    sp = f["split"]
    teacher, stu = f["models"][f["teacher"]], f["models"].get(f["student"])
    if run:
        load = run.get("load_1min_at_end")
        cpu = f", CPU {run['cpu_s']:.0f} s of the process tree" if "cpu_s" in run else ""
        print(f"\npreset {run['preset']}: wall {run['wall_s']:.0f} s{cpu} (target <= {TARGETS['wall_s']}; "
              f"{'includes' if run['includes_conversion'] else 'excludes'} the one-off model conversion), "
              f"peak RSS of the process tree {run['peak_tree_rss_bytes'] / 1e9:.2f} GB (target <= {TARGETS['rss_gb']:.0f}; "
              f"largest single process {run['peak_single_rss_bytes'] / 1e9:.2f} GB); 1-min load at the end {load:.1f} on {run['cpus']} CPUs")
    print(f"\n{sp} split: {f['n']} problems ({f['n_distinct']} distinct questions), {f['n_unseen']} never occur in training")
    print(f"{'model':10} {'layers':>6} {'params':>8} {'pass@1 ' + sp:>13} {'unseen':>7} {'tok/s b16':>9} {'pass vs T':>9} {'speed vs T':>10}")
    for label, m in f["models"].items():
        rp = m["pass_at_1_unseen"] / teacher["pass_at_1_unseen"] if teacher["pass_at_1_unseen"] else float("nan")
        print(f"{label:10} {m['layers']:>6} {m['params'] / 1e6:>7.1f}M {m['pass_at_1']:>13.3f} {m['pass_at_1_unseen']:>7.3f} "
              f"{m['decode_tok_per_s']:>9.0f} {rp:>9.2f} {m['decode_tok_per_s'] / teacher['decode_tok_per_s']:>9.2f}x")
    if stu:
        lo, hi = f["unseen_diff_ci"]
        print(f"{f['student']} - {f['teacher']} on unseen {sp} problems: "
              f"{stu['pass_at_1_unseen'] - teacher['pass_at_1_unseen']:+.3f}, paired bootstrap 95% interval [{lo:+.3f}, {hi:+.3f}]")
    if f["by_answer"]:
        print(f"\nby answer ({sp} split, unseen problems):")
    for name, b in f["by_answer"].items():
        versus = f"student {b['student']:.3f}  diff 95% [{b['diff_ci'][0]:+.3f}, {b['diff_ci'][1]:+.3f}]" if b["diff_ci"] else ""
        print(f"  {name}: n={b['n_unseen']:>4}  teacher {b['teacher']:.3f}  {versus}")
    if f["by_digits"]:
        print(f"\nby operand digits ({sp} split, unseen problems; training coverage of chain_sum's question space):")
    for d, b in f["by_digits"].items():
        space = f"{b['space']}" if b["space"] else "?"
        versus = f"student {b['student']:.3f}  diff 95% [{b['diff_ci'][0]:+.3f}, {b['diff_ci'][1]:+.3f}]  " if stu else ""
        print(f"  {d}-digit: n={b['n_unseen']:>4}  teacher {b['teacher']:.3f}  {versus}same-shape train rows {b['train_rows']}, "
              f"distinct {b['train_distinct']} of {space} possible questions")
    if not stu:
        return
    ratio = stu["pass_at_1_unseen"] / teacher["pass_at_1_unseen"] if teacher["pass_at_1_unseen"] else float("inf")
    checks = [(f"pass@1 on unseen {sp} problems >= {TARGETS['unseen_ratio']}x teacher", ratio >= TARGETS["unseen_ratio"], f"{ratio:.2f}x"),
              ("paired 95% interval excludes zero", lo > 0 or hi < 0, f"[{lo:+.3f}, {hi:+.3f}]"),
              (f"layers <= {TARGETS['layers_fraction']} of teacher's", stu["layers"] <= TARGETS["layers_fraction"] * teacher["layers"],
               f"{stu['layers']}/{teacher['layers']}"),
              (f"decode tok/s (batch {stu['speed_batch']}) >= {TARGETS['speedup']}x", stu["decode_tok_per_s"] >= TARGETS["speedup"] * teacher["decode_tok_per_s"],
               f"{stu['decode_tok_per_s'] / teacher['decode_tok_per_s']:.2f}x")]
    if run:
        checks += [(f"wall <= {TARGETS['wall_s']} s", run["wall_s"] <= TARGETS["wall_s"], f"{run['wall_s']:.0f} s"),
                   (f"peak RSS <= {TARGETS['rss_gb']:.0f} GB", run["peak_tree_rss_bytes"] <= TARGETS["rss_gb"] * 1e9,
                    f"{run['peak_tree_rss_bytes'] / 1e9:.2f} GB")]
    print("\ntargets (issue 18):")
    for name, ok, value in checks:
        print(f"  {'MET   ' if ok else 'MISSED'} {name}: {value}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--eval", default=None, help="the eval stage's name (default: the newest eval artifact)")
    ap.add_argument("--student", default="distilled")
    args = ap.parse_args()
    bench = args.workspace / "bench-quickstart.json"
    print_figures(args.workspace, json.loads(bench.read_text()) if bench.is_file() else None, args.student, args.eval)
