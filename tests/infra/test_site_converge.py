"""`make deploy` end to end against a simulated AWS, converging a real systemd host over SSH.

The real Makefile verbs run in a copy of this checkout (tests/infra/simulated_aws.py): preflight,
terraform apply and destroy against moto's server, the inventory from Terraform's outputs, wait
for SSH, site.yml, the HTTPS smoke test, `make status`, `make stop`/`start`, `make destroy`. The
inventory's host address is the test host's (moto's addresses lead nowhere); every other
difference from a real deploy is listed in simulated_aws.yml. This is the suite's only converge
of the test host: `make deploy` twice (the second run changes nothing, in AWS or on the host),
then testinfra checks, systemd security scores, one HTTPS completion, a killed engine that systemd
brings back, and last a reboot after which the engines come back one after another.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import time

import httpx
import pytest
import testinfra
import yaml

from stack import declaration, local
from tests.infra import hosts as testhosts
from tests.infra import simulated_aws as sim
from tests.infra.test_terraform import provider_mirror

pytestmark = pytest.mark.infra

ANSIBLE = local.ROOT / "ansible"
BIN = local.ROOT / ".venv" / "bin"
MODELS = declaration.load()
HOST = "llm-gpu-0"  # Terraform's name for the first host of the default deployment ("llm")
INVENTORY = "ansible/inventories/aws/hosts.yml"


def recap(output: str, host: str = HOST) -> dict[str, int]:
    line = next(x for x in output.splitlines() if re.match(rf"^{re.escape(host)}\s+:", x))
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def test_syntax_and_lint_are_clean():
    for pb in ["site.yml", *sorted(str(p.relative_to(ANSIBLE)) for p in
                                   (ANSIBLE / "playbooks").glob("*.yml"))]:
        out = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i",
                              "inventories/example/hosts.yml", pb], cwd=ANSIBLE,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    lint = subprocess.run([str(BIN / "ansible-lint"), "--offline", "--profile", "production",
                           "-f", "pep8"], cwd=ANSIBLE, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-4000:] + lint.stderr[-2000:]


@pytest.fixture(scope="module")
def deployed(test_hosts, tmp_path_factory):
    """moto's server, a copy of the checkout, the test host dressed as a booted Ubuntu image,
    then `make deploy` twice. Yields the workspace and both runs' output."""
    tmp = tmp_path_factory.mktemp("deploy")
    h = test_hosts[0]
    with sim.Emulator(tmp / "moto") as emulator:
        ws = sim.Workspace(
            root=tmp / "co", venv=BIN.parent, emulator=emulator, ssh_key=h.ssh_key,
            addresses={HOST: h.address}, mirror=provider_mirror(), log_dir=tmp / "logs",
            ansible_vars=sim.ansible_overrides(local.model_paths(MODELS)))
        assert not (ws.root / "terraform" / "terraform.tfstate").exists()
        sim.prepare_login(h, "ubuntu", (h.ssh_key.parent / f"{h.ssh_key.name}.pub").read_text())
        extra = f"ANSIBLE_ARGS=-e @{ws.sim / 'ansible-overrides.yml'}"
        first = ws.make("deploy", "CONFIRM=yes", extra)
        second = ws.make("deploy", "CONFIRM=yes", extra)
        yield {"ws": ws, "first": first.stdout, "second": second.stdout, "host": h}


def test_make_deploy_ran_every_step_against_the_emulator(deployed):
    ws, out = deployed["ws"], deployed["first"]
    steps = re.findall(r"^>> \[(\d)/6\]", out, re.M)
    assert steps == ["1", "2", "3", "4", "5", "6"], out[-3000:]
    assert re.search(r"Apply complete! Resources: \d+ added, 0 changed, 0 destroyed", out)
    assert f">> https://{deployed['host'].address}/ready answered 200" in out
    assert recap(out)["failed"] == 0 and recap(out)["unreachable"] == 0
    # what Terraform made, as AWS (moto) reports it: the production defaults
    ec2 = ws.aws("ec2")
    [inst] = [i for r in ec2.describe_instances(Filters=[
        {"Name": "tag:Project", "Values": ["llm"]}])["Reservations"] for i in r["Instances"]]
    assert inst["InstanceType"] == "g5.xlarge" and inst["ImageId"] == sim.UBUNTU_AMI["ami_id"]
    assert inst["MetadataOptions"]["HttpTokens"] == "required"
    assert inst["Monitoring"]["State"] == "disabled"  # the one Terraform override
    volumes = [m["Ebs"]["VolumeId"] for m in inst["BlockDeviceMappings"]
               if m["DeviceName"] == "/dev/sdf"]
    assert len(volumes) == 1
    # the inventory: Terraform's outputs, the test host's address in place of moto's
    inv = yaml.safe_load((ws.root / INVENTORY).read_text())["all"]["children"]["gpu_hosts"]
    hv = inv["hosts"][HOST]
    assert hv["ansible_host"] == deployed["host"].address
    assert hv["aws_instance_id"] == inst["InstanceId"] and hv["aws_instance_type"] == "g5.xlarge"
    assert hv["models_volume_device"].endswith("vol" + volumes[0].removeprefix("vol-"))
    assert inv["vars"]["ansible_user"] == "ubuntu"


