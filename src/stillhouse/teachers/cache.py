"""A persistent on-disk cache of teacher responses: a rerun of the same requests costs nothing.

The key covers everything that can change an answer: the endpoint (normalised base URL, no
userinfo, plus the API path: two servers serving the same model name are two sources, and one
must never be credited with the other's answers), the model name, the rendered messages or
prompt text, every sampling parameter and the number of samples. One JSON file per response, written atomically,
sharded by the key's first two hex digits.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import sha256_json, write_json_atomic


def response_key(model: str, endpoint: str, prompt, params: dict) -> str:
    """`endpoint` is the normalised base URL plus the API path (`.../v1/chat/completions`);
    `prompt` is the messages list (chat) or the prompt text (completions)."""
    return sha256_json({"model": model, "endpoint": endpoint, "prompt": prompt, "params": params})


class ResponseCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a damaged entry is treated as missing and rewritten

    def put(self, key: str, value: dict) -> None:
        write_json_atomic(self._path(key), value)

    def count(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0
