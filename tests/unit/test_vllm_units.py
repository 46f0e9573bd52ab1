"""The vLLM units as the vllm role renders them: the instances start one after another, each
after the previous one's /health, in the order of the model declaration, and only once the
models volume is mounted.

Rendered with Jinja2 the way Ansible's template module renders (stack.render), from the role's
defaults and vars and the real declaration; the per-instance start-order variable is the very
expression of the role's task. `systemd-analyze verify` (systemd on this machine) then loads the
rendered units: unknown directives, bad values and ordering cycles fail it. The health wait is
run for real against an HTTP server that refuses, then answers 503, then 200, as vLLM does
while it loads.
"""

from __future__ import annotations

import http.server
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jinja2
import pytest
import yaml

from stack.render import parse_env_file, parse_unit_file, render, resolve, role_defaults

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "ansible" / "roles" / "vllm"
WAIT_HEALTH = ROOT / "systemd" / "vllm-wait-health.py"
MODELS = yaml.safe_load((ROOT / "ansible/group_vars/all/models.yml").read_text())["llm_models"]


def role_vars(**overrides) -> dict:
    values = role_defaults("vllm")
    values.update(yaml.safe_load((ROLE / "vars" / "main.yml").read_text()))
    values.update(overrides)
    return resolve(values)


def order_task() -> dict:
    tasks = yaml.safe_load((ROLE / "tasks" / "order.yml").read_text())
    (task,) = [t for t in tasks if "vllm-order.conf.j2" in str(t.get("ansible.builtin.template"))]
    return task


def rendered_dropins(models: list[dict], **overrides) -> dict[str, str]:
    """{model name: drop-in text}, with vllm_previous evaluated from the role task's own
    expression for each loop index, as Ansible's loop would."""
    task = order_task()
    expr = task["vars"]["vllm_previous"]
    assert task["loop_control"]["index_var"] == "vllm_index"
    previous_of = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(expr)
    out = {}
    for i, model in enumerate(models):
        ctx = {"llm_models": models, "vllm_index": i, "vllm_instance": model}
        previous = previous_of.render(ctx)
        out[model["name"]] = render("systemd/vllm-order.conf.j2",
                                    {**role_vars(**overrides), **ctx, "vllm_previous": previous})
    return out


def rendered_unit(**overrides) -> str:
    return render("systemd/vllm@.service.j2", role_vars(**overrides))


# --- the start order -----------------------------------------------------------------------------


def test_each_instance_starts_after_the_one_declared_before_it():
    dropins = rendered_dropins(MODELS)
    names = [m["name"] for m in MODELS]
    assert len(names) >= 2, "the declaration should have several models to order"
    assert list(dropins) == names
    first = parse_unit_file(dropins[names[0]])
    assert ("Unit", "After") not in first, "the first instance waits for no other"
    for prev, name in zip(names, names[1:], strict=False):
        assert parse_unit_file(dropins[name])[("Unit", "After")] == [f"vllm@{prev}.service"]
    # ordering only: a failed instance must not keep the later ones from starting
    for text in dropins.values():
        assert not {("Unit", k) for k in ("Requires", "BindsTo", "Requisite")} & set(
            parse_unit_file(text))


def test_the_order_follows_a_changed_declaration():
    reordered = [MODELS[2], MODELS[0], MODELS[1]]
    dropins = rendered_dropins(reordered)
    assert ("Unit", "After") not in parse_unit_file(dropins[MODELS[2]["name"]])
    assert parse_unit_file(dropins[MODELS[0]["name"]])[("Unit", "After")] == [
        f"vllm@{MODELS[2]['name']}.service"]
    assert parse_unit_file(dropins[MODELS[1]["name"]])[("Unit", "After")] == [
        f"vllm@{MODELS[0]['name']}.service"]


@pytest.mark.parametrize("gpu", [True, False])
def test_an_instance_is_active_only_once_healthy_within_the_start_timeout(gpu):
    unit = parse_unit_file(rendered_unit(vllm_gpu_enabled=gpu))
    (post,) = unit[("Service", "ExecStartPost")]
    argv = post.split()
    assert argv[:2] == ["/usr/bin/python3", role_vars()["vllm_wait_health"]]
    timeout = int(argv[argv.index("--timeout") + 1])
    assert timeout == int(unit[("Service", "TimeoutStartSec")][0])
    # the service type under which ExecStartPost runs after the engine process started
    assert unit[("Service", "Type")] == ["exec"]


def test_the_models_volume_is_mounted_before_an_engine_starts():
    unit = parse_unit_file(rendered_unit(vllm_models_dir="/srv/models"))
    assert unit[("Unit", "RequiresMountsFor")] == ["/srv/models"]
    models_defaults = yaml.safe_load(
        (ROOT / "ansible/roles/models/defaults/main.yml").read_text())
    assert role_vars()["vllm_models_dir"] == models_defaults["models_dir"]


def test_the_role_installs_the_helper_where_the_unit_runs_it():
    tasks = yaml.safe_load((ROLE / "tasks" / "order.yml").read_text())
    copy = next(t["ansible.builtin.copy"] for t in tasks if "ansible.builtin.copy" in t)
    assert copy["src"].endswith("/systemd/vllm-wait-health.py")
    assert copy["dest"] == "{{ vllm_wait_health }}" and copy["mode"] == "0755"
    configure = (ROLE / "tasks" / "configure.yml").read_text()
    assert "order.yml" in configure


