"""API keys for `stillhouse serve` and the provider guard's gateway: one mechanism for both.

A key is shown once, when it is made (`sh-<key id>-<secret>`); the key file keeps only its
SHA-256. Keys are 256-bit random secrets, so a fast hash is enough: there is nothing to
brute-force the way there is with passwords (GitHub and Stripe store tokens the same way).
The key id (public, 8 hex chars) names a key in logs and on the command line without
revealing it.

The file is JSON, written atomically, readable by an operator:
    {"version": 1, "keys": [{"id": ..., "sha256": ..., "account": ..., "org": ...,
                             "created_at": ..., "revoked_at": null, "limits": {...}}]}
`limits` is free-form here; the gateway gives it meaning (rate limits and quotas).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from .errors import StillhouseError
from .fsutil import write_json_atomic
from .strict import Strict

KEY_RE = re.compile(r"^sh-([0-9a-f]{8})-([A-Za-z0-9_-]{43})$")


class KeyRecord(Strict):
    id: str = Field(pattern=r"^[0-9a-f]{8}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    account: str = "default"
    org: str = "default"
    created_at: float
    revoked_at: float | None = None
    limits: dict[str, Any] = Field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class _KeyFile(Strict):
    version: int = 1
    keys: list[KeyRecord] = Field(default_factory=list)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh (key id, plaintext key)."""
    key_id = secrets.token_hex(4)
    return key_id, f"sh-{key_id}-{secrets.token_urlsafe(32)}"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class KeyStore:
    """Hashed API keys in one JSON file. Lookups compare hashes in constant time."""

    def __init__(self, path: str | Path, records: list[KeyRecord]):
        self.path = Path(path)
        self.records = records
        self._by_hash = {r.sha256: r for r in records}

    @classmethod
    def load(cls, path: str | Path, *, create: bool = False) -> "KeyStore":
        path = Path(path)
        if not path.exists():
            if create:
                return cls(path, [])
            raise StillhouseError(f"{path}: no such key file (make one with `stillhouse keys add {path}`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            parsed = _KeyFile.model_validate(data)
        except (OSError, UnicodeDecodeError) as e:
            raise StillhouseError(f"{path}: cannot read key file: {e}") from None
        except json.JSONDecodeError as e:
            raise StillhouseError(f"{path}: key file is not valid JSON (line {e.lineno})") from None
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise StillhouseError(f"{path}: bad key file at {where}: {first['msg']}") from None
        return cls(path, parsed.keys)

    def save(self) -> None:
        write_json_atomic(self.path, _KeyFile(keys=self.records).model_dump(mode="json"))
        try:
            self.path.chmod(0o600)
        except OSError:
            pass

    def add(self, *, account: str = "default", org: str = "default", limits: dict | None = None) -> tuple[KeyRecord, str]:
        """Make a key, record its hash, save; return the record and the plaintext (shown once)."""
        key_id, key = new_key()
        while any(r.id == key_id for r in self.records):
            key_id, key = new_key()
        rec = KeyRecord(id=key_id, sha256=hash_key(key), account=account, org=org, created_at=time.time(), limits=limits or {})
        self.records.append(rec)
        self._by_hash[rec.sha256] = rec
        self.save()
        return rec, key

    def revoke(self, key_id: str) -> KeyRecord:
        for rec in self.records:
            if rec.id == key_id:
                if rec.revoked_at is None:
                    rec.revoked_at = time.time()
                    self.save()
                return rec
        raise StillhouseError(f"{self.path}: no key with id {key_id!r}")

    def lookup(self, key: str | None) -> KeyRecord | None:
        """The active record for a plaintext key, or None (unknown, malformed or revoked)."""
        if not key or not KEY_RE.match(key):
            return None
        digest = hash_key(key)
        rec = self._by_hash.get(digest)
        if rec is None or not hmac.compare_digest(rec.sha256, digest) or not rec.active:
            return None
        return rec
