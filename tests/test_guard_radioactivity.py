"""Radioactivity and provenance with known answers: a student trained (stillhouse's own training
loop) on watermarked outputs of a tiny teacher is detected in both modes, one trained on the
same teacher's plain outputs is not; the guard commands, and their bad inputs as one line
with exit code 2."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from stillhouse.guard import provenance as pv
from stillhouse.guard import radioactivity as ra
from stillhouse.guard import watermark as wm
from stillhouse.teachers.base import SamplingParams
from stillhouse.teachers.hf import HFTeacher, encode_prompt, render_chat
from support import module_env

KEY = "00112233445566778899aabbccddeeff" * 2
TRAIN_PROMPTS = [f"Question {i}: what about {i * 7 % 13}?" for i in range(256)]
PROBES = [f"Tell me {i}" for i in range(32)]


def _msgs(p):
    return [{"role": "user", "content": p}]


def _generate(model, tok, prompts, key=None, seed=0, n=64):
    t = HFTeacher(model, tok)
    t.logits_processor = wm.WatermarkProcessor(key, delta=3.0) if key else None
    return [o[0] for o in t.generate([_msgs(p) for p in prompts], SamplingParams(max_new_tokens=n, temperature=1.0, seed=seed))]


def _student(tok, prompts, comps, seed=1):
    """A fresh small llama (default init: it learns bigram habits quickly) SFT-trained on the answers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stillhouse.train.loop import Example, TrainConfig, train

    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                     bos_token_id=None))
    ex = []
    for p, c in zip(prompts, comps):
        pi = encode_prompt(tok, render_chat(tok, _msgs(p)))
        ex.append(Example(pi + c.token_ids + [tok.eos_token_id], len(pi)))
    train(m, ex, TrainConfig(epochs=6, lr=3e-3, batch_size=16, sft_weight=1.0, kd_weight=0.0, warmup_ratio=0.0, seed=seed), tok.pad_token_id)
    return m.eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The tiny teacher, a student of its watermarked answers, one of its plain answers, saved."""
    from conftest import build_tiny_model, build_tokenizer
    from stillhouse import models

    root = tmp_path_factory.mktemp("radioactive")
    with module_env(root):
        tok = build_tokenizer()
        models.prepare_tokenizer(tok)
        teacher = build_tiny_model(tok)
        marked = _student(tok, TRAIN_PROMPTS, _generate(teacher, tok, TRAIN_PROMPTS, KEY))
        plain = _student(tok, TRAIN_PROMPTS, _generate(teacher, tok, TRAIN_PROMPTS, seed=1))
        probe_text = [render_chat(tok, _msgs(p)) + c.text for p, c in zip(PROBES, _generate(teacher, tok, PROBES, seed=2))]
        dirs = {}
        for name, m in [("teacher", teacher), ("marked", marked), ("plain", plain)]:
            dirs[name] = root / name
            models.save(m, tok, dirs[name])
        probes = root / "probes.jsonl"
        probes.write_text("".join(json.dumps({"text": t}) + "\n" for t in probe_text))
        yield {"tok": tok, "teacher": teacher, "marked": marked, "plain": plain, "probe_text": probe_text,
               "dirs": dirs, "probes": probes, "root": root}


def _probe_ids(fam):
    return [encode_prompt(fam["tok"], t) for t in fam["probe_text"]]


def test_open_weights_mode_finds_the_watermarked_student_only(family):
    pad = family["tok"].pad_token_id
    assert ra.score_open_weights(KEY, family["marked"], _probe_ids(family), pad).p_value < 1e-6
    for control in ("plain", "teacher"):
        assert ra.score_open_weights(KEY, family[control], _probe_ids(family), pad).p_value > 1e-3, control


def test_api_mode_finds_the_watermarked_student_only(family):
    tok = family["tok"]
    gens = {n: [c.token_ids for c in _generate(family[n], tok, PROBES, seed=3)] for n in ("marked", "plain")}
    assert ra.score_generations(KEY, gens["marked"]).p_value < 1e-6
    assert ra.score_generations(KEY, gens["plain"]).p_value > 1e-3


def test_open_weights_pairs_are_deduplicated(family):
    ids = _probe_ids(family)
    once = ra.score_open_weights(KEY, family["marked"], ids, family["tok"].pad_token_id)
    twice = ra.score_open_weights(KEY, family["marked"], ids + ids, family["tok"].pad_token_id)
    assert twice.tokens == 2 * once.tokens and (twice.scored, twice.green) == (once.scored, once.green)


def test_filtered_nulls_of_tiny_control_models_are_calibrated(family):
    """Sander et al.'s filter on real (tiny) control models: the teacher and the student of its
    plain answers, scored teacher-forced and from their generations, only after contexts the
    provider served watermarked; 200 random keys of their own each: KS does not reject, FPR at
    0.01 at most 2%."""
    from scipy.stats import kstest

    tok = family["tok"]
    served = _generate(family["teacher"], tok, TRAIN_PROMPTS[:64], KEY, seed=5)
    contexts = ra.watermark_contexts([c.token_ids for c in served])
    suspects = []
    for name in ("teacher", "plain"):
        prev, pred = ra.predicted_pairs(family[name], _probe_ids(family), tok.pad_token_id)
        suspects.append(wm.distinct_pairs(prev, pred, contexts))
        suspects.append(wm.unique_pairs([c.token_ids for c in _generate(family[name], tok, PROBES, seed=6)], contexts))
    assert all(len(p[0]) < p[2] for p in suspects)  # the filter dropped something
    ps = np.array(ra.null_pvalues(suspects, 200, seed=1))
    assert len(ps) == 800 and kstest(ps, "uniform").pvalue > 0.01 and (ps < 0.01).mean() <= 0.02


def test_provenance_statistics_known_answers():
    parent = ["the cat sat on the mat", "blue sky today", "two plus two is four"]
    suspect = ["the cat sat on a mat", "blue sky today!", "two plus two is 4"]
    ref = ["a dog ran far away", "rain is coming", "I cannot answer"]
    v = pv.test(suspect * 10, parent * 10, {"r1": ref * 10, "r2": [r[::-1] for r in ref] * 10})
    assert v.derived and v.p_value < 1e-3 and v.parent_similarity > max(v.reference_similarity.values())
    v = pv.test(ref * 10, parent * 10, {"r1": ref * 10})  # it answers exactly like an unrelated model
    assert not v.derived and v.p_value > 0.5
    assert pv.paired_p(pv.similarities(parent, parent) - pv.similarities(parent, parent)) == 1.0


def test_likelihood_statistic_known_answers():
    rng = np.random.default_rng(0)
    parent = rng.normal(-1.0, 0.3, 40)  # the suspect predicts the parent's answers better ...
    v = pv.test_likelihood(parent, {"r1": parent - 0.5, "r2": parent - 0.2 + rng.normal(0, 0.05, 40)})
    assert v.derived and v.p_value < 1e-6 and v.statistic == "likelihood"
    v = pv.test_likelihood(parent, {"r1": parent - 0.5, "r2": parent + 0.1})  # ... but one reference's better still
    assert not v.derived and v.p_value > 0.5
    gaps = np.full(40, np.nan)
    gaps[:30] = parent[:30] - 0.5  # empty answers (no likelihood) drop out of the comparison
    assert pv.test_likelihood(parent, {"r": gaps}).derived
    v = pv.test_likelihood(parent, {"r": parent - 0.5, "silent": np.full(40, np.nan)})  # a reference that answered nothing
    assert v.derived and np.isnan(v.reference_p["silent"])
    assert not pv.test_likelihood(parent, {"silent": np.full(40, np.nan)}).derived  # nothing compared: no evidence
    # zlib calibration: an answer that repeats the prompt is cheap to any model and to a compressor alike
    probe = "Write one sentence about a library."
    assert pv.zlib_nats(probe, probe) < 1.0 < pv.zlib_nats(probe, "Libraries keep the memory of a city in quiet rows.")
    probes, fluent, echo = [probe] * 40, ["Libraries keep the memory of a city in quiet rows."] * 40, [probe] * 40
    # raw likelihood prefers the echo (the reference's answers); calibrated, the suspect is closer to the parent
    raw = pv.test_likelihood(np.full(40, -2.0) + rng.normal(0, 0.1, 40), {"echo": np.full(40, -0.5)})
    cal = pv.test_likelihood(np.full(40, -2.0) + rng.normal(0, 0.1, 40), {"echo": np.full(40, -0.5)},
                             calibrate=(probes, fluent, {"echo": echo}, 80))
    assert not raw.derived and cal.derived and cal.statistic == "likelihood-zlib"


def test_reverse_and_both_way_statistics_known_answers():
    rng = np.random.default_rng(1)
    ans = {"P": ["a"] * 40, "r1": ["b"] * 40, "r2": ["c"] * 40}
    own = rng.normal(-1.0, 0.3, 40)
    # the suspect prefers r1's answers (it learnt r1's text) ...
    logliks = {"P": own - 0.4, "r1": own, "r2": own - 0.6}
    # ... but the parent finds the suspect's answers likelier than either reference does (its weights)
    scored_by = {"P": own, "r1": own - 0.3 + rng.normal(0, 0.05, 40), "r2": own - 0.5}
    kw = dict(suspect_answers=["x"] * 40, logliks=logliks, scored_by=scored_by)
    fwd = pv.decide("likelihood", ans, "P", ["r1", "r2"], **kw)
    rev = pv.decide("likelihood-reverse", ans, "P", ["r1", "r2"], **kw)
    both = pv.decide("likelihood-both", ans, "P", ["r1", "r2"], **kw)
    assert not fwd.derived and rev.derived and rev.statistic == "likelihood-reverse"
    assert both.derived and both.p_value == pytest.approx(2 * rev.p_value) and both.statistic == "likelihood-both"
    assert both.to_dict()["parts"] == {"likelihood": fwd.p_value, "likelihood-reverse": rev.p_value}
    # neither direction: no evidence; and the doubled p is capped at 1
    none = pv.decide("likelihood-both", ans, "P", ["r1"], suspect_answers=["x"] * 40,
                     logliks={"P": own - 0.4, "r1": own}, scored_by={"P": own - 0.4, "r1": own})
    assert not none.derived and none.p_value == 1.0


def test_loglik_scores_each_text_alone_and_as_its_answer():
    from conftest import build_tiny_model, build_tokenizer
    from stillhouse import models

    tok = build_tokenizer()
    models.prepare_tokenizer(tok)
    m = build_tiny_model(tok).eval()
    own = pv.answers(m, tok, PROBES[:6], max_new_tokens=20)
    texts = own[:3] + ["zq" * 10] * 2 + [""]
    batched = pv.loglik(m, tok, PROBES[:6], texts, batch_size=4)
    alone = np.array([pv.loglik(m, tok, [p], [t], batch_size=1)[0] for p, t in zip(PROBES[:6], texts)])
    np.testing.assert_allclose(batched[:5], alone[:5], atol=1e-4)  # padding changes nothing
    assert np.isnan(batched[5]) and np.isnan(alone[5])
    assert batched[:3].min() > batched[3:5].max()  # its own greedy answers are likelier than noise


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(family, capsys, monkeypatch):
    """`stillhouse guard ARGS` in this process (a subprocess would spend 10 s importing torch)."""
    from stillhouse.cli import main

    monkeypatch.setenv("STILLHOUSE_CACHE", str(family["root"] / "cache"))

    def run(args, **env) -> Run:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        try:
            main(["guard", *args])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return Run(code, out.out, out.err)

    return run


def test_cli_detect_and_radioactivity(family, cli):
    d = family["dirs"]
    texts = family["root"] / "answers.jsonl"
    marked = _generate(family["teacher"], family["tok"], PROBES[:8], KEY, seed=4)
    # rows as a request log keeps them: the answer is read, never the (unwatermarked) prompt
    texts.write_text("".join(json.dumps({"prompt": p, "response": c.text}) + "\n" for p, c in zip(PROBES, marked)))
    r = cli(["detect", "--file", str(texts), "--key-env", "WMK", "--tokenizer", str(d["teacher"]), "--json"], WMK=KEY)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["p_value"] < 1e-6
    r = cli(["radioactivity", str(d["marked"]), "--prompts", str(family["probes"]), "--key", KEY,
              "--teacher", str(d["teacher"]), "--json"])
    assert r.returncode == 0, r.stderr
    full = json.loads(r.stdout)
    assert full["p_value"] < 1e-6 and full["p_value"] <= full["p_exact_tail"] and KEY not in r.stdout + r.stderr
    # Sander et al.'s filter: only positions after a context the provider served watermarked
    r = cli(["radioactivity", str(d["marked"]), "--prompts", str(family["probes"]), "--key", KEY,
              "--teacher", str(d["teacher"]), "--served", str(texts), "--json"])
    assert r.returncode == 0, r.stderr
    filtered = json.loads(r.stdout)
    assert filtered["p_value"] < 1e-6 and filtered["scored"] < full["scored"]
    r = cli(["radioactivity", str(d["plain"]), "--prompts", str(family["probes"]), "--key", KEY,
              "--teacher", str(d["teacher"]), "--mode", "api", "--json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["p_value"] > 1e-3


def _with_unrelated(family) -> dict:
    """The family's models and three unrelated ones (other random initialisations), r5-r7."""
    from conftest import build_tiny_model
    from stillhouse import models

    d = dict(family["dirs"])
    for s in (5, 6, 7, 8, 9, 10):
        d[f"r{s}"] = family["root"] / f"r{s}"
        if not d[f"r{s}"].exists():
            models.save(build_tiny_model(family["tok"], seed=s), family["tok"], d[f"r{s}"])
    return d