# --- systemd reads them --------------------------------------------------------------------------


def _write_tree(tmp_path: Path, dropins: dict[str, str]) -> Path:
    """The unit and its drop-ins as the role lays them out; an executable at vllm_venv."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    units = tmp_path / "system"
    units.mkdir()
    (units / "vllm@.service").write_text(rendered_unit(vllm_venv=str(venv)))
    for name, text in dropins.items():
        d = units / f"vllm@{name}.service.d"
        d.mkdir()
        (d / role_vars()["vllm_order_dropin"]).write_text(text)
    return units


def _verify(units: Path, names: list[str]) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("/usr/bin/python3 (the helper's interpreter on the hosts) is not here")
    return subprocess.run(
        [exe, "verify", *[f"vllm@{n}.service" for n in names]],
        capture_output=True, text=True, timeout=60,
        # our folder first, then systemd's own (the trailing colon)
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:", "SYSTEMD_LOG_LEVEL": "notice"},
    )


def test_systemd_accepts_the_rendered_units_and_their_order(tmp_path):
    names = [m["name"] for m in MODELS]
    proc = _verify(_write_tree(tmp_path, rendered_dropins(MODELS)), names)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert not re.search(r"Unknown (key|section)|cycle|Failed to parse", output, re.I), output


def test_systemd_analyze_would_catch_an_order_that_loops(tmp_path):
    # the check above is not blind: an order that loops fails it
    dropins = rendered_dropins(MODELS)
    first, last = MODELS[0]["name"], MODELS[-1]["name"]
    dropins[first] += f"[Unit]\nAfter=vllm@{last}.service\n"
    proc = _verify(_write_tree(tmp_path, dropins), [m["name"] for m in MODELS])
    assert re.search(r"cycle", proc.stdout + proc.stderr, re.I), proc.stdout + proc.stderr


# --- the health wait, for real -------------------------------------------------------------------


class LoadingVllm:
    """An HTTP server whose /health behaves like vLLM's while loading: no listener at first
    (connection refused), then 503, then 200."""

    def __init__(self, port: int, refuse_s: float, unhealthy_s: float) -> None:
        self.port, self.refuse_s, self.unhealthy_s = port, refuse_s, unhealthy_s
        self.started = time.monotonic()
        self.server: http.server.HTTPServer | None = None
        self.probes: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        time.sleep(self.refuse_s)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                ready = time.monotonic() - owner.started >= owner.refuse_s + owner.unhealthy_s
                code = 200 if ready and self.path == "/health" else 503
                owner.probes.append(code)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", self.port), Handler)
        self.server.serve_forever(poll_interval=0.05)

    def close(self) -> None:
        deadline = time.monotonic() + 5
        while self.server is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_wait(port: int, *args: str, vllm_args: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin",
           "VLLM_ARGS": vllm_args if vllm_args is not None else
           f"--host 127.0.0.1 --port {port} --model /srv/models/x --served-model-name x"}
    return subprocess.run([sys.executable, str(WAIT_HEALTH), "--interval", "0.2", *args],
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_wait_ends_when_health_answers_200_not_before():
    port = free_port()
    server = LoadingVllm(port, refuse_s=1.0, unhealthy_s=1.0)
    try:
        began = time.monotonic()
        proc = run_wait(port, "--timeout", "30")
        waited = time.monotonic() - began
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert waited >= 2.0  # it did not pass while refused or 503
    assert 503 in server.probes and server.probes[-1] == 200
    assert f"http://127.0.0.1:{port}/health answered 200" in proc.stdout


def test_the_wait_is_bounded():
    port = free_port()  # nothing listens: an engine that never comes up
    began = time.monotonic()
    proc = run_wait(port, "--timeout", "1.5")
    assert proc.returncode == 1
    assert time.monotonic() - began < 15
    assert f"http://127.0.0.1:{port}/health did not answer 200 within" in proc.stderr


def test_the_port_comes_from_the_instances_own_flags():
    port = free_port()
    server = LoadingVllm(port, refuse_s=0, unhealthy_s=0)
    try:
        # --port=N form, a wildcard host, and the other flags around it
        proc = run_wait(0, "--timeout", "10",
                        vllm_args=f"--model /m --host 0.0.0.0 --port={port} --max-num-seqs 8")
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr


def test_no_port_is_a_clear_error():
    proc = run_wait(0, "--timeout", "1", vllm_args="--model /m")
    assert proc.returncode == 2 and "no --port" in proc.stderr


def test_the_env_file_gives_the_helper_the_port_of_each_instance():
    spec = importlib.util.spec_from_file_location("vllm_wait_health", WAIT_HEALTH)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    for model in MODELS:
        env = parse_env_file(render("systemd/vllm.env.j2", {
            **role_vars(vllm_gpu_enabled=False), "vllm_instance": model,
            "vllm_model_path": f"/srv/models/{model['name']}",
            "vllm_gpu_memory_utilization": None}))
        assert helper.address(env["VLLM_ARGS"]) == ("127.0.0.1", model["port"])
