"""Which verifier checks a set of records: the tasks stage's own, or one a recipe names.

Shared by the data engine (rejection, preference) and usable by evaluation alike."""

from __future__ import annotations

from ..errors import StillhouseError


def verifier_for(choice: str, manifest: dict | None, records: list[dict], stage: str):
    """`choice` is auto | reasoning_gym | math | code. `auto` uses the tasks stage's verifier,
    else guesses from the records: a `test` field means code, an `answer` field maths."""
    task = (manifest or {}).get("task") or {}
    if choice == "auto":
        verifier = task.get("verifier", "")
        if verifier.startswith("reasoning_gym:"):
            choice = "reasoning_gym"
        elif verifier in ("code", "math"):
            choice = verifier
        elif records and "test" in records[0]:
            choice = "code"
        elif records and "answer" in records[0]:
            choice = "math"
        else:
            raise StillhouseError(f"stages.{stage}.verifier: cannot tell how to verify these records (no task, `test` or `answer` field)")
    if choice == "reasoning_gym":
        if not task.get("name") or task.get("verifier") in ("code", "math"):
            raise StillhouseError(f"stages.{stage}.verifier: reasoning_gym needs a reasoning-gym tasks stage")
        from .reasoning_gym import ReasoningGymVerifier

        return ReasoningGymVerifier(task["name"], task.get("config", {}))
    if choice == "math":
        if records and "answer" not in records[0]:
            raise StillhouseError(f"stages.{stage}.verifier: math needs an `answer` field in the records")
        from .math import MathVerifier

        return MathVerifier()
    if records and "test" not in records[0]:
        raise StillhouseError(f"stages.{stage}.verifier: code needs a `test` field in the records")
    from .code import CodeVerifier

    return CodeVerifier()