def test_cli_provenance(family, cli):
    d = _with_unrelated(family)
    for statistic in pv.STATISTICS:  # every statistic: the suspect's answers, its weights, or both
        r = cli(["provenance", str(d["plain"]), "--parent", str(d["teacher"]), "-r", str(d["r5"]), "-r", str(d["r6"]),
                 "--statistic", statistic, "--json"])
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["derived"] is True and out["statistic"] == statistic, out
        r = cli(["provenance", str(d["r7"]), "--parent", str(d["teacher"]), "-r", str(d["r5"]), "-r", str(d["r6"]),
                 "--statistic", statistic, "--json"])
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["derived"] is False


def test_cli_provenance_warns_about_few_references(family, cli):
    from stillhouse.guard.provenance_cli import FEW_REFERENCES

    d = _with_unrelated(family)
    refs = [str(d[f"r{s}"]) for s in (5, 6, 8, 9, 10)][:FEW_REFERENCES]
    args = ["provenance", str(d["r7"]), "--parent", str(d["teacher"])]
    r = cli([*args, *(x for ref in refs[:-1] for x in ("-r", ref)), "-r", refs[0], "--json"])  # a repeat does not count
    assert r.returncode == 0, r.stderr
    assert f"warning: {FEW_REFERENCES - 1} --reference" in r.stderr
    assert [w.startswith(f"{FEW_REFERENCES - 1} --reference") for w in json.loads(r.stdout)["warnings"]] == [True]
    r = cli([*args, *(x for ref in refs for x in ("-r", ref)), "--json"])
    assert r.returncode == 0 and "warning" not in r.stderr and json.loads(r.stdout)["warnings"] == [], r.stderr


