"""The data engine's choices: repeats kept or removed, held-out overlap always removed,
repeated prompts decoded greedily once, sampling only where the greedy answer failed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from stillhouse.data.rejection import rejection_sample
from stillhouse.data.stages import run_tasks
from stillhouse.records import read_rows
from stillhouse.data.config import TasksStage
from stillhouse.teachers.base import Completion
from stillhouse.verify.base import Verdict

CFG = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # 200 possible problems: many repeats


def _run_tasks(tmp_path, dedup: bool):
    stage = TasksStage(type="tasks", task="chain_sum", config=CFG, train={"size": 300, "seed": 1},
                       eval={"size": 50, "seed": 10**6}, dedup=dedup)
    out = SimpleNamespace(path=tmp_path, counts={}, warnings=[], extra={})
    run_tasks(SimpleNamespace(config=stage, out=out, name="problems"))
    return read_rows(tmp_path / "train.parquet"), read_rows(tmp_path / "eval.parquet"), out


@pytest.mark.parametrize("dedup", [False, True])
def test_tasks_stage_removes_held_out_overlap_and_repeats_only_if_asked(tmp_path, dedup):
    train, held_out, out = _run_tasks(tmp_path, dedup)
    questions = [r["question"] for r in train]
    assert not set(questions) & {r["question"] for r in held_out}
    assert out.counts["removed_eval_overlap"] > 0  # 1-digit sums collide often
    assert out.counts["train"] == len(train) == 300 - out.counts["removed_eval_overlap"] - out.counts["removed_duplicates"]
    if dedup:
        assert len(set(questions)) == len(questions)
        assert out.counts["removed_duplicates"] > 0
    else:
        assert len(set(questions)) < len(questions)
        assert out.counts["removed_duplicates"] == 0


class CountingTeacher:
    """Answers 'ok' greedily for questions containing 'easy', else samples 'ok' on odd seeds' rows."""

    name = "counting"
    backend = "counting"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = []
        self.stats = {"generated_tokens": 0, "seconds": 0.0}

    def generate_text(self, texts, params, description="", top_k_logprobs=0):
        self.calls.append((list(texts), params))
        out = []
        for t in texts:
            comps = []
            for j in range(params.n):
                good = ("easy" in t) if params.temperature == 0 else j == 1
                text = "ok" if good else f"bad{j}"
                comps.append(Completion(text=text, token_ids=[len(text), j], finish_reason="stop", prompt_tokens=3, stop_token=0))
            out.append(comps)
        return out


class Tok:
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1, 2, 3]}


def _verifier(record, completion):
    return Verdict(completion == "ok", float(completion == "ok"), completion)


def test_rejection_decodes_repeats_once_and_samples_only_failures():
    recs = [{"id": f"p{i}", "question": q, "answer": "ok"} for i, q in enumerate(["easy 1", "hard 2", "easy 1", "hard 3"])]
    teacher = CountingTeacher(Tok())
    rows, stats = rejection_sample(teacher, recs, _verifier, samples=3, temperature=0.7, keep_per_problem=2)
    greedy_texts, greedy_params = teacher.calls[0]
    assert greedy_params.temperature == 0
    assert len(greedy_texts) == 3  # "easy 1" appears twice but is decoded once
    sampled_texts, sampled_params = teacher.calls[1]
    assert sampled_params.n == 3 and len(sampled_texts) == 2  # only the two hard problems
    assert [r["problem_id"] for r in rows] == ["p0", "p1", "p2", "p3"]  # each repeat keeps its own row
    assert all(r["passed"] for r in rows)
    assert stats["greedy_pass_rate"] == 0.5 and stats["coverage"] == 1.0


def test_rejection_keeps_failed_only_when_asked():
    recs = [{"id": "p0", "question": "hard", "answer": "ok"}]
    rows, _ = rejection_sample(CountingTeacher(Tok()), recs, _verifier, samples=3, temperature=0.7)
    assert [r["completion"] for r in rows] == ["ok"]
    rows, stats = rejection_sample(CountingTeacher(Tok()), recs, _verifier, samples=3, temperature=0.7, keep_failed=True)
    assert sorted(r["completion"] for r in rows) == ["bad0", "bad2", "ok"]  # the greedy "bad0" equals sample 0
    assert stats["passed_records"] == 1


def test_teacher_prompt_is_what_the_teacher_sees_and_records_keep_the_plain_prompt():
    from stillhouse.data.config import TeacherPrompt
    from stillhouse.data.rejection import teacher_prompt_hash

    class ChatTok(Tok):
        chat_template = "chat"

        def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
            return "|".join(f"{m['role']}:{m['content']}" for m in msgs)

    # the teacher answers correctly only when it is shown a worked example
    class Helped(CountingTeacher):
        def generate_text(self, texts, params, description="", top_k_logprobs=0):
            self.calls.append((list(texts), params))
            return [[Completion(text="ok" if "assistant:7" in t else "bad", token_ids=[1], finish_reason="stop",
                                prompt_tokens=3, stop_token=0)] * params.n for t in texts]

    recs = [{"id": "p0", "question": "3 + 4 =", "answer": "ok"}]
    plain_rows, _ = rejection_sample(Helped(ChatTok()), recs, _verifier, samples=2, temperature=0.7)
    assert plain_rows == []
    tp = TeacherPrompt(system_prompt="Be exact.", examples=[("2 + 5 =", "7")], template="Q: {question}")
    teacher = Helped(ChatTok())
    rows, stats = rejection_sample(teacher, recs, _verifier, samples=2, temperature=0.7, teacher_prompt=tp)
    assert teacher.calls[0][0] == ["system:Be exact.|user:Q: 2 + 5 =|assistant:7|user:Q: 3 + 4 ="]
    assert [r["completion"] for r in rows] == ["ok"] and stats["greedy_pass_rate"] == 1.0
    assert rows[0]["prompt"] == "user:3 + 4 ="  # the student is trained on the plain prompt
    assert rows[0]["template_hash"] == teacher_prompt_hash(teacher, None, tp) != teacher_prompt_hash(teacher, None)


def test_teacher_prompt_template_needs_the_question():
    from stillhouse.data.config import TeacherPrompt

    with pytest.raises(ValueError, match=r"\{question\}"):
        TeacherPrompt(template="Solve it.")
