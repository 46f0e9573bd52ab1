"""The gateway role's drain.yml and rejoin.yml, run by ansible-playbook against a real gateway
process: their polls of /ready (notice over, nothing in flight, models up, 200) must agree with
what the gateway answers. `systemctl kill` is a stand-in on PATH that signals the test's
gateway by its PID; nothing here touches systemd."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import yaml

from tests.conftest import models_config
from tests.support.gateway import start_gateway
from tests.support.procs import ROOT

_FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl kill --signal=SIGUSRn --kill-who=main gateway.service -> kill -s USRn <pid>
echo "$@" >> "{calls}"
for a in "$@"; do
  case "$a" in --signal=SIG*) sig="${{a#--signal=SIG}}" ;; esac
done
[ "$1" = kill ] && [ -n "$sig" ] && exec kill -s "$sig" {pid}
exit 1
"""


def _play(tmp_path: Path, gw, tasks_from: str, **extra) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(_FAKE_SYSTEMCTL.format(calls=tmp_path / "systemctl-calls",
                                                pid=gw.proc.pid))
    systemctl.chmod(0o755)
    play = [{
        "name": f"gateway {tasks_from}", "hosts": "localhost", "connection": "local",
        "gather_facts": False,
        "environment": {"PATH": f"{bin_dir}:{os.environ['PATH']}"},
        "vars": {"gateway_port": int(gw.url.rsplit(":", 1)[1]), **extra},
        "tasks": [{"name": "tasks", "ansible.builtin.include_role": {
            "name": "gateway", "tasks_from": tasks_from}}],
    }]
    path = tmp_path / f"play-{tasks_from}"
    path.write_text(yaml.safe_dump(play))
    return subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", str(path)],
        cwd=ROOT / "ansible", capture_output=True, text=True, timeout=180,
        env={**os.environ, "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
             "ANSIBLE_ROLES_PATH": str(ROOT / "ansible" / "roles")})


def _stream(gw, tokens: int, delay: float, events: list[str]) -> threading.Thread:
    started = threading.Event()

    def run():
        body = {"model": "text2sql", "prompt": f"[[delay={delay}]]", "max_tokens": tokens,
                "stream": True}
        try:
            with httpx.stream("POST", gw.url + "/v1/completions", json=body,
                              headers=gw.auth("k"), timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        started.set()
        except httpx.HTTPError:
            pass  # cut when the test stops the gateway: `events` says how far it got

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(10)
    return t


def test_drain_waits_for_the_stream_then_rejoin_makes_the_host_ready(backends, tmp_path):
    gw = start_gateway(tmp_path, {"models": models_config(backends), "drain_notice_s": 1,
                                  "drain_timeout_s": 20}, {"k": []})
    try:
        events: list[str] = []
        # 15 s: still running when the notice is over, whatever the playbook's own pace
        stream = _stream(gw, 50, 0.3, events)
        out = _play(tmp_path, gw, "drain.yml", gateway_drain_notice_s=1,
                    gateway_drain_timeout_s=20)
        assert out.returncode == 0, out.stdout[-3000:]
        # drain.yml returned only once the stream had ended, whole
        assert events[-1] == "data: [DONE]" and len(events) == 51
        body = httpx.get(gw.url + "/ready").json()
        assert body["status"] == "draining" and not body["accepting"] and body["in_flight"] == 0
        stream.join(10)
        out = _play(tmp_path, gw, "rejoin.yml")
        assert out.returncode == 0, out.stdout[-3000:]
        assert httpx.get(gw.url + "/ready").status_code == 200
        calls = (tmp_path / "systemctl-calls").read_text().splitlines()
        assert calls == ["kill --signal=SIGUSR1 --kill-who=main gateway.service",
                         "kill --signal=SIGUSR2 --kill-who=main gateway.service"]
    finally:
        gw.stop()


def test_drain_fails_clearly_when_requests_outlast_the_deadline(backends, tmp_path):
    gw = start_gateway(tmp_path, {"models": models_config(backends), "drain_notice_s": 0,
                                  "drain_timeout_s": 60}, {"k": []})
    try:
        events: list[str] = []
        stream = _stream(gw, 40, 1, events)  # 40 s, longer than the deadline below (0 + 15 s)
        out = _play(tmp_path, gw, "drain.yml", gateway_drain_notice_s=0,
                    gateway_drain_timeout_s=0)
        assert out.returncode != 0
        assert "requests still in flight 15 s after the notice: 1" in out.stdout
        assert "nothing was restarted" in out.stdout
        gw.proc.signal(signal.SIGUSR2)  # the playbook's rescue does this (resume.yml)
    finally:
        gw.stop()
        stream.join(30)
