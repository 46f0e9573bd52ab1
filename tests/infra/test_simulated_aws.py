"""The simulated AWS on its own, without test hosts: the override list is sound, and preflight
and `make plan` run against moto's server with the production defaults.

The whole `make deploy` against it, on a test host, is tests/infra/test_site_converge.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.infra import simulated_aws as sim
from tests.infra.test_terraform import provider_mirror

pytestmark = pytest.mark.infra

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
# TEST-NET-1 (RFC 5737): an address nothing answers; these tests never connect to a host
NOWHERE = "192.0.2.10"


def _variables(path: Path) -> set[str]:
    return set(re.findall(r'^variable "(\w+)"', path.read_text(), re.M))


def test_every_override_names_a_real_setting_and_gives_one_reason():
    doc = sim.overrides()  # raises when an entry lacks `value` or a one-line `why`
    assert set(doc) == {"inputs", "terraform", "ansible", "emulator", "environment",
                        "test_host", "fleet", "fleet_stand_ins"}
    tf_vars = _variables(ROOT / "terraform" / "variables.tf")
    assert set(doc["inputs"]) | set(doc["terraform"]) <= tf_vars
    # an Ansible override must be a variable the playbooks or roles define
    defined: set[str] = set()
    for path in [*(ROOT / "ansible" / "group_vars").rglob("*.yml"),
                 *(ROOT / "ansible" / "roles").glob("*/defaults/main.yml")]:
        defined |= set(yaml.safe_load(path.read_text()) or {})
    assert set(doc["ansible"]) | set(doc["fleet"]) <= defined, \
        (set(doc["ansible"]) | set(doc["fleet"])) - defined
    # gpu_enabled is the one production switch the brief allows; the rest is forced
    assert doc["ansible"]["gpu_enabled"]["value"] is False


def test_bad_override_entries_are_refused(tmp_path, monkeypatch):
    bad = tmp_path / "sim.yml"
    bad.write_text(yaml.safe_dump({"ansible": {"gpu_enabled": {"value": False}}}))
    monkeypatch.setattr(sim, "OVERRIDES_FILE", bad)
    with pytest.raises(sim.SimulationError, match="ansible.gpu_enabled needs exactly"):
        sim.overrides()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("simaws")
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with sim.Emulator(tmp / "moto") as emulator:
        yield sim.Workspace(root=tmp / "co", venv=BIN.parent, emulator=emulator, ssh_key=key,
                            addresses={"llm-gpu-0": NOWHERE}, ansible_vars={},
                            mirror=provider_mirror(), log_dir=tmp / "logs")


def test_the_emulator_serves_canonicals_ami_parameter(workspace):
    name = sim.overrides()["emulator"]["ssm_parameter"]["value"]
    value = workspace.aws("ssm").get_parameter(Name=name)["Parameter"]["Value"]
    assert value == sim.UBUNTU_AMI["ami_id"]
    [image] = workspace.aws("ec2").describe_images(ImageIds=[value])["Images"]
    assert "ubuntu-noble-24.04-amd64" in image["Name"]


def test_make_plan_against_the_emulator_with_production_defaults(workspace):
    out = workspace.make("plan").stdout
    assert re.search(r"Plan: \d+ to add, 0 to change, 0 to destroy", out), out[-3000:]
    flat = " ".join(out.split())
    assert f'ami = "{sim.UBUNTU_AMI["ami_id"]}"' in flat  # from the SSM parameter
    assert 'instance_type = "g5.xlarge"' in flat
    assert "monitoring = false" in flat  # the one Terraform override
    assert "http_tokens = \"required\"" in flat


def test_preflight_passes_against_the_emulator(workspace):
    proc = subprocess.run([str(BIN / "python"), "-m", "stack.aws_ops", "preflight",
                           "--ansible-playbook", str(BIN / "ansible-playbook")],
                          cwd=workspace.root, env=workspace.env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "g5.xlarge is offered in us-east-1a" in proc.stdout
    # moto knows no G-instance quota: preflight takes its "not readable" branch
    assert "vCPU quota not readable" in proc.stdout
