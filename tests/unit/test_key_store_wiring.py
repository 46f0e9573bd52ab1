"""The key store from Terraform's outputs to the hosts: the inventory gives the gateway role its
URL, region and S3's ranges; the role renders a config and a unit that read it; `make key-*`
find it (aws_ops key-store); the per-host playbook refuses a deployment that has one."""

from __future__ import annotations

import configparser
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.config import load_config
from stack import aws_ops
from tests.unit.test_aws_ops import (
    TF_OUTPUTS,
    _terraform_says,
    one_error_line,
    paths,  # noqa: F401 (the fixture, used as `ops` below)
)
from tests.unit.test_gateway_unit import gateway_vars, render
from tests.unit.test_role_templates import ROLES, ROOT

STORE = "s3://llm-keys-20250101000000000000000001/keys.json"
CIDRS = ["3.5.0.0/19", "54.231.0.0/16"]
WITH_STORE = {**TF_OUTPUTS, "key_store_url": {"value": STORE},
              "key_store_s3_cidrs": {"value": CIDRS}}


@pytest.fixture
def ops(request):
    """test_aws_ops's `paths`: a terraform dir, an inventory path, fake tools on PATH."""
    return request.getfixturevalue("paths")


GATEWAY_OPTIONS = yaml.safe_load((ROLES / "gateway/meta/argument_specs.yml").read_text())[
    "argument_specs"]["main"]["options"]


def test_the_inventory_points_every_gateway_at_the_key_store(ops):
    _terraform_says(ops, WITH_STORE)
    assert ops.run("inventory") == 0
    gv = yaml.safe_load(ops.out.read_text())["all"]["children"]["gpu_hosts"]["vars"]
    # the gateway role's own variables, declared where the role checks them
    wanted = {"gateway_keys_s3_url": STORE, "gateway_keys_s3_region": "us-east-1",
              "gateway_keys_s3_ip_allow": CIDRS}
    assert {k: gv[k] for k in wanted} == wanted and set(wanted) <= set(GATEWAY_OPTIONS)
    dep = aws_ops.read_inventory(ops.out)
    assert (dep.key_store_url, dep.key_store_s3_cidrs) == (STORE, CIDRS)


def test_without_a_key_store_the_inventory_leaves_the_keys_file_alone(ops):
    _terraform_says(ops, {**TF_OUTPUTS, "key_store_url": {"value": None},
                            "key_store_s3_cidrs": {"value": []}})
    assert ops.run("inventory") == 0
    gv = yaml.safe_load(ops.out.read_text())["all"]["children"]["gpu_hosts"]["vars"]
    assert not any(k.startswith("gateway_keys") for k in gv)


def test_key_store_gives_the_cli_arguments_from_outputs_then_the_inventory(ops, capsys):
    _terraform_says(ops, WITH_STORE)
    assert ops.run("key-store") == 0
    assert shlex.split(capsys.readouterr().out) == ["--store", STORE, "--region", "us-east-1"]
    assert ops.run("inventory") == 0
    ops.tool("terraform", "exit 1\n")  # the state lives elsewhere: the inventory answers
    capsys.readouterr()
    assert ops.run("key-store") == 0
    assert shlex.split(capsys.readouterr().out) == ["--store", STORE, "--region", "us-east-1"]


def test_key_store_says_nothing_without_a_deployment(ops, capsys):
    ops.tool("terraform", "exit 1\n")
    assert ops.run("key-store") == 0
    assert capsys.readouterr().out == ""  # make then uses the local stack's keys file


def test_key_store_refuses_a_deployment_with_keys_on_each_host(ops, capsys):
    _terraform_says(ops, TF_OUTPUTS)
    assert ops.run("key-store") == 2
    err = one_error_line(capsys.readouterr())
    assert "keeps its keys in a file on each host" in err and "create_key_store = true" in err


def test_the_summary_tells_how_to_make_a_key_in_the_store(ops, capsys):
    _terraform_says(ops, WITH_STORE)
    assert ops.run("inventory") == 0
    capsys.readouterr()
    assert ops.run("summary") == 0
    out = capsys.readouterr().out
    assert "make key-create NAME=my-app MODELS='*'" in out and "--file" not in out


def unit_service(**overrides) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    # repeated keys (IPAddressAllow=) are kept as one value per line
    text = render(ROOT / "systemd/gateway.service.j2", gateway_vars(**overrides))
    parser.read_string(text)
    return parser["Service"], text


def test_the_role_renders_a_config_and_unit_that_read_the_store(tmp_path):
    values = {"gateway_keys_s3_url": STORE, "gateway_keys_s3_region": "us-east-1",
              "gateway_keys_s3_ip_allow": CIDRS}
    cfg = tmp_path / "gateway.yml"
    cfg.write_text(render(ROLES / "gateway/templates/gateway.yml.j2", gateway_vars(**values)))
    loaded = load_config(cfg)
    assert loaded.keys_file is None
    assert (loaded.keys_s3.url, loaded.keys_s3.region) == (STORE, "us-east-1")
    assert loaded.keys_s3.cache_file == Path("/var/lib/llm-gateway/keys.json")

    service, text = unit_service(**values)
    assert service["StateDirectory"] == "llm-gateway" and service["StateDirectoryMode"] == "0700"
    # the cache file is where the unit may write
    assert loaded.keys_s3.cache_file.parent == Path("/var/lib") / service["StateDirectory"]
    allowed = [line.split("=", 1)[1].split() for line in text.splitlines()
               if line.startswith("IPAddressAllow=")]
    assert allowed == [["localhost"], ["169.254.169.254", *CIDRS]]
    assert "IPAddressDeny=any" in text


def test_without_a_store_the_role_renders_todays_config_and_unit(tmp_path):
    cfg = tmp_path / "gateway.yml"
    cfg.write_text(render(ROLES / "gateway/templates/gateway.yml.j2", gateway_vars()))
    loaded = load_config(cfg)
    assert loaded.keys_s3 is None and loaded.keys_file == Path("/etc/llm-gateway/keys.json")
    service, text = unit_service()
    assert "StateDirectory" not in service and "169.254.169.254" not in text
    # on AWS the SDK finds the region and the instance role itself: no AWS variable is set
    assert "Environment=AWS_" not in text


def test_an_aws_environment_reaches_the_unit_one_variable_a_line():
    env = {"AWS_ENDPOINT_URL": "http://10.0.0.1:5000", "AWS_ACCESS_KEY_ID": "testing"}
    service, text = unit_service(gateway_keys_s3_url=STORE, gateway_aws_env=env)
    lines = [x for x in text.splitlines() if x.startswith("Environment=AWS_")]
    assert lines == ["Environment=AWS_ACCESS_KEY_ID=testing",
                     "Environment=AWS_ENDPOINT_URL=http://10.0.0.1:5000"]


@pytest.mark.parametrize("store, refused", [(STORE, True), (None, False)])
def test_the_per_host_key_playbook_refuses_a_deployment_with_a_store(tmp_path, store, refused):
    playbook = Path(sys.executable).parent / "ansible-playbook"
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"gpu_hosts": {"hosts": {
        "h": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
              **({"gateway_keys_s3_url": store} if store else {})}}}}}}))
    # key_name missing on purpose: past the store check, the playbook stops at the name check
    proc = subprocess.run([str(playbook), "-i", str(inventory),
                           str(ROOT / "ansible/playbooks/rotate_key.yml")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin",
                               "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
                               "HOME": str(tmp_path)})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert ("make key-create|key-rotate|key-revoke" in out) == refused, out
    assert ("set -e key_name=<name>" in out) != refused, out
