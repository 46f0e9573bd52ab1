"""site.yml on a real systemd host over SSH, in CPU mode: converge, converge again with
nothing changed, verify from outside with testinfra, one HTTPS completion through the host,
and a killed engine that systemd brings back."""

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

pytestmark = pytest.mark.infra

ANSIBLE = local.ROOT / "ansible"
BIN = local.ROOT / ".venv" / "bin"
MODELS = declaration.load()


def playbook(inventory, extra_vars, *args, playbook="site.yml"):
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), "-e", f"@{extra_vars}",
         playbook, *args],
        cwd=ANSIBLE, capture_output=True, text=True, timeout=3600,
        env={"ANSIBLE_FORCE_COLOR": "0", "PATH": f"{BIN}:/usr/bin:/bin:/usr/sbin:/sbin",
             "HOME": str(local.STATE), "ANSIBLE_STDOUT_CALLBACK": "default"})


def recap(output: str) -> dict[str, int]:
    line = next(x for x in output.splitlines() if re.match(r"^gpu1\s+:", x))
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


def cpu_mode_vars(path):
    """The extra vars that converge site.yml in CPU mode on the test hosts."""
    path.write_text(yaml.safe_dump({
        "gpu_enabled": False,
        "models_local_paths": local.model_paths(MODELS),
        "common_metrics_cidrs": ["10.213.0.0/24"],
        "common_ssh_cidrs": ["10.213.0.0/24"],
        "common_https_cidrs": ["10.213.0.0/24"],
        "monitoring_grafana_enabled": False,  # Grafana's repository is out of reach here
    }))
    return path


@pytest.fixture(scope="module")
def converged(test_hosts, tmp_path_factory):
    """Converge twice; the second run's recap is returned with the inventory."""
    tmp = tmp_path_factory.mktemp("converge")
    inventory = local.ROOT / ".local" / "testhosts" / "inventory.yml"
    from tests.infra.hosts import ansible_inventory

    ansible_inventory(test_hosts, inventory, groups={"gpu_hosts": ["gpu1"],
                                                     "monitoring": ["gpu1"]})
    extra = cpu_mode_vars(tmp / "cpu-mode.yml")
    first = playbook(inventory, extra)
    (tmp / "first.log").write_text(first.stdout + first.stderr)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-2000:]
    second = playbook(inventory, extra)
    (tmp / "second.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 0, second.stdout[-6000:]
    return {"inventory": inventory, "recap": recap(second.stdout), "second": second.stdout,
            "host": test_hosts[0]}


def test_second_converge_changes_nothing(converged):
    changed = [x for x in converged["second"].splitlines() if x.startswith("changed:")]
    assert converged["recap"]["changed"] == 0, "\n".join(changed)
    assert converged["recap"]["failed"] == 0


@pytest.fixture(scope="module")
def host(converged):
    h = converged["host"]
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
def test_systemd_analyze_security_within_threshold(converged, unit, threshold):
    h = converged["host"]
    path = f"/etc/systemd/system/{unit}"
    target = unit if "@" not in unit else f"vllm@{MODELS[0].name}.service"
    out = h.ssh(f"systemd-analyze security --offline=true --threshold={threshold} {path} "
                f"|| systemd-analyze security --threshold={threshold} {target}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr


def _key(h) -> str:
    out = h.ssh("/opt/llm-gateway/venv/bin/python -m app.keys --file "
                f"/etc/llm-gateway/keys.json create infra-{time.time_ns()}", check=True)
    return out.stdout.strip()


def test_https_completion_from_the_controller_through_the_host(converged, tmp_path):
    h = converged["host"]
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


def test_killed_engine_is_restarted_and_ready_recovers(converged):
    h = converged["host"]
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




def test_prometheus_scrapes_the_host_and_loaded_the_alerts(converged):
    h = converged["host"]
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


def test_engines_come_back_one_after_another_after_a_reboot(converged, test_hosts):
    """Last in this module: it reboots the converged host (systemctl reboot inside it; the
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
