"""A teacher endpoint's identity, and keeping URL credentials out of everything we write or print.

`normalise(base_url)` is what identifies an endpoint in the response cache key, the artifact id
and lineage: scheme, host, port and path, lower-cased where URLs are case-insensitive, with the
default port made explicit, and never the userinfo. Two servers answering to the same model name
are two sources: their answers must not be shared, and a manifest must name the one it used.

Credentials in a base_url (`http://user:pass@host/v1`) are refused before any request
(`refuse_userinfo`): httpx would send them as a Basic header instead of the configured bearer key,
and the URL is recorded and printed in many places. `scrub(text)` removes userinfo from every URL
in a text, and the Basic header's base64 form, for text that comes from elsewhere (an old
manifest, a server's error body echoing our headers).
"""

from __future__ import annotations

import base64
import re
from urllib.parse import unquote, urlsplit

from ..errors import StillhouseError

_DEFAULT_PORTS = {"http": 80, "https": 443}
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@/\s?#]*)@")


def has_userinfo(url: str) -> bool:
    return bool(urlsplit(url).netloc.rpartition("@")[1])


def refuse_userinfo(url: str, who: str) -> None:
    """A one-line error, naming the fix and never the URL, when `url` carries credentials."""
    if has_userinfo(url):
        raise StillhouseError(
            f"{who}: base_url contains credentials (user:password@host); remove them and put the key "
            "in an environment variable named by api_key_env"
        )


def normalise(base_url: str) -> str:
    """scheme://host:port/path, without userinfo, query or fragment, and no trailing slash."""
    parts = urlsplit(base_url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a non-numeric port: keep what was written, minus the userinfo
        port = parts.netloc.rpartition("@")[2].rpartition(":")[2]
    path = re.sub(r"/+", "/", parts.path).rstrip("/")
    return f"{scheme}://{host}:{port}{path}" if port else f"{scheme}://{host}{path}"


def _secrets_of(url: str) -> list[str]:
    """The forms a URL's userinfo can take in a message: as written, decoded, and as Basic base64."""
    userinfo = urlsplit(url).netloc.rpartition("@")[0]
    if not userinfo:
        return []
    user, _, password = userinfo.partition(":")
    plain = f"{unquote(user)}:{unquote(password)}"
    forms = {userinfo, plain, base64.b64encode(plain.encode()).decode(), unquote(password), password}
    return sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)


def scrub(text: str, *urls: str) -> str:
    """`text` with every URL's userinfo removed; for each of `urls` that carries credentials, also
    its password and the Basic-auth base64 of user:password wherever they appear."""
    for url in urls:
        for secret in _secrets_of(url):
            text = text.replace(secret, "***")
    return strip_userinfo(text)


def strip_userinfo(obj):
    """A copy of a JSON-like value with the userinfo removed from every URL in its strings."""
    if isinstance(obj, str):
        return _USERINFO.sub(lambda m: m.group("scheme"), obj)
    if isinstance(obj, dict):
        return {k: strip_userinfo(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [strip_userinfo(v) for v in obj]
    return obj
