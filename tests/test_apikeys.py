"""API keys: stored hashed, shown once, revocable; the key file never holds a key."""

import json

import pytest

from stillhouse.apikeys import KeyStore, bearer_token
from stillhouse.cli import main
from stillhouse.errors import StillhouseError


def test_add_lookup_revoke(tmp_path):
    path = tmp_path / "keys.json"
    store = KeyStore.load(path, create=True)
    rec, key = store.add(account="alice", org="acme")
    assert key not in path.read_text()
    again = KeyStore.load(path)
    assert again.lookup(key).account == "alice"
    assert again.lookup(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert again.lookup("") is None and again.lookup(None) is None
    again.revoke(rec.id)
    assert KeyStore.load(path).lookup(key) is None
    assert path.stat().st_mode & 0o077 == 0


def test_bearer_token():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None and bearer_token("Bearer ") is None


@pytest.mark.parametrize("content, culprit", [("{", "not valid JSON"), ('{"keys": [{"id": 1}]}', "keys.0")])
def test_bad_key_file_names_the_culprit(tmp_path, content, culprit):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(StillhouseError, match=culprit):
        KeyStore.load(path)


def test_cli_prints_the_key_once(tmp_path, capsys):
    path = tmp_path / "k.json"
    main(["keys", "add", str(path), "--account", "bob"])
    key = capsys.readouterr().out.strip()
    assert KeyStore.load(path).lookup(key).account == "bob"
    main(["keys", "list", str(path)])
    out = capsys.readouterr().out
    assert "bob" in out and key not in out
    assert key not in json.dumps(json.loads(path.read_text()))
    with pytest.raises(SystemExit) as e:
        main(["keys", "revoke", str(path), "nothere0"])
    assert e.value.code == 2
