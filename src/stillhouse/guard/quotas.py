"""Per-key and per-organisation rate limits and quotas over fixed UTC windows (minute, day).

Fixed windows (not sliding) keep the check O(1) per request and the Retry-After exact: the
time to the window's end. The price is the usual one: a client may send up to twice a
per-minute limit across a minute boundary. Counters live in memory; at start the gateway
replays today's rows from its request log (`seed`), so a restart does not reset a day quota.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Limits

MINUTE, DAY = 60, 86_400


@dataclass
class _Window:
    index: int = -1  # which minute/day (Unix time // length) the counts belong to
    requests: int = 0
    tokens: int = 0

    def roll(self, index: int) -> "_Window":
        if index != self.index:
            self.index, self.requests, self.tokens = index, 0, 0
        return self


@dataclass
class Refusal:
    outcome: str  # "rate_limited" (a per-minute limit) or "quota_exceeded" (a per-day quota)
    message: str
    retry_after: int  # whole seconds until the window that refused ends


class Quotas:
    def __init__(self):
        self._windows: dict[tuple[str, str, int], _Window] = {}  # (scope, name, length) -> window

    def _window(self, scope: str, name: str, length: int, now: float) -> _Window:
        w = self._windows.get((scope, name, length))
        if w is None:
            w = self._windows[(scope, name, length)] = _Window()
        return w.roll(int(now // length))

    def admit(self, key_id: str, key_limits: Limits, org: str, org_limits: Limits, now: float) -> Refusal | None:
        """Count one request for the key and its organisation, or refuse it (counting nothing)."""
        for scope, name, lim in (("key", key_id, key_limits), ("org", org, org_limits)):
            for length, req_cap, tok_cap, outcome in (
                (MINUTE, lim.requests_per_minute, lim.tokens_per_minute, "rate_limited"),
                (DAY, lim.requests_per_day, lim.tokens_per_day, "quota_exceeded"),
            ):
                w = self._window(scope, name, length, now)
                what = None
                if req_cap is not None and w.requests >= req_cap:
                    what = f"{req_cap} requests"
                elif tok_cap is not None and w.tokens >= tok_cap:
                    what = f"{tok_cap} tokens"
                if what:
                    per = "minute" if length == MINUTE else "day"
                    retry = max(1, math.ceil((w.index + 1) * length - now))
                    return Refusal(outcome, f"{scope} {name!r} reached its limit of {what} per {per}", retry)
        for scope, name in (("key", key_id), ("org", org)):
            for length in (MINUTE, DAY):
                self._window(scope, name, length, now).requests += 1
        return None

    def charge(self, key_id: str, org: str, tokens: int, now: float) -> None:
        """Add a finished request's tokens to the key's and the organisation's windows."""
        if tokens <= 0:
            return
        for scope, name in (("key", key_id), ("org", org)):
            for length in (MINUTE, DAY):
                self._window(scope, name, length, now).tokens += tokens

    def seed(self, key_id: str, org: str, ts: float, tokens: int, now: float) -> None:
        """Replay one logged, admitted request (from the log at start) into the current windows."""
        for scope, name in (("key", key_id), ("org", org)):
            for length in (MINUTE, DAY):
                if int(ts // length) == int(now // length):
                    w = self._window(scope, name, length, now)
                    w.requests += 1
                    w.tokens += max(0, tokens)
