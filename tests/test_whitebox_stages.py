"""The white-box stages in a recipe on tiny models: cache_logits, train from a cache with a loss
mixture, onpolicy (both methods) and cross_tokenizer; plus the errors for mismatched inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from stillhouse import models
from stillhouse.api import run_recipe
from stillhouse.errors import StillhouseError
from stillhouse.records import read_rows
from stillhouse.scoring import right_pad, selected_logits
from stillhouse.train.logit_cache import FORMAT, LogitCache

from conftest import build_tiny_model
from test_cross_tokenizer import build_merged_tokenizer
from test_pipeline_tiny import PROBLEMS, _train_teacher
from support import module_env


def _recipe(teacher_dir: Path, other_dir: Path) -> dict:
    return {
        "name": "tiny-whitebox",
        "models": {"teacher": str(teacher_dir), "other": str(other_dir)},
        "stages": {
            "problems": PROBLEMS,
            "traces": {"type": "rejection", "teacher": "teacher", "tasks": "problems", "samples": 2,
                       "temperature": 1.0, "max_new_tokens": 4, "keep_per_problem": 2, "batch_size": 8},
            "pruned": {"type": "prune", "model": "teacher", "calibration": "traces", "layers": 2},
            "cached": {"type": "cache_logits", "teacher": "teacher", "data": "traces", "top_k": 16, "batch_size": 4},
            "kd": {"type": "train", "student": "pruned", "data": "traces", "logit_cache": "cached", "epochs": 2,
                   "batch_size": 4, "lr": 1e-3, "loss": {"sft": 0.5, "jsd": 0.3, "reverse_kl": 0.2}},
            "onp": {"type": "onpolicy", "student": "pruned", "teacher": "teacher", "data": "traces",
                    "method": "reverse_kl", "steps": 3, "batch_size": 4, "max_new_tokens": 4, "lr": 1e-3},
            "gkd": {"type": "onpolicy", "student": "pruned", "teacher": "teacher", "data": "traces",
                    "method": "gkd", "lmbda": 0.5, "steps": 4, "batch_size": 4, "max_new_tokens": 4, "lr": 1e-3},
            "xtok": {"type": "cross_tokenizer", "student": "other", "teacher": "teacher", "data": "traces",
                     "epochs": 1, "batch_size": 4, "top_k": 16, "lr": 1e-3},
        },
    }


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-whitebox")
    with module_env(root):
        teacher_dir = root / "teacher"
        _train_teacher(teacher_dir)
        other_dir = root / "other"  # a student with another tokenizer
        tok = build_merged_tokenizer()
        models.prepare_tokenizer(tok)
        build_tiny_model(tok, seed=5, layers=2).save_pretrained(other_dir)
        tok.save_pretrained(other_dir)
        recipe = _recipe(teacher_dir, other_dir)
        path = root / "wb.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        ws = root / "ws"
        results = run_recipe(path, ws)
    return {"root": root, "ws": ws, "recipe": recipe, "results": results, "teacher_dir": teacher_dir}


def _run_variant(wb, stages: dict, tmp_path) -> dict:
    recipe = {**wb["recipe"], "stages": {**wb["recipe"]["stages"], **stages}}
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STILLHOUSE_CACHE", str(wb["root"] / "cache"))
        return run_recipe(path, wb["ws"])


def test_cache_holds_the_teachers_top_k_for_every_completion_token(wb):
    art = wb["results"]["cached"]
    m = art.manifest
    assert m["kind"] == "logit_cache" and m["logit_cache"]["format"] == FORMAT
    assert m["logit_cache"]["data_id"] == wb["results"]["traces"].id
    assert [t["role"] for t in m["teachers"]] == ["logits"]
    rows = read_rows(wb["results"]["traces"].file("data.parquet"))
    assert m["counts"]["tokens"] == sum(len(r["completion_ids"]) for r in rows)
    shards = m["logit_cache"]["shards"]
    assert shards and m["counts"]["bytes"] == sum(art.file(s).stat().st_size for s in shards)
    assert m["metrics"]["bytes_per_token"] == pytest.approx(m["counts"]["bytes"] / m["counts"]["tokens"], abs=0.01)
    cache = LogitCache.open(art.path)
    assert len(cache) == len(rows)
    teacher = AutoModelForCausalLM.from_pretrained(wb["teacher_dir"])
    for r in rows[:3]:
        ids, lp, rest = cache.rows(r["id"])
        n = len(r["completion_ids"])
        assert ids.shape[0] == n and lp.shape == ids.shape and rest.shape == (n,)
        seq = r["prompt_ids"] + r["completion_ids"]
        x, attn = right_pad([seq], 0)
        predict = torch.zeros_like(x, dtype=torch.bool)
        predict[0, len(r["prompt_ids"]) - 1 : len(seq) - 1] = True
        with torch.no_grad():
            exact, exact_ids = torch.log_softmax(selected_logits(teacher, x, attn, predict), -1).topk(16, -1)
        # the same ids (entries of equal stored probability come in the cache's own order), each
        # with its log-prob within the codec's quantisation: finer where the probability is
        assert (np.sort(ids, 1) == np.sort(exact_ids.numpy(), 1)).all()
        for row in range(n):
            stored = dict(zip(ids[row].tolist(), lp[row].tolist()))
            err = np.abs(np.array([stored[t] for t in exact_ids[row].tolist()]) - exact[row].numpy())
            assert err.max() <= cache.codec.max_log_step / 2 + 0.01
            assert err[exact[row].exp().numpy() >= 0.05].max(initial=0) < 0.03


def test_train_from_cache_logs_each_loss_term(wb):
    art = wb["results"]["kd"]
    hist = [json.loads(line) for line in art.file("metrics.jsonl").read_text().splitlines()]
    assert hist and all({"loss/sft", "loss/jsd", "loss/reverse_kl"} <= set(h) for h in hist)
    h = hist[0]
    assert h["loss"] == pytest.approx(0.5 * h["loss/sft"] + 0.3 * h["loss/jsd"] + 0.2 * h["loss/reverse_kl"], rel=1e-4)
    assert wb["results"]["cached"].id in art.manifest["parents"]
    # the signal's sources: SFT targets from the data, KD from the separate logit cache
    sources = {s["role"]: s.get("parent") for s in art.manifest["signal"]["sources"]}
    assert sources["sft-targets"] == wb["results"]["traces"].id
    assert sources["logit-kd"] == wb["results"]["cached"].id
    assert sum(t["token_share"] for t in art.manifest["teachers"]) == pytest.approx(1.0, abs=1e-3)
    AutoModelForCausalLM.from_pretrained(art.path)


def test_onpolicy_stages_train_and_record(wb):
    for name, method in (("onp", "reverse_kl"), ("gkd", "gkd")):
        art = wb["results"][name]
        m = art.manifest
        assert m["metrics"]["method"] == method and m["metrics"]["steps"] >= 3
        assert "final_reverse_kl" in m["metrics"]
        hist = [json.loads(line) for line in art.file("metrics.jsonl").read_text().splitlines()]
        assert all(h["on_policy"] for h in hist) if method == "reverse_kl" else len(hist) == 4
        assert "onpolicy-logits" in m["teachers"][0]["roles"]
        AutoModelForCausalLM.from_pretrained(art.path)


def test_cross_tokenizer_stage(wb):
    art = wb["results"]["xtok"]
    m = art.manifest
    assert 0 < m["metrics"]["aligned_share"] <= 1
    assert m["metrics"]["uld_before"] is not None and m["metrics"]["uld_after"] is not None
    assert m["counts"]["aligned_tokens"] > 0
    assert {r for t in m["teachers"] for r in t["roles"]} == {"sft-targets", "uld-logits"}
    AutoModelForCausalLM.from_pretrained(art.path)


def test_cache_from_another_teacher_is_refused(wb, tmp_path):
    bad = {"kd2": {**wb["recipe"]["stages"]["kd"], "teacher": "pruned"}}
    with pytest.raises(StillhouseError, match="stages.kd2.logit_cache: cache 'cached' was made by teacher"):
        _run_variant(wb, bad, tmp_path)


def test_student_with_another_tokenizer_is_refused_for_token_level_training(wb, tmp_path):
    online = {"kd3": {"type": "train", "student": "other", "data": "traces", "teacher": "teacher",
                      "teacher_signal": "online", "epochs": 1}}
    with pytest.raises(StillhouseError, match="stages.kd3.data: record .* was tokenised by another tokenizer"):
        _run_variant(wb, online, tmp_path)
    cached = {"kd4": {"type": "onpolicy", "student": "other", "teacher": "teacher", "data": "traces", "steps": 1}}
    with pytest.raises(StillhouseError, match="stages.kd4: teacher 'teacher' and student 'other' have different tokenizers"):
        _run_variant(wb, cached, tmp_path)


def test_cache_logits_needs_scored_records(wb, tmp_path):
    with pytest.raises(StillhouseError, match="stages.c2.data: stage 'problems' has no scored records"):
        _run_variant(wb, {"c2": {"type": "cache_logits", "teacher": "teacher", "data": "problems"}}, tmp_path)


def test_onpolicy_stage_interrupted_then_resumed_equals_uninterrupted(wb, tmp_path):
    from stillhouse.train import checkpoint as ckpt

    stage = {"onp_resume": {"type": "onpolicy", "student": "pruned", "teacher": "teacher", "data": "traces",
                            "method": "gkd", "lmbda": 0.5, "steps": 4, "batch_size": 4, "max_new_tokens": 4,
                            "lr": 1e-3, "checkpoint_every": 1}}
    recipe = {**wb["recipe"], "stages": {**wb["recipe"]["stages"], **stage}}
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    ws = tmp_path / "ws"
    shutil.copytree(wb["ws"], ws)  # the finished upstream stages, reused
    save = ckpt.save_checkpoint

    def save_then_stop(directory, step, *a, **kw):
        save(directory, step, *a, **kw)
        if step == 2:
            raise KeyboardInterrupt  # as Ctrl-C after the step-2 checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STILLHOUSE_CACHE", str(wb["root"] / "cache"))
        mp.setattr(ckpt, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(path, ws)
    ckpts = list((ws / "checkpoints").glob("onp_resume-*/step-*"))
    assert [p.name for p in ckpts] == ["step-00000002"]  # interrupted after step 2, before any artifact
    from stillhouse.train.onpolicy import OnPolicy

    batch, ran = OnPolicy.batch, []

    def recording(self, planned, step, *a, **kw):
        ran.append(step)
        return batch(self, planned, step, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STILLHOUSE_CACHE", str(wb["root"] / "cache"))
        mp.setattr(OnPolicy, "batch", recording)
        resumed = run_recipe(path, ws, resume=True)["onp_resume"]
    assert ran == [2, 3]  # it continued from the checkpoint: steps 1-2 were not run again
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STILLHOUSE_CACHE", str(wb["root"] / "cache"))
        reference = run_recipe(path, wb["ws"])["onp_resume"]  # uninterrupted, in the fixture's workspace
    assert resumed.id == reference.id
    got = [json.loads(x) for x in resumed.file("metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in reference.file("metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in got] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6) and a["on_policy"] == b["on_policy"]
    a = AutoModelForCausalLM.from_pretrained(resumed.path).state_dict()
    b = AutoModelForCausalLM.from_pretrained(reference.path).state_dict()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    assert not (ws / "checkpoints").exists() or not any((ws / "checkpoints").iterdir())  # spent, removed
