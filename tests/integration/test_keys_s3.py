"""One key set for every host: the hashed keys object in S3 (moto's server on a loopback port,
its bucket encrypted with a KMS key as Terraform makes it), real gateway processes reading it,
and `python -m app.keys --store s3://...` writing it.

Hosts are gateway processes with a cache file each; "a new host" is one whose cache file does
not exist yet. Waits are conditions with a deadline, never fixed sleeps.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import boto3
import httpx
import pytest

from app import keys as keys_cli
from tests.conftest import models_config
from tests.support.gateway import GatewayHandle, start_gateway
from tests.support.procs import PYTHON, ROOT, Proc, free_port, wait_until

REGION = "us-east-1"
POLL_S = 0.2
# moto accepts any credentials; no profile or metadata service of this machine is consulted
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent"}


def start_moto(tmp: Path) -> tuple[str, Proc]:
    port = free_port()
    proc = Proc("moto", [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                tmp / f"moto-{port}.log")
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/moto-api/", timeout=60)
    return url, proc


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    url, proc = start_moto(tmp_path_factory.mktemp("moto"))
    yield url
    proc.stop()


def aws_env(moto_url: str) -> dict[str, str]:
    return {**FAKE_AWS, "AWS_ENDPOINT_URL_S3": moto_url}


@pytest.fixture()
def aws(moto, monkeypatch) -> str:
    """This process's AWS SDK pointed at moto (the CLI runs in-process)."""
    for name, value in aws_env(moto).items():
        monkeypatch.setenv(name, value)
    return moto


def new_store(moto_url: str) -> str:
    """A versioned bucket encrypted by default with a KMS key of its own, as
    terraform/modules/key_store makes it; the URL of its (not yet written) keys object."""
    kw = {"endpoint_url": moto_url, "region_name": REGION, "aws_access_key_id": "testing",
          "aws_secret_access_key": "testing"}
    s3, kms = boto3.client("s3", **kw), boto3.client("kms", **kw)
    bucket = f"llm-keys-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    key_id = kms.create_key(Description="keys")["KeyMetadata"]["KeyId"]
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [{
        "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms",
                                               "KMSMasterKeyID": key_id}}]})
    return f"s3://{bucket}/keys.json"


def s3_object(moto_url: str, store: str):
    """(S3 client, bucket, key) of the keys object, for tests that touch it directly."""
    bucket, key = store.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name=REGION,
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    return s3, bucket, key


def cli(store: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = keys_cli.main(["--store", store, "--region", REGION, *argv])
    return rc, out.getvalue().strip(), err.getvalue()


def create(store: str, name: str, *flags: str) -> str:
    rc, key, err = cli(store, "create", name, *flags)
    assert rc == 0, err
    return key


def start_host(moto_url: str, folder: Path, backends, store: str, **s3) -> GatewayHandle:
    """A gateway as a host runs it with the shared key set: its own cache file in `folder`."""
    keys_s3 = {"url": store, "region": REGION, "poll_interval_s": POLL_S,
               "cache_file": str(folder / "cache" / "keys.json"), **s3}
    return start_gateway(folder, {"models": models_config(backends), "keys_s3": keys_s3}, {},
                         env=aws_env(moto_url))


def status(gw: GatewayHandle, key: str) -> int:
    return httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code


def secrets_of(moto_url: str, store: str, keys: list[str]) -> list[str]:
    """What must never reach a log: the keys, their secrets and the hashes in the object."""
    s3, bucket, key = s3_object(moto_url, store)
    records = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())["keys"]
    return [*keys, *(k.split("-", 2)[2] for k in keys), *(r["hash"] for r in records)]


def assert_no_secrets(log: str, secrets: list[str]) -> None:
    leaked = [s[:8] + "..." for s in secrets if s in log]
    assert not leaked, f"key material in the gateway's log: {leaked}"


# ------------------------------------------------------------------ one key set, every host


def test_a_gateway_starts_from_the_object_and_serves_its_keys(aws, backends, tmp_path):
    store = new_store(aws)
    alice = create(store, "alice", "--models", "text2sql")
    gw = start_host(aws, tmp_path, backends, store)
    try:
        assert status(gw, alice) == 200
        assert status(gw, alice[:-2] + "xx") == 401
        models = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {alice}"})
        assert [m["id"] for m in models.json()["data"]] == ["text2sql"]
        cache = tmp_path / "cache" / "keys.json"
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        assert [r["name"] for r in json.loads(cache.read_text())["keys"]] == ["alice"]
        assert re.search(r"^gateway_keys_store_last_sync_timestamp_seconds [1-9]", gw.metrics(),
                         re.M)
    finally:
        gw.stop()