def test_cli_provenance_from_answers_collected_from_an_api(family, cli):
    """A suspect known only by its answers (a .jsonl from its API): the reverse test needs no
    weights, and gives the same p-value as on the model itself."""
    from stillhouse import models

    d = _with_unrelated(family)
    r = cli(["probes", "-n", "60"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == pv.default_probes(60)
    refs = ["-r", str(d["r5"]), "-r", str(d["r6"])]
    for name, derived in (("plain", True), ("r7", False)):
        lm = models.load(str(d[name]))
        file = family["root"] / f"{name}-api.jsonl"
        file.write_text("".join(json.dumps({**row, "completion": a}) + "\n"
                                for row, a in zip(rows, pv.answers(lm.model, lm.tokenizer, pv.default_probes(60), 32))))
        r = cli(["provenance", str(file), "--parent", str(d["teacher"]), *refs, "--json"])
        assert r.returncode == 0, r.stderr
        from_file = json.loads(r.stdout)
        assert from_file["statistic"] == "likelihood-reverse" and from_file["derived"] is derived, from_file
        r = cli(["provenance", str(d[name]), "--parent", str(d["teacher"]), *refs, "--statistic", "likelihood-reverse", "--json"])
        assert json.loads(r.stdout)["p_value"] == pytest.approx(from_file["p_value"], rel=1e-6)
    r = cli(["provenance", str(family["root"] / "plain-api.jsonl"), "--parent", str(d["teacher"]), *refs,
             "--statistic", "agreement", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["derived"] is True, r.stderr
    # the answers file also serves as --probes: its rows' prompts are read, not their answers
    r = cli(["provenance", str(family["root"] / "plain-api.jsonl"), "--parent", str(d["teacher"]), *refs,
             "--probes", str(family["root"] / "plain-api.jsonl"), "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["derived"] is True, r.stderr


def test_cli_provenance_bad_answer_files(family, cli):
    d, root = family["dirs"], family["root"]
    refs = ["--parent", str(d["teacher"]), "-r", str(d["marked"])]
    short = root / "short.jsonl"
    short.write_text(json.dumps({"completion": "an answer"}) + "\n")
    assert "holds 1 answers for 60 probes" in _one_line_error(cli(["provenance", str(short), *refs]))
    assert "needs the suspect's weights" in _one_line_error(cli(["provenance", str(short), *refs, "--statistic", "likelihood"]))
    nofield = root / "nofield.jsonl"
    nofield.write_text(json.dumps({"prompt": "p", "output": "x"}) + "\n")
    assert f"{nofield}:1: no string field completion" in _one_line_error(cli(["provenance", str(nofield), *refs]))
    other = root / "other.jsonl"
    other.write_text(json.dumps({"prompt": "not a probe", "completion": "x"}) + "\n")
    one_probe = root / "one-probe.jsonl"
    one_probe.write_text(json.dumps({"prompt": "a probe"}) + "\n")
    assert "answer 1 is to another prompt" in _one_line_error(cli(["provenance", str(other), *refs, "--probes", str(one_probe)]))
    assert "file not found" in _one_line_error(cli(["provenance", str(root / "missing.jsonl"), *refs]))
    assert "-n must be 1-100" in _one_line_error(cli(["probes", "-n", "0"]))


def _one_line_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("stillhouse: error:") and "Traceback" not in r.stderr, lines
    return lines[0]


def test_cli_bad_inputs_are_one_line(family, cli):
    d, probes = family["dirs"], str(family["probes"])
    err = _one_line_error(cli(["detect", "some text", "--key", "not-hex!", "--tokenizer", str(d["teacher"])]))
    assert "32-128 hex" in err and "not-hex!" not in err
    broken = family["root"] / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text("{not json")
    err = _one_line_error(cli(["radioactivity", str(broken), "--prompts", probes, "--key", KEY, "--teacher", str(d["teacher"])]))
    assert f"suspect {broken} does not load" in err
    # a suspect with another tokenizer cannot be scored on the watermark's token ids
    from stillhouse import models

    other = family["root"] / "other-tok"
    if not other.exists():
        lm = models.load(str(d["plain"]))
        lm.tokenizer.add_tokens(["<extra-token>"])
        models.save(lm.model, lm.tokenizer, other)
    err = _one_line_error(cli(["radioactivity", str(other), "--prompts", probes, "--key", KEY, "--teacher", str(d["teacher"])]))
    assert "different tokenizer" in err
    err = _one_line_error(cli(["radioactivity", str(d["plain"]), "--prompts", probes, "--key-env", "NOPE_UNSET", "--teacher", str(d["teacher"])]))
    assert "NOPE_UNSET is not set" in err
    err = _one_line_error(cli(["provenance", str(broken), "--parent", str(d["teacher"]), "-r", str(d["plain"])]))
    assert "does not load" in err
    err = _one_line_error(cli(["provenance", str(d["plain"]), "--parent", str(d["teacher"]), "-r", str(d["marked"]),
                               "--statistic", "vibes"]))
    assert "--statistic must be one of agreement, likelihood, likelihood-zlib, likelihood-reverse, likelihood-both" in err
