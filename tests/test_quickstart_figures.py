"""bench/quickstart_figures.py: unseen-problem pass@1, its paired interval and the digit breakdown,
on a hand-made workspace whose answers are known."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stillhouse.records import write_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from quickstart_figures import chain_sum_space, figures, print_figures  # noqa: E402


def _problem(i: int, a: int, b: int) -> dict:
    digits = 1 if a < 10 else 2
    q = f"State the final answer to the following arithmetic problem: {a} + {b} ="
    meta = {"num_terms": 2, "num_digits": digits}
    return {"id": f"chain_sum-7-{i}", "question": q, "answer": str(a + b), "entry": json.dumps({"metadata": meta})}


def _workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    tasks = ws / "dataset" / "t1"
    tasks.mkdir(parents=True)
    (tasks / "manifest.json").write_text(json.dumps({"stage": "tasks"}))
    test = [_problem(i, a, b) for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8)] + [(10 + i, 20 + i) for i in range(16)])]
    write_rows(tasks / "eval.parquet", test)
    write_rows(tasks / "train.parquet", [test[0] | {"id": "chain_sum-1-0"}, _problem(99, 40, 50)])  # one test question leaked
    ev = ws / "eval" / "e1"
    ev.mkdir(parents=True)
    (ev / "manifest.json").write_text(json.dumps({"stage": "eval"}))
    models = {"teacher": {"layers": 30, "params": 135e6, "decode_tok_per_s": 100.0, "speed_batch": 16},
              "distilled": {"layers": 14, "params": 70e6, "decode_tok_per_s": 200.0, "speed_batch": 16}}
    (ev / "results.json").write_text(json.dumps({"teacher": "teacher", "models": models, "split": "test",
                                                 "task": {"name": "chain_sum"}}))
    # teacher passes the 1-digit ones only; the student passes everything
    rows = [{"model": "teacher", "suite": "chain_sum", "id": p["id"], "passed": i < 4} for i, p in enumerate(test)]
    rows += [{"model": "distilled", "suite": "chain_sum", "id": p["id"], "passed": True} for p in test]
    write_rows(ev / "outputs.parquet", rows)
    return ws


def test_unseen_problems_exclude_questions_seen_in_training(tmp_path):
    f = figures(_workspace(tmp_path))
    assert (f["split"], f["n"], f["n_unseen"]) == ("test", 20, 19)
    assert f["models"]["teacher"]["pass_at_1"] == 4 / 20
    assert f["models"]["teacher"]["pass_at_1_unseen"] == 3 / 19  # the leaked question is not counted
    assert f["models"]["distilled"]["pass_at_1_unseen"] == 1.0
    lo, hi = f["unseen_diff_ci"]
    assert 0 < lo <= 16 / 19 <= hi  # the student wins on 16 of 19 pairs: the interval excludes zero
    one, two = f["by_digits"][1], f["by_digits"][2]
    assert (one["n_unseen"], one["teacher"], one["space"], one["train_distinct"]) == (3, 1.0, 200, 1)
    assert (two["n_unseen"], two["teacher"], tuple(two["diff_ci"])) == (16, 0.0, (1.0, 1.0))


def test_printed_targets_name_the_split(tmp_path, capsys):
    run = {"preset": "quickstart", "wall_s": 1000.0, "peak_tree_rss_bytes": 2e9, "peak_single_rss_bytes": 1e9,
           "includes_conversion": True, "load_1min_at_end": 3.0, "cpus": 2}
    print_figures(_workspace(tmp_path), run)
    out = capsys.readouterr().out
    assert "unseen test problems" in out and "test split: 20 problems" in out
    assert "MISSED wall <= 900 s: 1000 s" in out and "MET    peak RSS <= 6 GB" in out
    assert "MET    decode tok/s (batch 16) >= 1.8x: 2.00x" in out


def test_chain_sum_space_counts_operands_and_operators():
    assert chain_sum_space(2, 1) == 200  # 0..9 twice, + or -
    assert chain_sum_space(2, 2) == 90 * 90 * 2
    assert chain_sum_space(3, 1) == 1000 * 4


def test_teacher_only_evaluation_prints_the_bar_without_targets(tmp_path, capsys):
    ws = _workspace(tmp_path)
    res_path = next((ws / "eval").glob("*/results.json"))
    res = json.loads(res_path.read_text())
    del res["models"]["distilled"]
    res_path.write_text(json.dumps(res))
    f = figures(ws)
    assert f["student"] is None and f["unseen_diff_ci"] is None and f["by_digits"][1]["student"] is None
    print_figures(ws)
    out = capsys.readouterr().out
    assert "1-digit: n=   3  teacher 1.000  same-shape train rows 1" in out and "targets" not in out


def test_validation_recipe_keeps_the_presets_stages_and_measures_only_validation():
    import yaml

    from quickstart_validation import validation_recipe
    from stillhouse.recipe import builtin_recipe

    preset = yaml.safe_load(builtin_recipe("quickstart").read_text())["stages"]
    d = validation_recipe("quickstart", ["teacher", "distilled"])
    ev = d["stages"].pop("on_validation")
    assert ev["split"] == "validation" and set(ev["models"]) == {"teacher", "distilled"}
    # the data and training stages are the preset's own, unchanged (so a bench workspace's artifacts are reused)
    assert d["stages"] == {n: s for n, s in preset.items() if s["type"] not in ("eval", "report")}
