"""`stillhouse serve --api-keys FILE`: every route but /health needs a key of the file; 401 in
OpenAI's shape otherwise; revoking a key takes effect on the running server."""

from __future__ import annotations

import httpx
import openai
import pytest

from serve_support import serving, stats
from stillhouse.apikeys import KeyStore
from stillhouse.errors import StillhouseError


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    store = KeyStore.load(path, create=True)
    _, key = store.add(account="alice")
    rec2, key2 = store.add(account="bob")
    with serving(tiny_model_dir, tmp_path_factory, api_keys=str(path)) as (url, _):
        yield url, path, key, rec2.id, key2


def _bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_requests_without_a_valid_key_get_401_in_openai_shape(keyed):
    url, _, key, _, _ = keyed
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    wrong = "sh-00000000-" + "A" * 43
    for headers in ({}, _bearer(wrong), _bearer("garbage"), {"Authorization": f"Basic {key}"}):
        for method, path, body in (("POST", "/v1/chat/completions", chat), ("GET", "/v1/models", None), ("GET", "/stillhouse/stats", None),
                                   ("POST", "/v1/completions", {"not": "even valid"})):  # 401 before the body is looked at
            r = httpx.request(method, url.removesuffix("/v1") + path, json=body, headers=headers, timeout=None)
            assert r.status_code == 401, (path, headers, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
            assert key not in r.text and wrong not in r.text  # never echoed
    assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200  # liveness stays open
    ok = httpx.post(f"{url}/chat/completions", json=chat, headers=_bearer(key), timeout=None)
    assert ok.status_code == 200 and ok.json()["choices"]
    assert stats(url, _bearer(key))["completed"] >= 1


def test_official_client_with_a_key_and_live_revocation(keyed):
    url, path, _, id2, key2 = keyed
    client = openai.OpenAI(base_url=url, api_key=key2, max_retries=0)
    assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices
    KeyStore.load(path).revoke(id2)  # what `stillhouse keys revoke FILE ID` does
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="tiny", prompt="a", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="sk-not-ours", max_retries=0).models.list()


def test_key_file_problems_are_one_line_errors(tiny_model_dir, tmp_path):
    from stillhouse.serve import build_app

    with pytest.raises(StillhouseError, match="no such key file"):
        build_app(str(tiny_model_dir), api_keys=str(tmp_path / "missing.json"))
    empty = tmp_path / "empty.json"
    KeyStore.load(empty, create=True).save()
    with pytest.raises(StillhouseError, match="no active key"):
        build_app(str(tiny_model_dir), api_keys=str(empty))
