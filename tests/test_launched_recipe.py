"""A whole recipe under a multi-process launcher (torchrun, 2 CPU processes over gloo).

The data and model stages run once, on the main process; the train and cross-tokenizer
stages run on both, each process training half of every batch; the result matches a single-process run of the same
recipe. A stage that fails on the main process stops both with its error.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stillhouse.artifacts import ArtifactWriter
from stillhouse.processes import Processes
from stillhouse.recipe import load_recipe
from stillhouse.runner import Runner
from stillhouse import models
from support import free_port, module_env, subprocess_env
from conftest import build_tiny_model
from test_cross_tokenizer import build_merged_tokenizer
from test_pipeline_tiny import PROBLEMS, TRACES, _train_teacher

def _recipe(teacher_dir: Path, prune_layers: int = 2) -> dict:
    return {
        "name": "tiny-launched",
        "models": {"teacher": str(teacher_dir), "other": str(teacher_dir.parent / "other")},
        "stages": {
            "problems": PROBLEMS,
            "traces": TRACES,
            "pruned": {"type": "prune", "model": "teacher", "calibration": "traces", "layers": prune_layers},
            "distilled": {"type": "train", "student": "pruned", "data": "traces", "epochs": 2, "batch_size": 4,
                          "lr": 1e-3, "seed": 3},
            # a student with another tokenizer: trains through the same loop, split the same way
            "xtok": {"type": "cross_tokenizer", "student": "other", "teacher": "teacher", "data": "traces",
                     "epochs": 2, "batch_size": 4, "top_k": 16, "lr": 1e-3},
            "evaluation": {"type": "eval", "tasks": "problems", "teacher": "teacher", "models": {"distilled": "distilled"},
                           "max_new_tokens": 4, "batch_size": 4, "speed_batch": 4, "memory": False},
        },
    }




def _run(root: Path, recipe: Path, ws: Path, processes: int) -> subprocess.CompletedProcess:
    cli = ["-m", "stillhouse.cli", "run", str(recipe), "--workspace", str(ws)]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                          "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = subprocess_env(STILLHOUSE_CACHE=str(root / "cache"))
    return subprocess.run([sys.executable, *launcher, *cli], env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("launched")
    with module_env(root):
        _train_teacher(root / "teacher")
        tok = build_merged_tokenizer()
        models.prepare_tokenizer(tok)
        build_tiny_model(tok, seed=5, layers=2).save_pretrained(root / "other")
        tok.save_pretrained(root / "other")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(root / "teacher"), sort_keys=False))
    single = _run(root, recipe, root / "ws-single", 1)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = _run(root, recipe, root / "ws-multi", 2)
    return {"root": root, "recipe": recipe, "multi": multi}


def _artifacts(ws: Path) -> dict[str, dict]:
    """Stage name -> manifest of every finished artifact in a workspace."""
    out = {}
    for mf in ws.glob("*/*/manifest.json"):
        m = json.loads(mf.read_text())
        assert m["name"] not in out, f"stage {m['name']} wrote two artifacts"
        out[m["name"]] = m
    return out


def test_launched_recipe_writes_every_artifact_once_and_nothing_else(launched):
    assert launched["multi"].returncode == 0, launched["multi"].stderr[-3000:]
    ws = launched["root"] / "ws-multi"
    arts = _artifacts(ws)
    assert set(arts) == set(load_recipe(launched["recipe"]).stages)
    assert not [p for p in ws.rglob("*") if "partial" in p.name]
    assert not list((ws / "checkpoints").iterdir())  # the trained models are saved: checkpoints spent
    # same inputs and config: the same content-addressed ids as the single-process run
    single = _artifacts(launched["root"] / "ws-single")
    assert {n: m["id"] for n, m in arts.items()} == {n: m["id"] for n, m in single.items()}


def test_launched_train_stage_splits_batches_and_matches_one_process(launched):
    assert launched["multi"].returncode == 0, launched["multi"].stderr[-3000:]
    root = launched["root"]

    def history(ws, stage):
        art = _artifacts(ws)[stage]
        return [json.loads(x) for x in (ws / "model" / art["id"] / "metrics.jsonl").read_text().splitlines()]

    for stage in ("distilled", "xtok"):
        one, two = history(root / "ws-single", stage), history(root / "ws-multi", stage)
        assert len(one) == len(two) > 1
        for a, b in zip(one, two):
            assert b["tokens"] == a["tokens"]
            assert b["rows"] == math.ceil(a["rows"] / 2)  # the main process trained half of every batch
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    # the data stages ran once: both runs scored the same traces
    single, multi = _artifacts(root / "ws-single"), _artifacts(root / "ws-multi")
    assert multi["traces"]["counts"] == single["traces"]["counts"]


def test_a_stage_failing_on_the_main_process_stops_every_process(launched):
    root = launched["root"]
    bad = root / "bad.yaml"
    bad.write_text(yaml.safe_dump(_recipe(root / "teacher", prune_layers=9), sort_keys=False))
    ws = root / "ws-bad"
    proc = _run(root, bad, ws, 2)
    assert proc.returncode != 0
    # the main process names the culprit; the other says where it came from
    assert "stillhouse: error: stages.pruned.layers: 9 is more than the model's" in proc.stderr
    assert "stage 'pruned' failed on the main process" in proc.stderr
    arts = _artifacts(ws)
    assert set(arts) == {"problems", "traces"}
    assert not [p for p in ws.rglob("*") if "partial" in p.name]


class _Follower(Processes):
    """Rank 1 of 2, with the main process's answers scripted (what from_main would receive)."""

    def __init__(self, answers):
        super().__init__(rank=1, world=2)
        self.answers = list(answers)

    def from_main(self, value):
        return self.answers.pop(0)


