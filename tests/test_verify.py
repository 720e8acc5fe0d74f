"""Answer extraction, reasoning-gym verifiers, de-duplication and pass@k."""

from __future__ import annotations

import json
from math import comb

import pytest

from stillhouse.data.dedup import drop_overlap, exact_dedup
from stillhouse.errors import StillhouseError
from stillhouse.eval.metrics import mean, pass_at_k
from stillhouse.verify.base import extract_final_answer
from stillhouse.verify.reasoning_gym import ReasoningGymVerifier, make_dataset, problems, task_names

CHAIN_CFG = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}


@pytest.mark.parametrize(
    "text,reference,expected",
    [
        ("The answer is 72.", None, "72"),
        ("The answer is 72.", "72", "72"),
        ("<answer>5</answer>", None, "5"),
        ("First 3, then <answer> 9 </answer> and finally 4", None, "9"),
        ("<answer>a</answer> ... <ANSWER>b</ANSWER>", None, "b"),
        ("5 - 9 gives -4", "-4", "-4"),
        ("The result is -17", None, "-17"),
        ("It is 1,234 in total", "1234", "1234"),
        ("It is 1,234 in total", None, "1234"),
        ("The answer is 1,000", "1,000", "1,000"),
        ("3 plus 4 equals 7", "7", "7"),
        ("I computed 2.5", None, "2.5"),
        ("no number here", None, "no number here"),
        ("Let me think.\nThe answer is blue.", "blue", "blue"),
        ("Paris\n\n", "London", "Paris"),
        ("", None, ""),
    ],
)
def test_extract_final_answer(text, reference, expected):
    assert extract_final_answer(text, reference) == expected


@pytest.fixture(scope="module")
def chain_problems():
    return problems("chain_sum", CHAIN_CFG, 12, 5)


def test_problems_records(chain_problems):
    assert len(chain_problems) == 12
    for i, r in enumerate(chain_problems):
        assert set(r) == {"id", "task", "question", "answer", "entry"}
        assert r["id"] == f"chain_sum-5-{i}"
        assert r["task"] == "chain_sum"
        entry = json.loads(r["entry"])
        assert entry["question"] == r["question"]
        assert str(entry["answer"]) == r["answer"]
        # the answer really is the value of the expression in the question
        expr = entry["metadata"]["expression"]
        assert set(expr) <= set("0123456789 +-")
        assert eval(expr) == int(r["answer"])  # noqa: S307 - digits and +/- only


def test_problems_deterministic_per_seed(chain_problems):
    assert problems("chain_sum", CHAIN_CFG, 12, 5) == chain_problems
    other = problems("chain_sum", CHAIN_CFG, 12, 6)
    assert [r["question"] for r in other] != [r["question"] for r in chain_problems]


def test_verifier_passes_right_and_fails_wrong(chain_problems):
    v = ReasoningGymVerifier("chain_sum", CHAIN_CFG)
    for r in chain_problems:
        right = v(r, f"Let me add the numbers. The answer is {r['answer']}.")
        assert right.passed and right.score == 1.0 and right.extracted == r["answer"]
        wrong_value = str(int(r["answer"]) + 1)
        wrong = v(r, f"The answer is {wrong_value}.")
        assert not wrong.passed and wrong.score < 1.0 and wrong.extracted == wrong_value
        assert not v(r, "I do not know.").passed
        assert v(r, f"<answer>{r['answer']}</answer>").passed


def test_verifier_scorer_crash_is_a_failed_verdict(chain_problems, monkeypatch):
    v = ReasoningGymVerifier("chain_sum", CHAIN_CFG)

    def boom(answer, entry):
        raise RuntimeError("scorer bug")

    monkeypatch.setattr(v, "_score", boom)
    verdict = v(chain_problems[0], "The answer is 3")
    assert not verdict.passed and verdict.score == 0.0 and "RuntimeError" in verdict.detail


def test_unknown_task_and_bad_config():
    assert "chain_sum" in task_names()
    with pytest.raises(StillhouseError, match="no_such_task"):
        make_dataset("no_such_task", {}, 1, 0)
    with pytest.raises(StillhouseError, match="chain_sum"):
        problems("chain_sum", {"bogus_option": 3}, 2, 0)


def test_exact_dedup_normalises_case_and_whitespace():
    rows = [
        {"q": "What is 1 + 1?", "i": 0},
        {"q": "what  is 1 + 1?", "i": 1},
        {"q": "What is 2 + 2?", "i": 2},
        {"q": " WHAT IS 1 +\t1? ", "i": 3},
        {"q": "What is 2 + 2?", "i": 4},
        {"q": "What is 3 + 3?", "i": 5},
    ]
    kept, removed = exact_dedup(rows, key="q")
    assert [r["i"] for r in kept] == [0, 2, 5]  # the first of each, in order
    assert removed == 3
    assert exact_dedup([], key="q") == ([], 0)


def test_drop_overlap_removes_held_out_questions():
    train = [{"q": "A b"}, {"q": "c"}, {"q": "D"}, {"q": "e"}]
    held = [{"q": "a  B"}, {"q": "d"}, {"q": "z"}]
    kept, removed = drop_overlap(train, held, key="q")
    assert kept == [{"q": "c"}, {"q": "e"}]
    assert removed == 2
    assert drop_overlap(train, [], key="q") == (train, 0)


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (5, 2, 1, 0.4),
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 0, 1, 0.0),
        (5, 0, 3, 0.0),
        (5, 4, 2, 1.0),  # n - c = 1 < k
        (5, 5, 1, 1.0),
        (10, 3, 5, 1 - comb(7, 5) / comb(10, 5)),
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_equals_fraction_for_k1():
    for n in range(1, 8):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)


@pytest.mark.parametrize("n,c,k", [(3, 4, 1), (3, -1, 1), (3, 1, 0)])
def test_pass_at_k_rejects_bad_input(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean():
    assert mean([True, False, True, True]) == 0.75
    assert mean([]) == 0.0
