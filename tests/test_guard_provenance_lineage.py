"""The provenance verdict next to the lineage graph: for a student stillhouse trained (so its
manifest exists), `guard provenance` reports what the graph says and whether they agree."""

from __future__ import annotations

import json

import pytest

from stillhouse.guard import provenance as pv
from test_pipeline_tiny import run_tiny


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    run = run_tiny(tmp_path_factory, "provenance-lineage", {
        "pruned": {"type": "prune", "model": "teacher", "calibration": "traces", "layers": 3},
        "distilled": {"type": "train", "student": "pruned", "data": "traces", "epochs": 2, "batch_size": 4, "lr": 1e-3},
    })
    return run


def test_lineage_says_what_the_manifest_says(distilled):
    student = distilled["results"]["distilled"].path
    assert pv.lineage_says(student, str(distilled["teacher"])) is True
    assert pv.lineage_says(student, "gemma3-270m") is False
    assert pv.lineage_says(distilled["teacher"], "anything") is None  # no manifest: nothing to compare


def test_provenance_verdict_agrees_with_the_lineage_graph(distilled, capsys, monkeypatch):
    from conftest import build_tiny_model, build_tokenizer
    from stillhouse import models
    from stillhouse.cli import main

    monkeypatch.setenv("STILLHOUSE_CACHE", str(distilled["root"] / "cache"))
    refs = []
    for s in (21, 22):
        d = distilled["root"] / f"ref{s}"
        tok = build_tokenizer()
        models.prepare_tokenizer(tok)
        models.save(build_tiny_model(tok, seed=s), tok, d)
        refs += ["-r", str(d)]
    student = distilled["results"]["distilled"].path
    main(["guard", "provenance", str(student), "--parent", str(distilled["teacher"]), *refs, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["lineage_says_derived"] is True
    assert out["derived"] is True, out  # the black-box verdict agrees with the graph