def test_other_processes_run_only_parallel_stages_and_read_the_rest(launched, monkeypatch):
    """Rank 1's view of a run whose main process has written every artifact (the single run's
    workspace): it runs the train stage into a scratch directory and reads everything else."""
    import stillhouse.processes as processes
    from stillhouse.stages import StageType

    root = launched["root"]
    ws = root / "ws-single"
    # (run in-process, rank 1's Accelerator is a single main process and rewrites the train
    # stage's running metrics under checkpoints/; launched, only the real main process does)
    def files():
        return {p: p.stat().st_mtime_ns for p in ws.rglob("*") if "checkpoints" not in p.parts}

    before = files()
    recipe = load_recipe(launched["recipe"])
    calls = {}
    real = StageType.run_function

    def recording(entry):
        def fn(ctx):
            calls[ctx.name] = ctx.out
            return real(entry)(ctx)
        return fn

    monkeypatch.setattr(StageType, "run_function", recording)
    # the main process's answers, per stage: rerun it (not reuse), then "finished"
    monkeypatch.setattr(processes, "from_environment", lambda: _Follower([False, None] * len(recipe.stages)))
    results = Runner(recipe, ws, force=True).run()
    assert list(calls) == ["distilled", "xtok"]
    assert isinstance(calls["distilled"], ArtifactWriter) and ws not in calls["distilled"].path.parents
    assert not calls["distilled"].path.exists()  # the scratch copy is gone
    assert {n: a.path.parent.parent for n, a in results.items()} == {n: ws for n in recipe.stages}
    # nothing in the workspace was written or touched, even with --force
    assert files() == before


def test_a_follower_stops_when_the_main_process_reports_a_failure(launched, monkeypatch):
    import stillhouse.processes as processes
    from stillhouse.errors import StillhouseError

    root = launched["root"]
    monkeypatch.setattr(processes, "from_environment", lambda: _Follower([False, "StillhouseError: no such task"]))
    with pytest.raises(StillhouseError, match="stage 'problems' failed on the main process: StillhouseError: no such task"):
        Runner(load_recipe(launched["recipe"]), root / "ws-follower").run()
    assert not (root / "ws-follower").exists() or not list((root / "ws-follower").rglob("manifest.json"))


def test_fsdp_launch_trains_and_saves_the_same_model_as_one_process(tmp_path, tiny_model_dir):
    """`torchrun` on 2 CPU processes with ACCELERATE_USE_FSDP=true (what `accelerate launch` with
    examples/accelerate/fsdp.yaml sets): the train stage runs FSDP2 over gloo, each process
    training half of every batch, and the saved model (gathered on the main process) equals a
    single-process run's."""
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {i}."}) + "\n" for i in range(8)))
    recipe = tmp_path / "fsdp.yaml"
    recipe.write_text(yaml.safe_dump({"name": "fsdp", "models": {"teacher": str(tiny_model_dir)}, "stages": {
        "answers": {"type": "complete", "teacher": "teacher", "prompts_file": str(prompts), "samples": 2,
                    "temperature": 0.8, "max_new_tokens": 8, "batch_size": 4, "shard_size": 4},
        "student": {"type": "train", "student": "teacher", "data": "answers", "epochs": 2, "batch_size": 4,
                    "sft_weight": 1.0, "kd_weight": 0.0, "lr": 1e-3, "checkpoint_every": 1}}}))

    def run(ws: Path, processes: int) -> dict:
        launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                              "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        env = subprocess_env(STILLHOUSE_CACHE=str(tmp_path / "cache"), ACCELERATE_USE_FSDP="true")
        proc = subprocess.run([sys.executable, *launcher, "-m", "stillhouse.cli", "run", str(recipe), "-w", str(ws)],
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        [model_dir] = [mf.parent for mf in ws.glob("model/*/manifest.json")]
        steps = [json.loads(ln) for ln in (model_dir / "metrics.jsonl").read_text().splitlines()]
        return {"weights": load_file(str(model_dir / "model.safetensors")), "steps": steps}

    single, fsdp = run(tmp_path / "ws-single", 1), run(tmp_path / "ws-fsdp", 2)
    assert all(s["rows"] == 4 and "fsdp" not in s for s in single["steps"])
    assert all(s["rows"] == 2 and s["fsdp"] for s in fsdp["steps"])  # sharded, not DDP
    for a, b in zip(fsdp["steps"], single["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert set(fsdp["weights"]) == set(single["weights"])  # tied copies saved once, as save_pretrained does
    for name, t in single["weights"].items():
        torch.testing.assert_close(fsdp["weights"][name], t, rtol=1e-3, atol=5e-4)