def test_keys_created_and_revoked_by_the_cli_reach_a_running_gateway(aws, backends, tmp_path):
    store = new_store(aws)
    first = create(store, "first")
    gw = start_host(aws, tmp_path, backends, store)
    try:
        late = create(store, "late")
        # no request needed to notice, and no restart
        wait_until(lambda: status(gw, late) == 200, what="the new key accepted")
        assert status(gw, first) == 200

        rc, _, err = cli(store, "revoke", "first")
        assert rc == 0, err
        wait_until(lambda: status(gw, first) == 401, what="the revoked key refused")
        assert status(gw, late) == 200

        rc, rotated, err = cli(store, "rotate", "late")
        assert rc == 0, err
        wait_until(lambda: status(gw, rotated) == 200 and status(gw, late) == 401,
                   what="the rotated key in force")
        log = gw.proc.log()
        assert "keys object " in log and "changed: 2 keys in force" in log
        assert_no_secrets(log, secrets_of(aws, store, [first, late, rotated]))
    finally:
        gw.stop()


def test_a_new_host_serves_every_existing_key_from_its_first_request(aws, backends, tmp_path):
    store = new_store(aws)
    keys = [create(store, f"tenant-{i}") for i in range(5)]
    rc, _, _ = cli(store, "revoke", "tenant-4")
    assert rc == 0
    host_a = start_host(aws, tmp_path / "a", backends, store)
    host_a.stop()
    # a replaced host: an empty disk, so no cache file; the first request after it listens
    fresh = tmp_path / "b"
    assert not (fresh / "cache").exists()
    host_b = start_host(aws, fresh, backends, store)
    try:
        assert [status(host_b, k) for k in keys] == [200, 200, 200, 200, 401]
    finally:
        host_b.stop()


