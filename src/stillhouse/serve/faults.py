"""Seeded fault injection for `stillhouse serve`: the failures a remote teacher really shows.

A spec such as `429=0.1,500=0.1,slow=0.05,cut=0.05` gives the fraction of generation requests
answered with HTTP 429 (with Retry-After), HTTP 500, a slow answer, or a connection dropped
mid-response. Optional `retry_after=<s>` and `slow_s=<s>` tune the first and third.

Three more kinds are complete HTTP 200 answers that are not usable: `nonjson` (an HTML error
page), `nochoices` (valid JSON, usage but no `choices`) and `wrongn` (one choice too many). The
server's stats count the tokens it generated (`served_*`) and those it reported in a readable
usage (`reported_*`: not cut, not `nonjson`), which a client's billed tokens must match, and
those in well-formed answers (`usable_*`: no fault or `slow`), which its received tokens must
match (less the slow answers it stopped waiting for).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass

from ..errors import StillhouseError

KINDS = ("429", "500", "slow", "cut", "nonjson", "nochoices", "wrongn")
MALFORMED = ("nonjson", "nochoices", "wrongn")


@dataclass
class Faults:
    rates: dict[str, float]
    retry_after: float = 1.0
    slow_s: float = 2.0
    seed: int = 0

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self) -> str | None:
        """The fault for the next request, or None for a normal answer."""
        with self._lock:
            u = self._rng.random()
        acc = 0.0
        for kind in KINDS:
            acc += self.rates.get(kind, 0.0)
            if u < acc:
                return kind
        return None


def parse_faults(spec: str | None, seed: int = 0) -> Faults | None:
    if not spec:
        return None
    rates: dict[str, float] = {}
    opts: dict[str, float] = {}
    for part in spec.split(","):
        k, sep, v = part.strip().partition("=")
        try:
            value = float(v)
        except ValueError:
            value = None
        if not sep or value is None or value < 0:
            raise StillhouseError(f"--faults: bad entry '{part.strip()}' (expected KIND=NUMBER, e.g. 429=0.1)")
        if k in KINDS:
            rates[k] = value
        elif k in ("retry_after", "slow_s"):
            opts[k] = value
        else:
            raise StillhouseError(f"--faults: unknown fault '{k}' (known: {', '.join(KINDS)}, retry_after, slow_s)")
    if sum(rates.values()) > 1:
        raise StillhouseError(f"--faults: rates add up to {sum(rates.values()):.2f}, more than 1")
    return Faults(rates, seed=seed, **opts)


def malformed_body(kind: str, body: bytes) -> bytes:
    """A complete answer body that a client must reject (and retry), from a good one."""
    if kind == "nonjson":
        return b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    data = json.loads(body)
    if kind == "nochoices":
        data.pop("choices", None)
    else:  # wrongn: one choice more than asked for
        data["choices"] = data["choices"] + [{**data["choices"][-1], "index": len(data["choices"])}]
    return json.dumps(data).encode()


def account(stats: dict, fault: str | None, status: int, body: bytes, log_answers: bool = False) -> None:
    """Count a generated answer's tokens: served (all), reported (delivered in a readable usage).
    With `log_answers` (a fault-injecting server, a test tool) every reported answer is also
    listed (id, fault, tokens, monotonic time), so a client's ledger can be reconciled answer by answer."""
    if status != 200:
        return
    try:
        data = json.loads(body)
        usage = data.get("usage") or {}
    except (ValueError, AttributeError):
        return
    if log_answers and fault not in ("cut", "nonjson"):
        stats.setdefault("reported_answers", []).append(
            {"id": data.get("id"), "fault": fault, "t": time.monotonic(),
             "prompt": usage.get("prompt_tokens", 0), "completion": usage.get("completion_tokens", 0)})
    for side in ("prompt", "completion"):
        n = usage.get(f"{side}_tokens", 0)
        stats[f"served_{side}_tokens"] = stats.get(f"served_{side}_tokens", 0) + n
        if fault not in ("cut", "nonjson"):
            stats[f"reported_{side}_tokens"] = stats.get(f"reported_{side}_tokens", 0) + n
        if fault in (None, "slow"):  # a complete, well-formed answer: what a client keeps (if it waited)
            stats[f"usable_{side}_tokens"] = stats.get(f"usable_{side}_tokens", 0) + n
        if fault:  # e.g. a slow answer's tokens, which a client that timed out never saw
            by = stats.setdefault("fault_tokens", {}).setdefault(fault, {"prompt": 0, "completion": 0})
            by[side] += n