def terraform_changes(out: str) -> dict[str, list[str]]:
    """{resource address: its changed attribute lines} of the plan Terraform printed."""
    changes, current = {}, None
    for line in out.splitlines():
        if m := re.match(r"^  # (\S+) (will be|must be) ", line):
            current = changes.setdefault(m.group(1), [])
        elif current is not None and re.match(r"^    }$", line):
            current = None
        elif current is not None and re.match(r"^\s+[-+~] (?!resource )", line):
            current.append(line.strip())
    return changes


def test_second_make_deploy_changes_nothing_in_aws_or_on_the_host(deployed):
    out = deployed["second"]
    assert re.search(r"Apply complete! Resources: 0 added, \d+ changed, 0 destroyed", out), \
        out[-3000:]
    # the one emulator gap (simulated_aws.yml, emulator.rule_descriptions): moto forgets the
    # description of a rule that references a security group, so Terraform sets it again
    for address, lines in terraform_changes(out).items():
        assert re.match(r"module\.security\.aws_vpc_security_group_(in|e)gress_rule\.", address), \
            (address, lines)
        assert all(x.startswith("+ description ") for x in lines), (address, lines)
    changed = [x for x in out.splitlines() if x.startswith("changed:")]
    assert recap(out)["changed"] == 0, "\n".join(changed)
    assert recap(out)["failed"] == 0


