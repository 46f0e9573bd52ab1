import json
import stat
import time

import pytest

from app import keys
from app.keys import KeyStore


def run(capsys, path, *argv):
    rc = keys.main(["--file", str(path), *argv])
    out = capsys.readouterr()
    return rc, out.out.strip(), out.err


def test_create_prints_the_key_once_and_stores_only_its_hash(tmp_path, capsys):
    path = tmp_path / "keys.json"
    rc, key, err = run(capsys, path, "create", "alice", "--models", "a,b", "--rpm", "10")
    assert rc == 0 and key.startswith("sk-") and "not shown again" in err
    text = path.read_text()
    assert key not in text and key.split("-", 2)[2] not in text
    rec = json.loads(text)["keys"][0]
    assert rec["name"] == "alice" and rec["models"] == ["a", "b"] and rec["rpm"] == 10
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temp file left behind
    assert KeyStore(path).authenticate(key).name == "alice"


def test_list_shows_names_never_secrets(tmp_path, capsys):
    path = tmp_path / "keys.json"
    _, key, _ = run(capsys, path, "create", "alice")
    rc, out, _ = run(capsys, path, "list")
    assert rc == 0 and "alice" in out and key not in out
    rc, out, _ = run(capsys, path, "list", "--json")
    assert json.loads(out)[0]["state"] == "active"


def test_rotate_replaces_the_key_and_revoke_stops_it(tmp_path, capsys):
    path = tmp_path / "keys.json"
    _, old, _ = run(capsys, path, "create", "bob", "--tpm", "500")
    rc, new, _ = run(capsys, path, "rotate", "bob")
    assert rc == 0 and new != old
    store = KeyStore(path)
    assert store.authenticate(old) is None
    assert store.authenticate(new).tpm == 500  # settings carried over
    run(capsys, path, "revoke", "bob")
    assert KeyStore(path).authenticate(new) is None
    _, out, _ = run(capsys, path, "list", "--all")
    assert out.count("revoked") == 2


def test_rotate_with_grace_keeps_the_old_key_for_a_while(tmp_path, capsys):
    path = tmp_path / "keys.json"
    _, old, _ = run(capsys, path, "create", "carol")
    _, new, _ = run(capsys, path, "rotate", "carol", "--grace-minutes", "5")
    store = KeyStore(path)
    assert store.authenticate(old) is not None and store.authenticate(new) is not None


def test_expired_wrong_and_malformed_keys_are_refused(tmp_path, capsys):
    path = tmp_path / "keys.json"
    _, key, _ = run(capsys, path, "create", "dave", "--expires", "2099-01-01")
    store = KeyStore(path)
    assert store.authenticate(key) is not None
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    for junk in ("", "sk-", "Bearer x", key[:15], "sk-" + "z" * 60):
        assert store.authenticate(junk) is None
    data = json.loads(path.read_text())
    data["keys"][0]["expires_at"] = "2000-01-01T00:00:00+00:00"
    path.write_text(json.dumps(data))
    store.reload()
    assert store.authenticate(key) is None


def test_store_picks_up_changes_to_the_file(tmp_path, capsys):
    path = tmp_path / "keys.json"
    store = KeyStore(path, recheck_s=0)
    _, key, _ = run(capsys, path, "create", "erin")
    time.sleep(0.01)
    assert store.authenticate(key) is not None
    run(capsys, path, "revoke", "erin")
    assert store.authenticate(key) is None


@pytest.mark.parametrize("argv, message", [
    (["create", "x", "--expires", "yesterday"], "is not an ISO date"),
    (["create", "x", "--expires", "2001-01-01"], "in the past"),
    (["revoke", "nobody"], "no active key named 'nobody'"),
    (["create", "x", "--rpm", "0"], "--rpm must be at least 1"),
])
def test_cli_errors_are_one_clear_line(tmp_path, capsys, argv, message):
    rc, _, err = run(capsys, tmp_path / "keys.json", *argv)
    assert rc != 0 and message in err and "Traceback" not in err


def test_duplicate_active_name_is_refused(tmp_path, capsys):
    path = tmp_path / "keys.json"
    run(capsys, path, "create", "frank")
    rc, _, err = run(capsys, path, "create", "frank")
    assert rc == 1 and "exists" in err


def test_corrupt_file_is_reported_not_overwritten(tmp_path, capsys):
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    rc, _, err = run(capsys, path, "create", "gina")
    assert rc == 1 and "cannot be read" in err
    assert path.read_text() == "{not json"


def test_writes_keep_the_files_owner(tmp_path, capsys):
    import os

    path = tmp_path / "keys.json"
    run(capsys, path, "create", "owner-probe")
    os.chown(path, 4321, 4321)  # as if the gateway's service user owned it
    run(capsys, path, "create", "another")
    assert (path.stat().st_uid, path.stat().st_gid) == (4321, 4321)