class SlowLink:
    """A TCP relay to moto that holds every chunk a client sends for `delay` seconds, as a slow
    network would: operators started together then all read the same version before any of
    them writes, so their writes race for certain."""

    def __init__(self, target: str, delay: float):
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.delay = delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            for src, dst, delay in ((client, upstream, self.delay), (upstream, client, 0)):
                threading.Thread(target=self._pump, args=(src, dst, delay), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        # shutdown first: close() alone from this thread leaves the socket listening for as
        # long as the accept thread sits in accept(), and it took a later test's connection
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()


def test_concurrent_creates_from_several_operators_all_land(aws, tmp_path):
    store = new_store(aws)
    create(store, "existing")
    names = [f"op-{i}" for i in range(4)]
    link = SlowLink(aws, delay=1.0)
    try:
        procs = [subprocess.Popen(
            [PYTHON, "-m", "app.keys", "--store", store, "--region", REGION, "create", name],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **aws_env(link.url)}) for name in names]
        results = [(p.wait(120), p.stdout.read().strip(), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
    finally:
        link.close()
    assert all(rc == 0 for rc, _, _ in results), results
    # the race happened: at least one write was refused as stale and made again
    assert any("changed while this command ran" in err for _, _, err in results), results
    rc, out, _ = cli(store, "list", "--json")
    assert sorted(r["name"] for r in json.loads(out)) == ["existing", *names]
    # and each printed key is the one stored (not one from an attempt that lost the race)
    store_file = tmp_path / "keys.json"
    s3, bucket, key = s3_object(aws, store)
    store_file.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    opened = keys_cli.KeyStore(store_file)
    assert [opened.authenticate(k).name for _, k, _ in results] == names


def test_a_second_writer_between_read_and_write_is_not_lost(aws):
    """The race made certain: another `create` lands after this one read the object and
    before it writes; S3 refuses the stale write and the change is made on the new version."""
    store = new_store(aws)
    create(store, "existing")
    from app.keys_s3 import S3Keys

    notices = []
    keys = S3Keys(store, REGION, notice=notices.append)
    other = {}

    def change(records):
        if not other:  # first attempt only: the other writer gets in between
            other["key"] = create(store, "other")
        return keys_cli.issue_key(records, "mine", ["*"], 60, 1000, 4)

    mine = keys.update(change)
    assert len(notices) == 1 and "changed while this command ran" in notices[0]
    names = sorted(r.name for r in keys.read())
    assert names == ["existing", "mine", "other"]
    assert mine.startswith("sk-") and other["key"].startswith("sk-")


def test_creating_one_name_twice_at_once_leaves_one_key_and_one_refusal(aws):
    store = new_store(aws)
    procs = [subprocess.Popen(
        [PYTHON, "-m", "app.keys", "--store", store, "--region", REGION, "create", "twin"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **aws_env(aws)}) for _ in range(2)]
    rcs = sorted(p.wait(60) for p in procs)
    errors = "".join(p.stderr.read() for p in procs)
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert rcs == [0, 1], errors
    assert "an active key named 'twin' exists" in errors
    _, out, _ = cli(store, "list", "--json")
    assert [r["name"] for r in json.loads(out)] == ["twin"]


# ------------------------------------------------------------------ when S3 fails


def log_entries(gw: GatewayHandle, level: str) -> list[dict]:
    """The key store's log lines of one level."""
    return [e for e in map(json.loads, gw.log_lines())
            if e["level"] == level and e["logger"] == "gateway.keys"]


def test_s3_unreachable_keeps_the_last_set_and_a_restart_serves_the_local_copy(
        backends, tmp_path, monkeypatch):
    """S3 goes away (its server stopped): the gateway keeps serving the keys it had, logs a
    warning (no key, no hash) and counts the failed reads; restarted during the outage, it
    starts from its local copy."""
    moto_url, moto_proc = start_moto(tmp_path)  # this test's own: it stops it
    for name, value in aws_env(moto_url).items():
        monkeypatch.setenv(name, value)
    store = new_store(moto_url)
    alice = create(store, "alice")
    revoked = create(store, "gone")
    assert cli(store, "revoke", "gone")[0] == 0
    secrets = secrets_of(moto_url, store, [alice, revoked])
    gw = start_host(moto_url, tmp_path / "host", backends, store)
    try:
        assert status(gw, alice) == 200
        moto_proc.stop()
        wait_until(lambda: any("keeping the last good set of 2 keys" in e["msg"]
                               for e in log_entries(gw, "warning")),
                   timeout=30, what="a warning that S3 cannot be read")
        assert (status(gw, alice), status(gw, revoked)) == (200, 401)
        assert re.search(r"^gateway_keys_store_errors_total [1-9]", gw.metrics(), re.M)
        assert "gateway_keys_last_reload_ok 1.0" in gw.metrics()  # nothing was refused
    finally:
        gw.stop()
    warnings = log_entries(gw, "warning")
    assert len(warnings) == 1, warnings  # one line for the outage, not one per poll
    assert "exc" not in warnings[0] and store in warnings[0]["msg"]

    again = start_host(moto_url, tmp_path / "host", backends, store)
    try:
        assert (status(again, alice), status(again, revoked)) == (200, 401)
        wait_until(lambda: "serving the last good copy" in again.proc.log(),
                   what="the start-from-copy warning")
        log = again.proc.log()
    finally:
        again.stop()
    assert_no_secrets(gw.proc.log() + log, secrets)


def test_no_object_and_no_local_copy_stops_the_gateway_with_one_line(aws, tmp_path):
    store = new_store(aws)  # nothing written yet
    cfg = tmp_path / "gateway.yml"
    cfg.write_text(json.dumps({"keys_s3": {"url": store, "region": REGION,
                                           "cache_file": str(tmp_path / "keys.json")},
                               "models": [{"name": "a", "backend": "http://127.0.0.1:9"}]}))
    out = subprocess.run([PYTHON, "-m", "app"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={**os.environ, "GATEWAY_CONFIG": str(cfg)})
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: keys object {store} does not exist")
    assert "no last good copy" in out.stderr and not (tmp_path / "keys.json").exists()


def test_a_malformed_version_is_refused_and_the_last_good_set_stays(aws, backends, tmp_path):
    store = new_store(aws)
    alice = create(store, "alice")
    bob = create(store, "bob")
    gw = start_host(aws, tmp_path, backends, store)
    s3, bucket, key = s3_object(aws, store)
    try:
        good = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert cli(store, "revoke", "bob")[0] == 0
        wait_until(lambda: status(gw, bob) == 401, what="bob's revocation")
        secrets = secrets_of(aws, store, [alice, bob])
        # a hand-edited version with a type error, revocation undone
        data = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        for r in data["keys"]:
            r["rpm"], r["revoked_at"] = "60", None
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(data).encode())
        wait_until(lambda: "gateway_keys_last_reload_ok 0.0" in gw.metrics(),
                   what="the refusal in /metrics")
        assert (status(gw, alice), status(gw, bob)) == (200, 401)
        cached = json.loads((tmp_path / "cache" / "keys.json").read_text())
        assert all(type(r["rpm"]) is int for r in cached["keys"])  # the copy stayed good
        errors = log_entries(gw, "error")
        assert len(errors) == 1 and "keeping the last good set of 2 keys" in errors[0]["msg"]
        assert "rpm" in errors[0]["msg"]  # names the field, never its record's hash

        s3.put_object(Bucket=bucket, Key=key, Body=good)  # an operator restores a version
        wait_until(lambda: "gateway_keys_last_reload_ok 1.0" in gw.metrics(),
                   what="recovery in /metrics")
        assert status(gw, bob) == 200  # the restored version predates the revocation
        assert_no_secrets(gw.proc.log(), secrets)
    finally:
        gw.stop()


def test_the_cli_reports_what_s3_refused_in_one_line(aws):
    store = new_store(aws).replace("llm-keys-", "llm-nobucket-")
    rc, _, err = cli(store, "create", "x")
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: keys object {store} cannot be read: NoSuchBucket")
    rc, _, err = cli("s3://Bad_Bucket/keys.json", "list")
    assert rc == 1 and "is not s3://<bucket>/<key>" in err


# ------------------------------------------------------------------ make key-*


def test_make_key_verbs_change_the_deployments_store_else_the_local_file(aws, tmp_path):
    """The make verbs as an operator types them: with a deployment that has a key store they
    change the S3 object; with no deployment here, the local stack's keys file."""
    from stack import aws_ops

    store = new_store(aws)
    inventory = tmp_path / "hosts.yml"  # what `make inventory` wrote; no Terraform state here
    (tmp_path / "no-state").mkdir()
    ops = f"{PYTHON} -m stack.aws_ops --tf-dir {tmp_path / 'no-state'} --out {inventory}"
    local_file = tmp_path / "local-keys.json"

    def make(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-s", *args, f"AWS_OPS={ops}",
                               f"LOCAL_KEYS_FILE={local_file}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={**os.environ, **aws_env(aws)})

    # no deployment: the local stack's file
    made = make("key-create", "NAME=local-app", "RPM=5")
    assert made.returncode == 0, made.stderr
    assert keys_cli.KeyStore(local_file).authenticate(made.stdout.strip()).rpm == 5

    aws_ops.write_inventory(aws_ops.Deployment(
        name="llm", region=REGION, ssh_user="ubuntu", key_store_url=store,
        hosts=[aws_ops.Host(name="llm-gpu-0", instance_id="i-0123456789abcdef0",
                            public_ip="198.51.100.10")]), inventory)
    made = make("key-create", "NAME=analytics", "MODELS=text2sql,embed", "RPM=120",
                "EXPIRES=2099-01-01")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert "not shown again" in made.stderr
    listed = make("key-list")
    assert listed.returncode == 0 and "analytics" in listed.stdout and key not in listed.stdout
    assert "text2sql,embed" in listed.stdout and "2099-01-01" in listed.stdout
    rotated = make("key-rotate", "NAME=analytics", "GRACE=5")
    assert rotated.returncode == 0, rotated.stderr
    records = json.loads(cli(store, "list", "--json")[1])
    # the old key works for the grace minutes, then expires; the new one has no grace
    assert [r["name"] for r in records] == ["analytics", "analytics"]
    assert records[0]["expires"] < "2099" and records[1]["expires"].startswith("2099-01-01")
    assert make("key-revoke", "NAME=analytics").returncode == 0
    assert make("key-revoke", "NAME=analytics").returncode == 0
    records = json.loads(cli(store, "list", "--all", "--json")[1])
    assert [r["state"] for r in records] == ["revoked", "revoked"]
    assert "local-app" not in json.dumps(records)  # the store, not the local file

    nameless = make("key-create")
    assert nameless.returncode != 0 and "error: name the key: NAME=" in nameless.stdout
