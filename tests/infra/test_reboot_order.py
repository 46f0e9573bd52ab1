"""After a reboot the vLLM engines come back one after another, in the order of the model
declaration, each only once the one before it answers /health: the start order the vllm role
renders (a drop-in per instance, After= the previous one; ExecStartPost waits for /health).

It reboots the shared test host (`systemctl reboot` inside it; tests.infra.hosts.reboot_host
boots the same tree again, as a hypervisor would), so it converges site.yml first only when
the engines are not there yet (run alone), and leaves them running again.
"""

from __future__ import annotations

import time

import pytest

from stack import declaration
from tests.infra import hosts as testhosts
from tests.infra.test_site_converge import cpu_mode_vars, playbook

pytestmark = pytest.mark.infra

MODELS = declaration.load()
UNITS = [f"vllm@{m.name}.service" for m in MODELS]
# each engine may take up to the unit's start timeout; CPU engines here take about a minute
START_BUDGET_S = 300.0 * len(MODELS)


def _all_active(h) -> bool:
    # `systemctl is-active a b c` succeeds when any one is active: ask each unit's state
    out = h.ssh("systemctl show -p ActiveState --value " + " ".join(UNITS), timeout=30)
    return out.stdout.split() == ["active"] * len(UNITS)


@pytest.fixture(scope="module")
def engines(test_hosts, tmp_path_factory):
    h = test_hosts[0]
    if not _all_active(h):
        tmp = tmp_path_factory.mktemp("reboot")
        inventory = tmp / "inventory.yml"
        testhosts.ansible_inventory(test_hosts, inventory,
                                    groups={"gpu_hosts": ["gpu1"], "monitoring": ["gpu1"]})
        run = playbook(inventory, cpu_mode_vars(tmp / "cpu-mode.yml"))
        (tmp / "converge.log").write_text(run.stdout + run.stderr)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert _all_active(h)
    return h


def _boot_id(h) -> str:
    return h.ssh("cat /proc/sys/kernel/random/boot_id", check=True, timeout=15).stdout.strip()


def _times(h, unit: str) -> dict[str, int]:
    props = ["ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "NRestarts"]
    out = h.ssh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props), check=True)
    values = dict(line.split("=", 1) for line in out.stdout.split())
    return {k: int(v or 0) for k, v in values.items()}


def test_engines_come_back_one_after_another_after_a_reboot(engines):
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
