"""Train / validation / test splits of the tasks stage: disjoint by question text, sized as asked."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from stillhouse.data.config import TasksStage
from stillhouse.data.splits import disjoint_splits
from stillhouse.data.stages import run_tasks
from stillhouse.eval.config import EvalStage
from stillhouse.records import read_rows

CFG = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}  # the quickstart's space: 1-digit sums repeat


def _stage(**splits) -> TasksStage:
    sizes = {"train": {"size": 300, "seed": 1}, "validation": {"size": 80, "seed": 2 * 10**6},
             "eval": {"size": 120, "seed": 10**6}} | splits
    return TasksStage(type="tasks", task="chain_sum", config=CFG, **sizes)


def _run(tmp_path, stage):
    out = SimpleNamespace(path=tmp_path, counts={}, warnings=[], extra={})
    run_tasks(SimpleNamespace(config=stage, out=out, name="problems"))
    return {n: read_rows(tmp_path / f"{n}.parquet") for n in ("train", "validation", "eval")
            if (tmp_path / f"{n}.parquet").exists()}, out


def test_three_splits_are_disjoint_by_question_and_test_is_kept_whole(tmp_path):
    splits, out = _run(tmp_path, _stage())
    q = {n: {r["question"] for r in rows} for n, rows in splits.items()}
    assert not q["train"] & q["validation"]
    assert not q["train"] & q["eval"]
    assert not q["validation"] & q["eval"]
    assert len(splits["eval"]) == out.counts["eval"] == 120  # the reported split is never trimmed
    # the small 1-digit space makes far-apart seeds collide: something was removed, and counted
    assert out.counts["removed_eval_overlap"] > 0
    assert len(splits["validation"]) == out.counts["validation"] == 80 - out.counts["removed_validation_overlap"]
    assert len(splits["train"]) == out.counts["train"] == 300 - out.counts["removed_eval_overlap"]


def test_without_validation_no_file_is_written(tmp_path):
    stage = TasksStage(type="tasks", task="chain_sum", config=CFG, train={"size": 50, "seed": 1}, eval={"size": 20, "seed": 10**6})
    splits, out = _run(tmp_path, stage)
    assert set(splits) == {"train", "eval"} and "validation" not in out.counts
    assert not {r["question"] for r in splits["train"]} & {r["question"] for r in splits["eval"]}


@pytest.mark.parametrize("bad", [{"validation": {"size": 80, "seed": 250}}, {"eval": {"size": 120, "seed": 290}}])
def test_overlapping_seed_ranges_are_refused_naming_the_split(bad):
    # problem i of a split is generated from seed + i, so these ranges would repeat whole problems
    with pytest.raises(ValueError, match=r"(validation|eval)\.seed: seeds .* overlap train's 1\.\.300"):
        _stage(**bad)


def test_disjoint_splits_counts_what_each_split_lost():
    row = lambda q: {"question": q}  # noqa: E731
    splits, removed = disjoint_splits([row("a"), row("b"), row("b"), row("c")], [row("c"), row("d")], [row("d"), row("e")],
                                      dedup_train=True)
    assert [r["question"] for r in splits["eval"]] == ["d", "e"]
    assert [r["question"] for r in splits["validation"]] == ["c"]
    assert [r["question"] for r in splits["train"]] == ["a", "b"]
    assert removed == {"removed_duplicates": 1, "removed_eval_overlap": 1, "removed_validation_overlap": 1}


def test_eval_stage_reads_the_test_split_unless_told():
    kw = dict(type="eval", tasks="problems", teacher="teacher", models={"teacher": "teacher"})
    assert EvalStage(**kw).split == "eval"
    assert EvalStage(**kw, split="validation").split == "validation"
    with pytest.raises(ValueError):
        EvalStage(**kw, split="train")  # training problems are never a measuring split


def test_humaneval_splits_share_no_problem(tmp_path):
    stage = TasksStage(type="tasks", task="humaneval", train={"size": 100, "seed": 1},
                       validation={"size": 30, "seed": 500}, eval={"size": 40, "seed": 1000})
    splits, out = _run(tmp_path, stage)
    ids = {n: {r["task_id"] for r in rows} for n, rows in splits.items()}
    assert [len(ids[n]) for n in ("train", "validation", "eval")] == [164 - 40 - 30, 30, 40]  # train gets what is left
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["eval"] or ids["validation"] & ids["eval"])


def test_a_split_can_draw_from_a_wider_space_and_stays_disjoint(tmp_path):
    # train on 3-term 1-digit sums as well, while the test split keeps the stage's 2-term config
    stage = _stage(train={"size": 200, "seed": 1, "config": {"max_terms": 3, "max_digits": 1}})
    assert stage.split_config("train") == {**CFG, "max_terms": 3, "max_digits": 1}
    splits, _ = _run(tmp_path, stage)
    terms = lambda rows: {json.loads(r["entry"])["metadata"]["num_terms"] for r in rows}  # noqa: E731
    assert terms(splits["train"]) == {2, 3} and terms(splits["eval"]) == {2}
    assert max(json.loads(r["entry"])["metadata"]["num_digits"] for r in splits["train"]) == 1
    assert not {r["question"] for r in splits["train"]} & {r["question"] for r in splits["eval"]}


def test_a_bad_split_config_is_refused_naming_the_split():
    with pytest.raises(ValueError, match=r"train\.config: bad config for task 'chain_sum'"):
        _stage(train={"size": 10, "seed": 1, "config": {"no_such_setting": 3}})