@pytest.fixture(scope="module")
def host(deployed):
    h = deployed["host"]
    return testinfra.get_host(
        f"ssh://{h.ssh_user}@{h.address}", ssh_identity_file=str(h.ssh_key),
        ssh_extra_args="-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                       "-o LogLevel=ERROR")


def test_units_active_and_enabled(host):
    for unit in ["gateway.service", "nginx.service", "nftables.service",
                 "prometheus-node-exporter.service", "prometheus.service",
                 *[f"vllm@{m.name}.service" for m in MODELS]]:
        svc = host.service(unit)
        assert svc.is_running and svc.is_enabled, unit


def test_engines_and_gateway_listen_on_loopback_only_and_nginx_on_443(host):
    for m in MODELS:
        assert host.socket(f"tcp://127.0.0.1:{m.port}").is_listening
        assert not host.socket(f"tcp://0.0.0.0:{m.port}").is_listening
    assert host.socket("tcp://127.0.0.1:8080").is_listening
    assert not host.socket("tcp://0.0.0.0:8080").is_listening
    assert host.socket("tcp://0.0.0.0:443").is_listening


def test_file_owners_and_modes(host):
    keys = host.file("/etc/llm-gateway/keys.json")
    assert keys.user == "llm-gateway" and keys.mode == 0o600
    assert host.file("/etc/nginx/tls/llm-api.key").mode == 0o600
    assert host.file("/etc/llm-gateway/gateway.yml").mode == 0o640
    for m in MODELS:
        env = host.file(f"/etc/vllm/{m.name}.env")
        assert env.mode == 0o640 and env.group == "vllm"
        assert f"--served-model-name {m.name}" in env.content_string


@pytest.mark.parametrize("unit, threshold", [("gateway.service", 20), ("vllm@.service", 40)])
def test_systemd_analyze_security_within_threshold(deployed, unit, threshold):
    h = deployed["host"]
    path = f"/etc/systemd/system/{unit}"
    target = unit if "@" not in unit else f"vllm@{MODELS[0].name}.service"
    out = h.ssh(f"systemd-analyze security --offline=true --threshold={threshold} {path} "
                f"|| systemd-analyze security --threshold={threshold} {target}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr


def _key(h) -> str:
    out = h.ssh("/opt/llm-gateway/venv/bin/python -m app.keys --file "
                f"/etc/llm-gateway/keys.json create infra-{time.time_ns()}", check=True)
    return out.stdout.strip()


def test_https_completion_from_the_controller_through_the_host(deployed, tmp_path):
    h = deployed["host"]
    ca = tmp_path / "host.crt"
    ca.write_text(h.ssh("cat /etc/nginx/tls/llm-api.crt", check=True).stdout)
    key = _key(h)
    time.sleep(1.2)  # the gateway re-reads its keys file within a second
    ctx = ssl.create_default_context(cafile=str(ca))
    r = httpx.post(f"https://{h.address}/v1/completions", verify=ctx, timeout=60,
                   headers={"authorization": f"Bearer {key}"},
                   json={"model": MODELS[0].name, "prompt": "SELECT", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 0


def test_killed_engine_is_restarted_and_ready_recovers(deployed):
    h = deployed["host"]
    name = MODELS[0].name
    before = h.ssh(f"systemctl show -p MainPID --value vllm@{name}.service").stdout.strip()
    h.ssh(f"systemctl kill -s KILL vllm@{name}.service", check=True)
    deadline = time.monotonic() + 600
    ready = None
    while time.monotonic() < deadline:
        ready = h.ssh("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/ready").stdout
        pid = h.ssh(f"systemctl show -p MainPID --value vllm@{name}.service").stdout.strip()
        if ready == "200" and pid not in ("0", before):
            break
        time.sleep(3)
    assert ready == "200"
    restarts = h.ssh(f"systemctl show -p NRestarts --value vllm@{name}.service").stdout.strip()
    assert int(restarts) >= 1
    state = json.loads(h.ssh("curl -s http://127.0.0.1:8080/ready").stdout)
    assert state["models"][name]["status"] == "up"




def test_prometheus_scrapes_the_host_and_loaded_the_alerts(deployed):
    h = deployed["host"]
    rules = json.loads(h.ssh("curl -s http://127.0.0.1:9090/api/v1/rules", check=True).stdout)
    alerts = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]
              if r["type"] == "alerting"}
    expected = {line.split("alert:")[1].strip() for f in (local.ROOT / "monitoring" / "rules")
                .glob("*.rules.yml") for line in f.read_text().splitlines() if "alert:" in line}
    assert alerts == expected
    targets = json.loads(h.ssh("curl -s http://127.0.0.1:9090/api/v1/targets",
                               check=True).stdout)["data"]["activeTargets"]
    jobs = {t["labels"]["job"] for t in targets}
    assert {"gateway", "vllm", "node"} <= jobs


def test_alerts_go_to_the_deployments_topic_through_alertmanager_on_loopback(deployed, host):
    am = host.service("prometheus-alertmanager")
    assert am.is_running and am.is_enabled
    listening = host.socket.get_listening_sockets()
    assert [s for s in listening if s.endswith(":9093")] == ["tcp://127.0.0.1:9093"]
    assert not [s for s in listening if s.endswith(":9094")]  # its cluster port stays shut
    cfg = host.file("/etc/prometheus/alertmanager.yml")
    assert (cfg.user, cfg.group, cfg.mode) == ("root", "prometheus", 0o640)
    # make deploy's inventory chose SNS and the topic Terraform made (in the emulator)
    [arn] = [t["TopicArn"] for t in deployed["ws"].aws("sns").list_topics()["Topics"]]
    doc = yaml.safe_load(cfg.content_string)
    assert doc["route"]["receiver"] == "sns"
    [sns] = [r["sns_configs"][0] for r in doc["receivers"] if r["name"] == "sns"]
    assert sns["topic_arn"] == arn and "access_key" not in sns.get("sigv4", {})
    found = deployed["host"].ssh("curl -s http://127.0.0.1:9090/api/v1/alertmanagers",
                                 check=True).stdout
    assert "http://127.0.0.1:9093/api/v2/alerts" in found


# ---- operations: make status, make stop / make start, make destroy


def _status_row(out: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith(HOST))


def test_make_status_shows_the_instance_units_and_ready(deployed):
    ws, h = deployed["ws"], deployed["host"]
    out = ws.make("status").stdout
    row = _status_row(out)
    assert row[1:5] == [ws.instance_id(), "running", h.address, "200"], out
    units = dict(u.split("=", 1) for u in row[5:])
    for unit in ["nginx", "gateway", "prometheus-node-exporter",
                 *[f"vllm@{m.name}" for m in MODELS]]:
        assert units.get(unit) == "active/running", (unit, out)
    assert f"endpoint: https://{h.address}" in out


def test_make_stop_and_start_drive_the_instance_and_ssh_comes_back(deployed):
    """EC2's side against moto: the instance found by its tags, stopped and started, the waiters
    satisfied; `make status` asks no host while it is stopped. The guest's side of a stop and
    start (a shutdown, a cold boot, the engines back in order) is the reboot test below."""
    ws, h = deployed["ws"], deployed["host"]
    assert ">> stopped" in ws.make("stop").stdout
    assert ws.instance_state() == "stopped"
    row = _status_row(ws.make("status").stdout)
    assert row[2:] == ["stopped", h.address, "-", "-"], row
    assert ">> running" in ws.make("start").stdout
    assert ws.instance_state() == "running"
    assert f"{HOST} ({h.address}): status: done" in ws.make("wait-ssh").stdout
    assert _status_row(ws.make("status").stdout)[4] == "200"


def test_make_destroy_removes_the_deployment(deployed):
    ws = deployed["ws"]
    out = ws.make("destroy", "CONFIRM=yes").stdout
    assert re.search(r"Destroy complete! Resources: \d+ destroyed", out), out[-2000:]
    assert ws.instance_state() == "terminated"
    ec2 = ws.aws("ec2")
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "tag:Project", "Values": ["llm"]}])["Vpcs"]
    assert vpcs == []
    assert ec2.describe_addresses()["Addresses"] == []
    for left in (INVENTORY, ".local/aws_known_hosts", ".local/grafana-admin-password"):
        assert not (ws.root / left).exists(), left
    # and the tools say so in one line
    assert "no GPU hosts tagged Project=llm" in ws.make("status").stdout


