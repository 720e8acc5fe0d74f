"""reasoning-gym tasks: procedural problems and their own scorers, offline."""

from __future__ import annotations

import json
from functools import lru_cache

from ..errors import StillhouseError
from .base import Verdict, extract_final_answer


def _rg():
    import reasoning_gym

    return reasoning_gym


def task_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def make_dataset(task: str, config: dict, size: int, seed: int):
    rg = _rg()
    if task not in task_names():
        raise StillhouseError(f"unknown task '{task}' (reasoning-gym has e.g. chain_sum, basic_arithmetic, leg_counting)")
    try:
        return rg.create_dataset(task, size=size, seed=seed, **config)
    except TypeError as e:
        raise StillhouseError(f"bad config for task '{task}': {e}") from None
    except (ValueError, AssertionError) as e:
        raise StillhouseError(f"bad config for task '{task}': {e}") from None


def problems(task: str, config: dict, size: int, seed: int) -> list[dict]:
    """Records {id, task, question, answer, entry} for `size` problems from a seeded generator."""
    ds = make_dataset(task, config, size, seed)
    out = []
    for i in range(size):
        entry = ds[i]
        out.append(
            {
                "id": f"{task}-{seed}-{i}",
                "task": task,
                "question": entry["question"],
                "answer": str(entry["answer"]),
                "entry": json.dumps(entry, default=str),
            }
        )
    return out


@lru_cache(maxsize=64)
def _scorer(task: str, config_json: str):
    return make_dataset(task, json.loads(config_json), 1, 0).score_answer


class ReasoningGymVerifier:
    """Extract the final answer from a completion and score it with the task's own scorer."""

    def __init__(self, task: str, config: dict | None = None, threshold: float = 1.0):
        self.task = task
        self.threshold = threshold
        self._score = _scorer(task, json.dumps(config or {}, sort_keys=True))

    def __call__(self, record: dict, completion: str) -> Verdict:
        entry = json.loads(record["entry"])
        answer = extract_final_answer(completion, str(entry.get("answer")))
        try:
            score = float(self._score(answer, entry))
        except Exception as e:  # a scorer crashing on odd output is a failed verdict, not a crash
            return Verdict(False, 0.0, answer, f"scorer error: {type(e).__name__}")
        return Verdict(score >= self.threshold, score, answer)
