"""A small version of bench/chaos.py in CI: a few seeded kill -9 points (and one deliberate
finish-window kill) in a generation run with each backend and in a training run, 30% API
faults of every kind; the final results equal uninterrupted runs."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("chaos", Path(__file__).resolve().parents[1] / "bench" / "chaos.py")
chaos = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chaos)


def test_generation_hf_survives_kills_with_nothing_lost_or_duplicated(tmp_path):
    r = chaos.scenario_hf(tmp_path, random.Random(1), kills=2, windows=("before-rename",), prompts=8)
    assert r["kills"] == 3 and r["window_kills"] == 1
    assert (r["lost"], r["duplicated"], r["half_artifacts_seen"], r["failed_checks"]) == (0, 0, 0, 0) and r["identical"], r


def test_generation_openai_with_faults_and_kills_completes_every_record_once(tmp_path):
    res = chaos.scenario_openai(tmp_path, random.Random(2), kills=2, rate=0.3, prompts=16)
    for r in res.values():
        assert (r["lost"], r["duplicated"], r["half_artifacts_seen"], r["failed_checks"]) == (0, 0, 0, 0) and r["identical"], r
        assert r["faults_injected"] > 0
    # no kill: the client's billed tokens are exactly what the server reported in answers it could
    # read (every slow answer outlives the client's timeout here: reported, never read)
    exact = res["faults"]
    assert exact["client_requests"] == exact["server_requests"]
    assert exact["billed_completion_tokens"] == exact["server_reported_completion_tokens"] - exact["timed_out_completion_tokens"]
    assert exact["billed_prompt_tokens"] == exact["server_reported_prompt_tokens"] - exact["timed_out_prompt_tokens"]
    assert res["faults+kills"]["kills"] == 2  # accounting after kills: test_accounting_after_kills_...


def test_training_resumes_after_kills_within_tolerance(tmp_path):
    r = chaos.scenario_train(tmp_path, random.Random(3), kills=2, prompts=8)
    assert r["kills"] == 3 and r["half_artifacts_seen"] == 0 and r["failed_checks"] == 0, r
    assert r["steps"] == r["reference_steps"] and r["loss_rel_diff"] <= chaos.LOSS_TOLERANCE
    assert r["spent_checkpoints_left"] == 0


def test_accounting_after_kills_reconciles_with_the_fault_servers_count(tmp_path):
    """A fresh artifact (own server, workspace, cache): every answer the server reported is billed
    in the manifest's ledger or explained (timed out, in flight at a kill); tokens and cost equal."""
    r = chaos.scenario_accounting(tmp_path, random.Random(4), kills=2, rate=0.3, prompts=8)
    assert r["kills"] >= 1 and r["half_artifacts_seen"] == 0, r  # the first kill point comes before the last unit
    assert r["records"] == r["expected_records"] and r["duplicated"] == 0, r
    assert r["unexplained_answers"] == 0 and r["billed_answers_unknown_to_server"] == 0, r
    assert r["exact"] and r["cost_usd"] == pytest.approx(r["server_cost_usd"], abs=1e-12), r