# ---- reboot: the engines come back one after another, in the declaration's order

UNITS = [f"vllm@{m.name}.service" for m in MODELS]
# each engine may take up to the unit's start timeout; CPU engines here take about a minute
START_BUDGET_S = 300.0 * len(MODELS)


def _all_active(h) -> bool:
    # `systemctl is-active a b c` succeeds when any one is active: ask each unit's state
    out = h.ssh("systemctl show -p ActiveState --value " + " ".join(UNITS), timeout=30)
    return out.stdout.split() == ["active"] * len(UNITS)


def _boot_id(h) -> str:
    return h.ssh("cat /proc/sys/kernel/random/boot_id", check=True, timeout=15).stdout.strip()


def _times(h, unit: str) -> dict[str, int]:
    props = ["ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "NRestarts"]
    out = h.ssh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props), check=True)
    values = dict(line.split("=", 1) for line in out.stdout.split())
    return {k: int(v or 0) for k, v in values.items()}


def test_engines_come_back_one_after_another_after_a_reboot(deployed, test_hosts):
    """Last in this module: it reboots the deployed host (systemctl reboot inside it; the
    harness boots the same tree again, as a hypervisor would)."""
    engines = test_hosts[0]
    before = _boot_id(engines)
    h = testhosts.reboot_host(engines)
    assert _boot_id(h) != before

    deadline = time.monotonic() + START_BUDGET_S
    while not _all_active(h):
        failed = h.ssh("systemctl --failed --no-legend --plain " + " ".join(UNITS)).stdout
        assert not failed.strip(), failed + h.ssh(
            "journalctl -b --no-pager -n 80 -u 'vllm@*'").stdout
        assert time.monotonic() < deadline, h.ssh("systemctl list-units 'vllm@*'").stdout
        time.sleep(5)

    times = {unit: _times(h, unit) for unit in UNITS}
    for prev, unit in zip(UNITS, UNITS[1:], strict=False):
        # this engine's process started only once the previous one was active, i.e. healthy
        assert (times[unit]["ExecMainStartTimestampMonotonic"]
                >= times[prev]["ActiveEnterTimestampMonotonic"] > 0), (prev, unit, times)
    # started once each: no concurrent-start failure left a restart behind
    assert all(t["NRestarts"] == 0 for t in times.values()), times
    for m in MODELS:
        health = h.ssh(f"curl -s -o /dev/null -w '%{{http_code}}' "
                       f"http://127.0.0.1:{m.port}/health").stdout
        assert health == "200", m.name
