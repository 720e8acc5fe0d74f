"""The data-engine stages (complete, preference, critique_revise, self_instruct, rejection on
shards), their provenance, dedup and decontamination, and their bad inputs.

Stage logic is driven by a scripted teacher (a real Teacher implementation whose answers the
test chooses, on the tiny character tokenizer) where the outcome must be known; the tiny
random llama runs the same stages end to end through the runner.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stillhouse.api import run_recipe
from stillhouse.cli import main
from stillhouse.data.dedup import Contamination, NearDuplicates, RecordFilter, lsh_bands
from stillhouse.data.judge import parse_score
from stillhouse.data.self_instruct import clean_proposal
from stillhouse.errors import EmptyDatasetError, StillhouseError
from stillhouse.models import ModelIdentity
from stillhouse.records import read_rows
from stillhouse.recipe import parse_recipe
from stillhouse.runner import Runner, StageContext
from stillhouse.teachers.base import Completion

from conftest import build_tokenizer


class ScriptedTeacher:
    """A teacher whose answer to (prompt text, sample index) is `answer(text, j)`."""

    backend = "scripted"

    def __init__(self, answer):
        self.tokenizer = build_tokenizer()
        self.answer = answer
        self.name = "scripted"
        self.stats = {"generated_tokens": 0, "seconds": 0.0}
        self.calls = 0

    def usage_metrics(self) -> dict:
        return {}

    def generate(self, prompts, params, description="", top_k_logprobs=0):
        from stillhouse.teachers.hf import render_chat

        return self.generate_text([render_chat(self.tokenizer, m) for m in prompts], params, description, top_k_logprobs)

    def generate_text(self, texts, params, description="", top_k_logprobs=0):
        self.calls += 1
        out = []
        for t in texts:
            comps = []
            for j in range(params.n):
                text = self.answer(t, j)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                self.stats["generated_tokens"] += len(ids)
                comps.append(Completion(text, ids, "stop", 5, stop_token=self.tokenizer.eos_token_id))
            out.append(comps)
        return out


def _run(tmp_path, stages: dict, teacher: ScriptedTeacher | None = None, monkeypatch=None, models=None):
    """Run a recipe through the real runner; the teacher reference resolves to `teacher`."""
    recipe = parse_recipe({"name": "t", "models": models or {"t": "org/scripted"}, "stages": stages})
    if teacher is not None:
        ident = ModelIdentity("scripted", "0" * 64, "apache-2.0", "test")
        monkeypatch.setattr(StageContext, "teacher", lambda self, ref, batch_size=32: teacher)
        monkeypatch.setattr(Runner, "identity", lambda self, ref: ident)
    return Runner(recipe, tmp_path / "ws").run()


def _prompt_file(tmp_path, prompts, field="prompt", name="prompts.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps({field: p}) + "\n" for p in prompts))
    return str(path)


def _sum(text: str) -> int:
    import re

    a, op, b = re.search(r"(\d+) ([+-]) (\d+) =", text).groups()
    return int(a) + int(b) if op == "+" else int(a) - int(b)


TASKS = {"type": "tasks", "task": "chain_sum", "config": {"min_terms": 2, "max_terms": 2, "max_digits": 1},
         "train": {"size": 10, "seed": 1}, "eval": {"size": 6, "seed": 10**6}}


# -- complete ------------------------------------------------------------------------------
def test_complete_on_tiny_model_records_provenance(tmp_path, tiny_model_dir):
    prompts = _prompt_file(tmp_path, [f"Say {i}." for i in range(5)])
    res = _run(tmp_path, {"answers": {"type": "complete", "teacher": "t", "prompts_file": prompts, "samples": 2,
                                      "max_new_tokens": 5, "shard_size": 2, "system_prompt": "Be terse.",
                                      "top_k_logprobs": 3}}, models={"t": str(tiny_model_dir)})
    art = res["answers"]
    rows = read_rows(art.file("data.parquet"))
    assert [(r["prompt_id"].split("-")[0], r["sample_index"]) for r in rows] == [(f"p{i}", j) for i in range(5) for j in range(2)]
    assert all(r["id"] == f"{r['prompt_id']}/{r['sample_index']}" for r in rows)
    r = rows[0]
    assert "Be terse." in r["prompt"] and r["prompt"].endswith("<|im_start|>assistant\n")  # chat template + system prompt
    assert r["teacher"] == str(tiny_model_dir) and len(r["teacher_sha256"]) == 64 and r["backend"] == "hf"
    assert json.loads(r["sampling"])["max_new_tokens"] == 5 and r["template_hash"]
    assert len(r["topk_ids"]) == len(r["completion_ids"]) and len(r["topk_ids"][0]) == 3
    assert art.manifest["counts"]["records"] == 10 and art.manifest["teachers"][0]["role"] == "data"
    # the template hash changes with the system prompt (a new template never reuses old answers)
    res2 = _run(tmp_path, {"answers": {"type": "complete", "teacher": "t", "prompts_file": prompts, "samples": 2,
                                       "max_new_tokens": 5, "shard_size": 2, "system_prompt": "Be long."}},
                models={"t": str(tiny_model_dir)})
    assert res2["answers"].id != art.id
    assert read_rows(res2["answers"].file("data.parquet"))[0]["template_hash"] != r["template_hash"]


def test_editing_the_prompt_file_gives_a_new_artifact(tmp_path, monkeypatch):
    teacher = ScriptedTeacher(lambda t, j: "ok")
    path = _prompt_file(tmp_path, ["a question", "another question"])
    stages = {"answers": {"type": "complete", "teacher": "t", "prompts_file": path}}
    first = _run(tmp_path, stages, teacher, monkeypatch)["answers"]
    Path(path).write_text(json.dumps({"prompt": "a changed question"}) + "\n")
    second = _run(tmp_path, stages, teacher, monkeypatch)["answers"]
    assert first.id != second.id and read_rows(second.file("data.parquet"))[0]["question"] == "a changed question"


@pytest.mark.parametrize("content, message", [
    ("", "is empty (no records)"),  # preflight finds it before any model loads
    ('{"text": "hi"}\n', "has no field 'prompt'"),
    ('{"prompt": "ok"}\n{"prompt": \n', "p.jsonl:2: not valid JSON"),
    ('{"prompt": "   "}\n', "field 'prompt' is empty"),
])
def test_bad_prompt_files_fail_in_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "models": {"t": "org/model"}, "stages": {
        "answers": {"type": "complete", "teacher": "t", "prompts_file": str(path)}}}))
    monkeypatch.setattr(StageContext, "teacher", lambda self, ref, batch_size=32: ScriptedTeacher(lambda t, j: "x"))
    monkeypatch.setattr(Runner, "identity", lambda self, ref: ModelIdentity("t", "0" * 64, "x", "test"))
    with pytest.raises(SystemExit) as e:
        main(["run", str(recipe), "-w", str(tmp_path / "ws")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stillhouse:")]
    assert e.value.code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("stillhouse: error:")
    assert not list((tmp_path / "ws").glob("dataset/[!.]*"))  # no artifact


@pytest.mark.parametrize("stage, message", [
    ({"type": "complete", "teacher": "t"}, "give exactly one of"),
    ({"type": "complete", "teacher": "t", "prompts_file": "nope.jsonl"}, "file not found: nope.jsonl"),
    ({"type": "complete", "teacher": "t", "prompts": "nothing"}, "unknown stage 'nothing'"),
    ({"type": "preference", "teacher": "t", "prompts": "problems", "judge_template": "rate {prompt}"},
     "judge_template: template needs the placeholder(s) {response}"),
    ({"type": "critique_revise", "teacher": "t", "prompts": "problems", "principles": []}, "principles"),
    ({"type": "complete", "teacher": "t", "prompts": "problems", "decontaminate": ["missing"]}, "unknown stage 'missing'"),
    ({"type": "complete", "teacher": "t", "prompts": "problems", "dedup": "fuzzy"}, "stages.x.dedup"),
])
def test_recipe_errors_name_the_key(stage, message):
    with pytest.raises(StillhouseError, match="r.yaml: ") as e:
        parse_recipe({"name": "t", "models": {"t": "org/m"}, "stages": {"problems": TASKS, "x": stage}}, "r.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


# -- preference ----------------------------------------------------------------------------
def _judge_answer(text, j):
    if "Response:" not in text:  # a candidate
        return f"candidate {j}"
    if "What is 1" in text:  # this prompt's judge answers are garbage
        return "I would rate this highly! Score: eleven" if "candidate 0" in text else "Score: 12/10"
    return "Fine. Score: 8" if "candidate 1" in text else "Weak.\n**Score**: 3/10"


def test_preference_by_judge_pairs_best_and_worst_and_counts_unparsable(tmp_path, monkeypatch):
    prompts = ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"]
    res = _run(tmp_path, {"pairs": {"type": "preference", "teacher": "t", "candidates": 3,
                                    "prompts_file": _prompt_file(tmp_path, prompts), "shard_size": 2}},
               ScriptedTeacher(_judge_answer), monkeypatch)
    art = res["pairs"]
    rows = read_rows(art.file("data.parquet"))
    assert [r["question"] for r in rows] == prompts[1:]
    assert all(r["chosen"] == "candidate 1" and r["rejected"] == "candidate 0" for r in rows)
    assert rows[0]["chosen_score"] == 8 and rows[0]["rejected_score"] == 3 and rows[0]["method"] == "judge"
    counts = art.manifest["counts"]
    assert counts["skipped_unparsed"] == 1 and counts["judge_unparsed"] == 3 and counts["records"] == 2
    assert {f["answer"] for f in art.manifest["judge_failures"]} == {"I would rate this highly! Score: eleven", "Score: 12/10"}
    assert art.manifest["warnings"]


def test_preference_by_verifier_and_nothing_to_pair_is_an_error(tmp_path, monkeypatch):
    # the teacher answers the right sum on its first sample only
    def answer(text, j):
        return f"The answer is {_sum(text) + j}"

    stages = {"problems": TASKS, "pairs": {"type": "preference", "teacher": "t", "prompts": "problems",
                                            "method": "verifier", "candidates": 2}}
    rows = read_rows(_run(tmp_path, stages, ScriptedTeacher(answer), monkeypatch)["pairs"].file("data.parquet"))
    assert rows and all(r["chosen_score"] == 1.0 and r["rejected_score"] == 0.0 for r in rows)
    assert all(r["chosen"] == f"The answer is {_sum(r['question'])}" for r in rows)
    stages["pairs"]["seed"] = 1
    with pytest.raises(EmptyDatasetError, match=r"no preference pairs left \(skipped_tie=10\)$"):
        _run(tmp_path, stages, ScriptedTeacher(lambda t, j: "The answer is 0"), monkeypatch)


@pytest.mark.parametrize("text, score", [
    ("Score: 7", 7), ("**Score**: 7/10", 7), ("[[6]]", 6), ("Rating = 8.5", 8.5), ("I'd say 9/10.", 9),
    ("On a scale of 1 to 10 ... Score: 4", 4), ("Score: 8\nOn reflection, Score: 2", 2), ("x" * 100_000 + "Score: 5", 5),
    ("", None), (None, None), ("Score: eleven", None), ("Score: 11", None), ("Score: -3", None), ("Score: 0", None),
    ("Score: 1e308", None), ("Score: NaN", None), ("Score: inf", None), ("Score: 3-5", None), ("score ５", None),
    ("Score:\n\n", None), ("10/100", None), ("\x00Score: 6\x00", 6), ("Score: 99999999999999999999", None),
])
def test_judge_score_parser_survives_malformed_answers(text, score):
    assert parse_score(text) == score


# -- critique and revise -------------------------------------------------------------------
def test_critique_revise_yields_sft_and_preference_rows(tmp_path, monkeypatch):
    def answer(text, j):
        if "Critique the response" in text:
            return "Too vague." if "vague" in text else "Nothing to fix."
        if "Rewrite the response" in text:
            return "A precise answer." if "Too vague." in text else "keep"
        return "vague answer" if "first" in text else "keep"

    prompts = _prompt_file(tmp_path, ["first question", "second question"])
    art = _run(tmp_path, {"cr": {"type": "critique_revise", "teacher": "t", "prompts_file": prompts,
                                 "principles": ["Be precise."]}}, ScriptedTeacher(answer), monkeypatch)["cr"]
    rows = read_rows(art.file("data.parquet"))
    assert len(rows) == 1 and art.manifest["counts"]["skipped_unchanged"] == 1  # "keep" revised to itself
    r = rows[0]
    assert (r["original"], r["critique"], r["revision"]) == ("vague answer", "Too vague.", "A precise answer.")
    assert (r["chosen"], r["rejected"], r["completion"]) == ("A precise answer.", "vague answer", "A precise answer.")
    assert build_tokenizer().decode(r["completion_ids"][:-1]) == "A precise answer."
    assert art.manifest["principles"] == ["Be precise."]


# -- self-instruct -------------------------------------------------------------------------
def test_self_instruct_drops_near_duplicates_of_seeds_and_of_each_other(tmp_path, monkeypatch):
    seeds = ["Write a poem about the sea and the waves at night", "Explain how a bicycle gear works in detail"]
    proposals = {
        (0, 0): "1. Task: Write a poem about the sea and the waves at night!",  # a seed again
        (0, 1): "Describe the life cycle of a butterfly from egg to adult",
        (1, 0): "describe the life cycle of a butterfly  from egg to adult",  # repeats another proposal
        (1, 1): "ok",  # too short
        (2, 0): '"List three uses of copper in modern electrical engineering"\n\nExtra chatter.',
        (2, 1): "List three uses of copper in modern electrical engineering today",  # near duplicate
    }
    counter = {"k": -1}

    def answer(text, j):
        if j == 0:
            counter["k"] += 1
        return proposals[(counter["k"], j)]

    art = _run(tmp_path, {"si": {"type": "self_instruct", "teacher": "t", "prompts_file": _prompt_file(tmp_path, seeds),
                                 "requests": 3, "samples": 2, "examples": 2, "shard_size": 1}},
               ScriptedTeacher(answer), monkeypatch)["si"]
    rows = read_rows(art.file("data.parquet"))
    assert [r["question"] for r in rows] == ["Describe the life cycle of a butterfly from egg to adult",
                                             "List three uses of copper in modern electrical engineering"]
    c = art.manifest["counts"]
    assert (c["dropped_malformed"], c["removed_duplicates"], c["removed_near_duplicates"]) == (1, 1, 2)
    assert sorted(e.split("-")[0] for e in rows[0]["examples"]) == ["p0", "p1"]  # the seeds it was shown


def test_clean_proposal():
    assert clean_proposal("1. Task: Do X.\n\nMore") == "Do X."
    assert clean_proposal('- "Quoted task"') == "Quoted task"
    assert clean_proposal("New instruction: summarise {this}") == "summarise {this}"
    assert clean_proposal("Why is the moon bright?\n2. What is the capital of France\n3. x") == "Why is the moon bright?"
    assert clean_proposal("Write code that:\nreads a file\nand counts words") == "Write code that:\nreads a file\nand counts words"


# -- rejection on shards: code and maths verifiers -----------------------------------------
def test_rejection_on_humaneval_runs_code_in_the_sandbox_and_records_pass_rates(tmp_path, monkeypatch):
    from stillhouse.verify.code import humaneval_problems

    problems = humaneval_problems()
    good = {p["task_id"] for p in problems if int(p["task_id"].split("/")[1]) % 2 == 0}

    def answer(text, j):  # the right body for even-numbered problems, on the second sample only
        for p in problems:
            if p["prompt"] in text:
                body = p["canonical_solution"] if p["task_id"] in good and j == 1 else "    return None\n"
                return "```python\n" + p["prompt"] + body + "```"
        raise AssertionError("unknown prompt")

    stages = {"he": {"type": "tasks", "task": "humaneval", "train": {"size": 4, "seed": 0}, "eval": {"size": 3, "seed": 1}},
              "traces": {"type": "rejection", "teacher": "t", "tasks": "he", "samples": 2, "shard_size": 2}}
    res = _run(tmp_path, stages, ScriptedTeacher(answer), monkeypatch)
    train = read_rows(res["he"].file("train.parquet"))
    assert not {r["id"] for r in train} & {r["id"] for r in read_rows(res["he"].file("eval.parquet"))}
    rows = read_rows(res["traces"].file("data.parquet"))
    rates = {r["problem_id"]: r["pass_rate"] for r in read_rows(res["traces"].file("pass_rates.parquet"))}
    assert {r["id"] in good for r in train} == {True, False}
    expected = {r["id"]: (1 / 3 if r["id"] in good else 0.0) for r in train}  # greedy + 2 samples
    assert rates == pytest.approx(expected)
    assert rows and all(r["passed"] and r["pass_rate"] == pytest.approx(1 / 3) for r in rows)


def test_rejection_with_math_verifier_and_dedup(tmp_path, monkeypatch):
    def answer(text, j):
        return f"So the result is $\\frac{{{2 * _sum(text)}}}{{2}}$"  # equal to the sum only mathematically

    stages = {"problems": {**TASKS, "train": {"size": 40, "seed": 1}}, "traces": {"type": "rejection", "teacher": "t", "tasks": "problems",
                                            "verifier": "math", "dedup": "exact", "shard_size": 3}}
    res = _run(tmp_path, stages, ScriptedTeacher(answer), monkeypatch)
    art = res["traces"]
    rows = read_rows(art.file("data.parquet"))
    questions = [r["question"] for r in rows]
    train = [r["question"] for r in read_rows(res["problems"].file("train.parquet"))]
    assert len(set(train)) < len(train)  # the task repeats itself: something to dedup
    assert questions == list(dict.fromkeys(train)) and art.manifest["metrics"]["coverage"] == 1.0
    assert art.manifest["counts"]["removed_duplicates"] == len(train) - len(set(train))
    assert all(r["teacher_sha256"] == "0" * 64 and r["backend"] == "scripted" for r in rows)


# -- dedup and decontamination -------------------------------------------------------------
def test_near_duplicate_detection():
    nd = NearDuplicates(0.7)
    base = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"
    assert not nd.seen(base)
    assert nd.seen(base.replace("warm", "soft"))  # one word changed
    assert not nd.seen("a completely different sentence about compilers, parsers and type systems")
    assert not nd.seen(" ".join(reversed(base.split())))  # same words, different shingles
    assert lsh_bands(64, 0.8) == (7, 9) and lsh_bands(64, 0.5)[0] > 7


def test_decontamination_by_ngram_overlap_and_filter_counts():
    c = Contamination(["What is 3 + 4?", "Write a function that returns the sum of the squares of a list"], n=8)
    assert c("Quick question: what is 3 + 4? thanks")  # short eval item matched whole
    assert not c("What is 3 + 5?")
    assert c("please write a function that returns the sum of the squares, fast")
    assert not c("write a function that returns the product")
    f = RecordFilter(dedup="near", near_threshold=0.7, eval_texts=["What is 3 + 4?"], key=lambda r: r["t"], prompt=lambda r: r["t"])
    texts = ["what is 3 + 4 ?", "alpha beta gamma delta epsilon zeta eta theta", "Alpha beta gamma  delta epsilon zeta eta theta",
             "alpha beta gamma delta epsilon zeta eta iota", "something else entirely here today"]
    kept = [t for t in texts if f({"t": t})]
    assert kept == [texts[1], texts[4]]
    assert f.counts == {"removed_duplicates": 1, "removed_near_duplicates": 1, "removed_eval_overlap": 1}


def test_complete_decontaminates_against_a_tasks_held_out_split(tmp_path, monkeypatch):
    from stillhouse.verify.reasoning_gym import problems

    from stillhouse.verify.code import humaneval_problems

    held = problems("chain_sum", TASKS["config"], 6, 10**6)
    leaked = "Please solve:\n" + humaneval_problems(3)[2]["prompt"]
    prompts = _prompt_file(tmp_path, [held[0]["question"], "an unrelated question about birds", held[3]["question"], leaked])
    art = _run(tmp_path, {"problems": TASKS, "a": {"type": "complete", "teacher": "t", "prompts_file": prompts,
                                                  "decontaminate": ["problems", "humaneval"]}},
               ScriptedTeacher(lambda t, j: "fine"), monkeypatch)["a"]
    assert [r["question"] for r in read_rows(art.file("data.parquet"))] == ["an unrelated question about birds"]
    assert art.manifest["counts"]["removed_eval_overlap"] == 3


def test_a_judge_that_never_scores_fails_with_counts_and_an_example(tmp_path, monkeypatch):
    teacher = ScriptedTeacher(lambda t, j: "I think it is quite good overall" if "Response:" in t else f"c{j}")
    prompts = _prompt_file(tmp_path, ["one question", "two questions"])
    with pytest.raises(EmptyDatasetError) as e:
        _run(tmp_path, {"pairs": {"type": "preference", "teacher": "t", "prompts_file": prompts, "candidates": 2}},
             teacher, monkeypatch)
    msg = str(e.value)
    assert "skipped_unparsed=2, judge_unparsed=4" in msg and "I think it is quite good overall" in msg and "\n" not in msg
    assert not list((tmp_path / "ws" / "dataset").iterdir())  # nothing half-written, not even the work dir


def test_eval_stage_on_humaneval_tasks_checks_code_in_the_sandbox(tmp_path, tiny_model_dir):
    from stillhouse.verify.code import CodeVerifier

    recipe = tmp_path / "he.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "he-eval",
        "models": {"t": str(tiny_model_dir)},
        "stages": {"he": {"type": "tasks", "task": "humaneval", "train": {"size": 2, "seed": 0}, "eval": {"size": 3, "seed": 1}},
                   "ev": {"type": "eval", "tasks": "he", "teacher": "t", "models": {}, "max_new_tokens": 8,
                          "memory": False, "speed_batch": 2}},
    }))
    res = run_recipe(recipe, tmp_path / "ws")
    rows = read_rows(res["ev"].file("outputs.parquet"))
    assert len(rows) == 3 and {r["id"] for r in rows} <= {f"HumanEval/{i}" for i in range(164)}
    assert all(r["passed"] is False for r in rows)  # a random tiny model writes no working code
    # the held-out records carry their tests: the code verifier accepts the canonical solutions
    ver = CodeVerifier()
    for r in read_rows(res["he"].file("eval.parquet")):
        assert ver(r, "```python\n" + r["prompt"] + r["canonical_solution"] + "```").passed
