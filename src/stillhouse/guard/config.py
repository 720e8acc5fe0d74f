"""guard.yaml: what `stillhouse guard serve` enforces. Strict: an unknown key is an error.

    keys: guard-keys.json            # the KeyStore file (`stillhouse guard keys add ...`)
    upstream:
      api_key_env: UPSTREAM_API_KEY  # the upstream's key is read from this variable, never from the file
    limits:
      key: {requests_per_minute: 60, tokens_per_day: 1000000}
      org: {requests_per_day: 100000}
      orgs: {acme: {tokens_per_minute: 200000}}
    log: {path: guard-log.sqlite, log_text: false}
    reasoning: {markers: [["<think>", "</think>"]], summary: "off"}

A key's own limits live in the key file (`limits` of its record, same fields as `Limits`) and
override `limits.key` field by field; an organisation's entry in `limits.orgs` overrides
`limits.org` the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from ..errors import StillhouseError
from ..strict import Strict


class Limits(Strict):
    """Rate limits and quotas of one key or one organisation; None means unlimited.

    Windows are fixed: the current UTC minute and the current UTC day. A request is refused
    (429, no upstream call) when a window's count is already at its limit; tokens (prompt +
    completion, as the upstream counts them) are charged when the response ends, so the last
    admitted request may overshoot a token limit by its own size.
    """

    requests_per_minute: int | None = Field(None, ge=0)
    requests_per_day: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)
    tokens_per_day: int | None = Field(None, ge=0)
    # most `top_logprobs` a request may ask for (completions: `logprobs`); 0 allows the sampled
    # token's log-prob but no alternatives; larger requests get 400. None: no cap (upstream's own)
    max_top_logprobs: int | None = Field(None, ge=0, le=20)
    # False turns log-probs off entirely: a request asking for them gets 400
    logprobs: bool = True

    def merged(self, override: "Limits | dict | None") -> "Limits":
        """These limits with the fields `override` sets explicitly taking precedence."""
        if override is None:
            return self
        if isinstance(override, dict):
            override = Limits.model_validate(override)
        return self.model_copy(update=override.model_dump(exclude_unset=True))


class LimitsConfig(Strict):
    key: Limits = Limits()  # every key, unless its key-file record overrides a field
    org: Limits = Limits()  # every organisation (all its keys together), unless `orgs` overrides
    orgs: dict[str, Limits] = {}  # per-organisation overrides of `org`


class UpstreamConfig(Strict):
    # environment variable holding the upstream's API key (sent as `Authorization: Bearer`);
    # None: no key is sent. The key itself never goes in this file, a log or an error
    api_key_env: str | None = None
    timeout_s: float = Field(600.0, gt=0)  # per upstream request (long generations stream for minutes)
    max_connections: int = Field(256, gt=0)  # pooled connections to the upstream
    check: bool = True  # `guard serve` GETs <upstream>/models at start and fails fast when unreachable


class LogConfig(Strict):
    path: Path = Path("guard-log.sqlite")  # SQLite request log (WAL); created if missing
    log_text: bool = False  # also keep the full prompt text (prompt_text column); off: hash + MinHash only
    # the writer thread commits whatever is queued at least this often: a row is committed (and
    # survives kill -9 of the gateway) at most about this long after its response ended
    flush_ms: float = Field(50.0, gt=0, le=10_000)
    max_batch: int = Field(1024, gt=0)  # most rows per transaction


class ReasoningConfig(Strict):
    # inline (open, close) marker pairs around hidden reasoning in generated text
    markers: list[tuple[str, str]] = [("<think>", "</think>")]
    # response fields carrying reasoning separately (vLLM, DeepSeek, OpenRouter style): always dropped
    fields: list[str] = ["reasoning_content", "reasoning", "reasoning_details", "thinking"]
    # the model's template opens the reasoning block itself (DeepSeek-R1 style: the output starts
    # inside the reasoning and only the close marker appears): output is hidden until a close marker
    implicit_open: bool = False
    # "length": the message gets `reasoning_summary: "[reasoning withheld: ~N tokens]"` (a count,
    # nothing of the content); "off": nothing says reasoning was withheld
    summary: Literal["off", "length"] = "off"

    @field_validator("markers")
    @classmethod
    def _non_empty(cls, v):
        for open_, close in v:
            if not open_ or not close:
                raise ValueError("markers: each pair needs a non-empty open and close marker")
        return v


class GuardConfig(Strict):
    keys: Path  # KeyStore file (relative paths are relative to the guard file)
    upstream: UpstreamConfig = UpstreamConfig()
    limits: LimitsConfig = LimitsConfig()
    log: LogConfig = LogConfig()
    reasoning: ReasoningConfig = ReasoningConfig()
    # the largest request body accepted (bytes); larger ones get 413 without an upstream call
    max_body_bytes: int = Field(8 << 20, gt=0)

    def org_limits(self, org: str) -> Limits:
        return self.limits.org.merged(self.limits.orgs.get(org))


def load_config(path: str | Path) -> GuardConfig:
    """Parse a guard file; any problem is one StillhouseError naming the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StillhouseError(f"{path}: no such guard file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StillhouseError(f"{path}: cannot read guard file: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise StillhouseError(f"{path}: guard file is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise StillhouseError(f"{path}: guard file must be a mapping of settings")
    try:
        cfg = GuardConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise StillhouseError(f"{path}: bad guard file at {where}: {first['msg']}") from None
    base = path.parent
    cfg.keys = base / cfg.keys if not cfg.keys.is_absolute() else cfg.keys
    if not cfg.log.path.is_absolute():
        cfg.log.path = base / cfg.log.path
    return cfg
