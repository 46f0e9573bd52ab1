"""The gateway role's guard before a host switches from its own keys file to the key store
(ansible/roles/gateway/tasks/keys_store_guard.yml), run by ansible-playbook on this machine
against moto's S3: a working key of the file that the store lacks stops the play, naming it
and the way out; a host without a file of its own, or whose keys are imported, passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app import keys as keys_cli
from stack.render import ROLES
from tests.integration.test_keys_s3 import FAKE_AWS, REGION, moto, new_store  # noqa: F401
from tests.support.procs import ROOT

BIN = Path(sys.executable).parent


@pytest.fixture()
def guard(tmp_path, moto):  # noqa: F811 (the fixture imported above)
    """Run the guard with this host's keys file at `own` and the store at `store`."""
    install = tmp_path / "install"
    (install / "venv" / "bin").mkdir(parents=True)
    (install / "venv" / "bin" / "python").symlink_to(sys.executable)
    playbook = tmp_path / "guard.yml"
    playbook.write_text(yaml.safe_dump([{
        "hosts": "localhost", "gather_facts": False,
        "tasks": [{"ansible.builtin.include_role": {
            "name": "gateway", "tasks_from": "keys_store_guard.yml"}}]}]))
    store = new_store(moto)
    own = tmp_path / "keys.json"

    def run() -> subprocess.CompletedProcess:
        extra = {"gateway_keys_file": str(own), "gateway_keys_s3_url": store,
                 "gateway_keys_s3_region": REGION, "gateway_install_dir": str(install),
                 "gateway_aws_env": {**FAKE_AWS, "AWS_ENDPOINT_URL_S3": moto},
                 "ansible_python_interpreter": sys.executable}
        return subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook),
             "-e", json.dumps(extra)], capture_output=True, text=True, timeout=120,
            env={**os.environ, "ANSIBLE_ROLES_PATH": str(ROLES), "PYTHONPATH": str(ROOT),
                 "ANSIBLE_CALLBACK_RESULT_FORMAT": "json", "ANSIBLE_CONFIG": "/nonexistent",
                 "HOME": str(tmp_path)})

    run.own, run.store, run.moto = own, store, moto
    return run


def test_a_host_without_its_own_keys_file_passes(guard):
    out = guard()
    assert out.returncode == 0, out.stdout[-3000:]


def test_a_working_key_the_store_lacks_stops_the_switch_then_passes_once_imported(
        guard, monkeypatch):
    for name in ("alice", "bob"):
        assert keys_cli.main(["--file", str(guard.own), "create", name]) == 0
    assert keys_cli.main(["--file", str(guard.own), "revoke", "bob"]) == 0
    out = guard()
    assert out.returncode != 0
    assert "1 working key(s) of " + str(guard.own) in out.stdout, out.stdout[-3000:]
    assert f"not in the key store {guard.store}" in out.stdout
    assert "store: alice (id " in out.stdout and "bob" not in out.stdout
    assert "make key-import FILE=keys.json" in out.stdout
    # what `make key-import` runs, from the machine the deploy runs on
    for name, value in {**FAKE_AWS, "AWS_ENDPOINT_URL_S3": guard.moto}.items():
        monkeypatch.setenv(name, value)
    assert keys_cli.main(["--store", guard.store, "--region", REGION, "import",
                          str(guard.own)]) == 0
    out = guard()
    assert out.returncode == 0, out.stdout[-3000:]
