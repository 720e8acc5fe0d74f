"""The `filter` stage: added through the stage registry alone (config class, run function,
one registration), it keeps the records that pass a verifier and a completion-length bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stillhouse.data.filter import filter_records
from stillhouse.artifacts import ArtifactStore
from stillhouse.errors import StillhouseError
from stillhouse.lineage import load_lineage, teacher_shares
from stillhouse.recipe import parse_recipe
from stillhouse.records import read_rows
from stillhouse.runner import Runner
from stillhouse.verify.base import Verdict

ANSWERS = ["2", "33", "444", "5555", "66666", "777777"]


def _recipe(tmp_path: Path, tok_dir: Path, **filter_fields) -> dict:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": a}) + "\n" for i, a in enumerate(ANSWERS)))
    return {"name": "filtered", "stages": {
        "pairs": {"type": "import", "path": str(pairs), "tokenizer": str(tok_dir), "origin": {"teacher": "org/t", "license": "mit"}},
        "short": {"type": "filter", "data": "pairs", **filter_fields},
    }}


def test_a_length_bound_keeps_the_records_inside_it(tmp_path, tiny_model_dir):
    # the character-level test tokenizer: a completion of n characters is n ids plus end-of-turn
    recipe = parse_recipe(_recipe(tmp_path, tiny_model_dir, min_completion_tokens=3, max_completion_tokens=5))
    results = Runner(recipe, tmp_path / "ws").run()
    art = results["short"]
    kept = read_rows(art.file("data.parquet"))
    assert [r["completion"] for r in kept] == ["33", "444", "5555"]
    assert [r["id"] for r in kept] == ["import/1", "import/2", "import/3"]  # the parent's records, unchanged
    assert art.manifest["counts"]["dropped_length"] == 3 and art.manifest["counts"]["records"] == 3
    assert art.manifest["kind"] == "dataset" and art.manifest["parents"] == [results["pairs"].id]
    # lineage follows the filter to the parent's declared origin
    shares = teacher_shares(load_lineage(ArtifactStore(tmp_path / "ws"), art.id))
    assert [(s.spec, round(s.share, 6)) for s in shares] == [("org/t", 1.0)]
    # a rerun reuses it; another bound is another artifact
    assert Runner(recipe, tmp_path / "ws").run()["short"].id == art.id
    wider = parse_recipe(_recipe(tmp_path, tiny_model_dir, max_completion_tokens=7))
    assert Runner(wider, tmp_path / "ws").run()["short"].id != art.id


def test_the_verifier_keeps_only_what_passes_after_the_length_bound():
    rows = [{"completion": a, "completion_ids": list(range(len(a) + 1)), "answer": a} for a in ANSWERS]
    seen = []

    def even_answers(record, completion):
        seen.append(completion)
        return Verdict(int(completion) % 2 == 0, 1.0, completion)

    kept, dropped = filter_records(rows, even_answers, 0, 5)
    assert [r["completion"] for r in kept] == ["2", "444"]
    assert dropped == {"length": 2, "verifier": 2}
    assert seen == ["2", "33", "444", "5555"]  # records already out on length are never verified


def test_a_filter_stage_is_checked_when_the_recipe_loads(tmp_path, tiny_model_dir):
    with pytest.raises(StillhouseError, match="needs a verifier, min_completion_tokens or max_completion_tokens"):
        parse_recipe(_recipe(tmp_path, tiny_model_dir))
    with pytest.raises(StillhouseError, match="max_completion_tokens: less than min_completion_tokens"):
        parse_recipe(_recipe(tmp_path, tiny_model_dir, min_completion_tokens=4, max_completion_tokens=2))
    d = _recipe(tmp_path, tiny_model_dir, max_completion_tokens=3)
    d["stages"]["short"]["data"] = "nowhere"
    with pytest.raises(StillhouseError, match="stages.short.data: unknown stage 'nowhere'"):
        parse_recipe(d)


def test_nothing_left_is_an_error_and_no_artifact(tmp_path, tiny_model_dir):
    recipe = parse_recipe(_recipe(tmp_path, tiny_model_dir, max_completion_tokens=1))
    with pytest.raises(StillhouseError, match="no record of 'pairs' passes the filter \\(6 too short or long, 0 failed the verifier\\)"):
        Runner(recipe, tmp_path / "ws").run()
    written = [json.loads(p.read_text())["stage"] for p in (tmp_path / "ws").rglob("manifest.json")]
    assert written == ["import"]
