import json
import re
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


# ------------------------------------------------ strict loading and reload behaviour


def _one_key(tmp_path, capsys, *flags):
    path = tmp_path / "keys.json"
    _, key, _ = run(capsys, path, "create", "hank", "--models", "text2sql", *flags)
    return path, key


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data["keys"][0].update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, message", [
    ({"rpm": "60"}, "keys[0] ('hank').rpm: must be an integer of at least 1 (got str)"),
    ({"tpm": 0}, ".tpm: must be an integer of at least 1 (got int)"),
    ({"max_concurrency": True}, ".max_concurrency: must be an integer of at least 1 (got bool)"),
    ({"models": "text2sql"}, ".models: must be a non-empty list of model names (got str)"),
    ({"models": []}, ".models: must be a non-empty list of model names (got list)"),
    ({"models": ["a", 3]}, ".models: must be a non-empty list of model names (got list)"),
    ({"hash": "xyz"}, ".hash: must be a SHA-256 hex digest (got str)"),
    ({"id": 12}, ".id: must be 12 lowercase hex characters (got int)"),
    ({"expires_at": "soon"}, ".expires_at: must be an ISO date-time (got str)"),
    ({"created_at": None}, ".created_at: must be an ISO date-time (got NoneType)"),
    ({"colour": "red"}, "unknown field 'colour'"),
])
def test_a_wrong_field_is_refused_with_its_place_named_and_no_value(tmp_path, capsys, changes,
                                                                   message):
    path, _ = _one_key(tmp_path, capsys)
    digest = json.loads(path.read_text())["keys"][0]["hash"]
    _edit(path, **changes)
    with pytest.raises(keys.KeyStoreError) as e:
        KeyStore(path)
    assert message in str(e.value) and digest not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not JSON"),
    ('{"keys": {}}', "expected an object with a 'keys' list"),
    ("[]", "expected an object with a 'keys' list"),
    ('{"version": 2, "keys": []}', "unsupported 'version'"),
    ('{"keys": [3]}', "keys[0] is not an object"),
])
def test_a_wrong_file_shape_is_refused(tmp_path, text, message):
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(keys.KeyStoreError, match=re.escape(message)):
        KeyStore(path)


def test_a_missing_field_and_a_duplicate_id_are_refused(tmp_path, capsys):
    path, _ = _one_key(tmp_path, capsys)
    data = json.loads(path.read_text())
    data["keys"].append(dict(data["keys"][0], name="copy"))
    path.write_text(json.dumps(data))
    with pytest.raises(keys.KeyStoreError, match="two records share one id"):
        KeyStore(path)
    del data["keys"][1], data["keys"][0]["rpm"]
    path.write_text(json.dumps(data))
    with pytest.raises(keys.KeyStoreError, match="field 'rpm' is missing"):
        KeyStore(path)


def test_the_gateway_store_refuses_a_missing_file_but_takes_an_empty_one(tmp_path):
    path = tmp_path / "keys.json"
    assert KeyStore(path).authenticate("sk-x") is None  # the CLI's view: no keys yet
    with pytest.raises(keys.KeyStoreError, match="does not exist"):
        KeyStore(path, must_exist=True)
    path.write_text("")  # what the installer creates
    KeyStore(path, must_exist=True)


@pytest.mark.parametrize("damage", [
    lambda p: p.write_text("{not json"),
    lambda p: _edit(p, rpm="60"),
    lambda p: _edit(p, models="text2sql,sql-coder"),
    lambda p: p.unlink(),
])
def test_a_bad_file_at_reload_keeps_the_last_good_set_and_says_so(tmp_path, capsys, caplog,
                                                                  damage):
    path, key = _one_key(tmp_path, capsys)
    other = run(capsys, path, "create", "ivan")[1]
    run(capsys, path, "revoke", "ivan")
    seen = []
    store = KeyStore(path, recheck_s=0, must_exist=True, on_reload=seen.append)
    good = path.read_text()
    digest = json.loads(good)["keys"][0]["hash"]
    damage(path)
    rec = store.authenticate(key)
    assert rec is not None and rec.rpm == 60 and rec.models == ["text2sql"]
    assert not rec.allows("sql")  # no grant by substring
    assert store.authenticate(other) is None  # the revocation stays applied
    assert seen == [False]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "keeping the last good set of 2 keys" in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage() and digest not in errors[0].getMessage()
    store.authenticate(key)
    assert seen == [False]  # the same bad file is reported once, not on every recheck
    path.write_text(good)  # the backup restored
    store.authenticate(key)
    assert seen == [False, True]


def test_a_keys_folder_that_cannot_be_searched_is_a_refused_reload_not_an_error(tmp_path,
                                                                               capsys):
    path, key = _one_key(tmp_path, capsys)
    seen = []
    store = KeyStore(path, recheck_s=0, must_exist=True, on_reload=seen.append)
    # what a stat of a file in a folder the service user may not enter raises
    with pytest.MonkeyPatch.context() as mp:
        def denied(self, *a, **kw):
            raise PermissionError(13, "Permission denied")
        mp.setattr(type(path), "stat", denied)
        mp.setattr(type(path), "read_text", denied)
        assert store.authenticate(key) is not None  # the last good set, not a crash
    assert seen == [False]
