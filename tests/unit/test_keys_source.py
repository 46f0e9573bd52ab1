"""Where the keys are: a file on the host (keys_file) or one S3 object for every host (keys_s3),
chosen once in the config and by the CLI; the S3 side against moto's in-process AWS."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
import yaml
from moto import mock_aws

from app import keys as keys_cli
from app.config import ConfigError, load_config
from app.keys import FileKeys, KeyStoreError

MODELS = [{"name": "text2sql", "backend": "http://127.0.0.1:8000"}]
STORE = "s3://llm-keys-test/keys.json"


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "gateway.yml"
    p.write_text(yaml.safe_dump({"models": MODELS, **data}))
    return p


@pytest.mark.parametrize("data, says", [
    ({}, "found neither"),
    ({"keys_file": "k.json", "keys_s3": {"url": STORE}}, "not both"),
])
def test_exactly_one_key_source_is_required(tmp_path, data, says):
    with pytest.raises(ConfigError, match=f"set exactly one of keys_file .* or keys_s3 .*{says}"):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize("url", [
    "https://llm-keys-test/keys.json", "s3://llm-keys-test", "s3://llm-keys-test/",
    "s3://Upper_Case/keys.json", "s3://ab/keys.json", "s3://llm-keys-test/a b.json",
    "s3://llm-keys-test/gateway/",
])
def test_the_store_url_must_name_an_object(tmp_path, url):
    with pytest.raises(ConfigError, match=r"keys_s3\.url: .*is not s3://<bucket>/<key>"):
        load_config(write(tmp_path, {"keys_s3": {"url": url}}))


@pytest.mark.parametrize("field, value", [
    ("poll_interval_s", 0), ("poll_interval_s", 301), ("timeout_s", 0), ("region", "mars"),
    ("bucket", "x"),
])
def test_bad_store_settings_are_named(tmp_path, field, value):
    with pytest.raises(ConfigError, match=rf"keys_s3\.{field}"):
        load_config(write(tmp_path, {"keys_s3": {"url": STORE, field: value}}))


def test_store_defaults_and_a_relative_cache_file_next_to_the_config(tmp_path):
    s3 = load_config(write(tmp_path, {"keys_s3": {"url": STORE}})).keys_s3
    assert (s3.poll_interval_s, s3.region) == (5.0, None)
    assert s3.cache_file == Path("/var/lib/llm-gateway/keys.json")
    cfg = load_config(write(tmp_path, {"keys_s3": {"url": STORE, "cache_file": "c/k.json"}}))
    assert cfg.keys_s3.cache_file == tmp_path / "c" / "k.json" and cfg.keys_file is None


def test_the_cli_finds_the_store_in_the_gateway_config(tmp_path, monkeypatch):
    monkeypatch.delenv("GATEWAY_KEYS_FILE", raising=False)
    monkeypatch.setenv("GATEWAY_CONFIG", str(write(tmp_path, {"keys_s3": {
        "url": STORE, "region": "eu-west-1"}})))
    args = keys_cli._parser().parse_args(["list"])
    found = keys_cli._key_set(args)
    assert type(found).__name__ == "S3Keys"
    assert (found.obj.bucket, found.obj.key) == ("llm-keys-test", "keys.json")
    assert found.obj._client.meta.region_name == "eu-west-1"
    monkeypatch.setenv("GATEWAY_CONFIG", str(write(tmp_path, {"keys_file": "k.json"})))
    found = keys_cli._key_set(args)
    assert isinstance(found, FileKeys) and found.path == tmp_path / "k.json"


def test_file_and_store_are_one_or_the_other(capsys):
    with pytest.raises(SystemExit):
        keys_cli._parser().parse_args(["--file", "k.json", "--store", STORE, "list"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.fixture()
def s3(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="llm-keys-test")
        yield client


def test_an_unchanged_object_is_not_transferred_again(s3):
    from app.keys_s3 import KeysObject

    obj = KeysObject(STORE, "us-east-1")
    etag = obj.put(b'{"version": 1, "keys": []}\n', None)
    assert obj.get(etag) is None
    assert obj.get('"another"')[1] == etag
    assert obj.get()[1] == etag


def test_writes_are_conditional_on_the_version_read(s3):
    from app.keys_s3 import KeysObject, KeysObjectConflict

    obj = KeysObject(STORE, "us-east-1")
    first = obj.put(b"{}", None)
    with pytest.raises(KeysObjectConflict):
        obj.put(b"{}", None)  # there is an object now: If-None-Match: * refuses
    second = obj.put(b'{"keys": []}', first)
    with pytest.raises(KeysObjectConflict):
        obj.put(b"{}", first)  # a stale ETag: If-Match refuses
    assert obj.get()[1] == second


def test_a_key_set_that_keeps_changing_gives_up_and_writes_nothing(s3):
    from app.keys_s3 import S3Keys

    keys = S3Keys(STORE, "us-east-1", attempts=3)
    keys.update(lambda records: keys_cli.issue_key(records, "base", ["*"], 1, 1, 1))
    calls = []

    def change(records):
        calls.append(1)
        # another writer lands between every read and write
        S3Keys(STORE, "us-east-1").update(
            lambda rs: keys_cli.issue_key(rs, f"other-{len(calls)}", ["*"], 1, 1, 1))
        return keys_cli.issue_key(records, "mine", ["*"], 1, 1, 1)

    with pytest.raises(KeyStoreError, match="kept changing during 3 attempts; nothing was written"):
        keys.update(change)
    assert len(calls) == 3
    assert sorted(r.name for r in keys.read()) == ["base", "other-1", "other-2", "other-3"]


def test_a_missing_object_is_an_empty_set_for_the_cli(s3):
    from app.keys_s3 import S3Keys

    assert S3Keys(STORE, "us-east-1").read() == []


def test_a_malformed_object_is_refused_with_the_way_back(s3):
    from app.keys_s3 import S3Keys

    s3.put_object(Bucket="llm-keys-test", Key="keys.json", Body=b"{not json")
    with pytest.raises(KeyStoreError, match=r"is malformed: .*list-object-versions"):
        S3Keys(STORE, "us-east-1").read()


def test_a_hosts_own_keys_move_into_the_store_without_overwriting_it(s3, tmp_path, capsys):
    """Growing from one host to several: the first host's keys file goes into the store,
    which may hold keys made meanwhile; a second import adds nothing."""
    host_file = tmp_path / "keys.json"
    for name in ("alice", "bob"):
        assert keys_cli.main(["--file", str(host_file), "create", name]) == 0
    alice = capsys.readouterr().out.split()[0]
    assert keys_cli.main(["--file", str(host_file), "revoke", "bob"]) == 0
    assert keys_cli.main(["--store", STORE, "create", "carol"]) == 0
    store = ["--store", STORE]
    # before: alice would be refused by a host that reads the store (bob is revoked anyway)
    capsys.readouterr()
    assert keys_cli.main([*store, "missing", str(host_file)]) == 3
    assert capsys.readouterr().out.startswith("alice (id ")
    assert keys_cli.main([*store, "import", str(host_file)]) == 0
    assert "imported 2 of 2 keys" in capsys.readouterr().err
    assert keys_cli.main([*store, "missing", str(host_file)]) == 0
    assert keys_cli.main([*store, "import", str(host_file)]) == 0
    assert "imported 0 of 2" in capsys.readouterr().err
    from app.keys_s3 import S3Keys

    records = S3Keys(STORE, "us-east-1").read()
    assert sorted(r.name for r in records) == ["alice", "bob", "carol"]
    mirror = tmp_path / "mirror.json"
    mirror.write_text(s3.get_object(Bucket="llm-keys-test", Key="keys.json")["Body"].read()
                      .decode())
    assert keys_cli.KeyStore(mirror).authenticate(alice).name == "alice"


def test_importing_a_file_that_is_not_there_is_an_error(s3, tmp_path, capsys):
    assert keys_cli.main(["--store", STORE, "import", str(tmp_path / "nope.json")]) == 1
    assert "nope.json does not exist" in capsys.readouterr().err
