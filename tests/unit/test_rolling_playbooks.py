"""The rolling playbooks take one host at a time out of the pool: drain, wait until idle,
restart, models up, resume, /ready 200; a failure resumes the host and stops the play."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stack.render import ROLES
from tests.support.ansible_eval import role_value

PLAYBOOKS = ROLES.parent / "playbooks"


def _step(task: dict) -> str:
    """What a task does, in the words of this test."""
    role = task.get("ansible.builtin.include_role")
    if role:
        return f"{role['name']}:{role.get('tasks_from', 'main.yml')}"
    if "ansible.builtin.systemd_service" in task:
        unit = task["ansible.builtin.systemd_service"]
        return f"{unit['state']}:{unit['name']}"
    return next(k for k in task if k.startswith("ansible.builtin.")).rsplit(".", 1)[1]


@pytest.mark.parametrize(("playbook", "restarts"), [
    ("rolling_restart.yml", ["vllm:restart_all.yml", "restarted:gateway.service"]),
    ("model_update.yml", ["vllm:main.yml", "gateway:main.yml"]),
])
def test_each_host_is_drained_idle_restarted_ready_and_resumed_before_the_next(playbook,
                                                                               restarts):
    [play] = yaml.safe_load((PLAYBOOKS / playbook).read_text())
    assert play["serial"] == 1 and play["max_fail_percentage"] == 0
    [host] = play["tasks"]
    steps = [_step(t) for t in host["block"]]
    if playbook == "model_update.yml":  # new weights are fetched while the host still serves
        assert steps.pop(0) == "models:main.yml"
    assert steps == ["gateway:drain.yml", *restarts, "gateway:rejoin.yml"]
    # a failure anywhere in the block: the host resumes, and the play stops there
    assert [_step(t) for t in host["rescue"]] == ["gateway:resume.yml", "fail"]


def _tasks(name: str) -> list[dict]:
    return yaml.safe_load((ROLES / "gateway" / "tasks" / name).read_text())


def test_drain_signals_then_waits_for_the_notice_then_for_zero_in_flight():
    tasks = _tasks("drain.yml")
    signal = next(i for i, t in enumerate(tasks) if "SIGUSR1" in str(t))
    notice = next(i for i, t in enumerate(tasks) if "accepting" in str(t.get("until")))
    idle = next(i for i, t in enumerate(tasks) if "in_flight" in str(t.get("until")))
    check = next(i for i, t in enumerate(tasks) if "ansible.builtin.assert" in t)
    assert signal < notice < idle < check


def test_rejoin_resumes_only_once_the_models_are_up_then_waits_for_ready():
    steps = [(_step(t), str(t.get("until", ""))) for t in _tasks("rejoin.yml")]
    assert [s for s, _ in steps] == ["uri", "include_tasks", "uri"]
    assert "down" in steps[0][1] and "status == 200" in steps[2][1]
    assert "SIGUSR2" in str(_tasks("resume.yml"))


def test_every_operations_playbook_sees_the_site_wide_variables(tmp_path):
    """Ansible reads group_vars/ next to the inventory and next to the playbook: a playbook in
    playbooks/ reaches ansible/group_vars (the model declaration, the site's ports) only
    through the link there. Without it `llm_models` is undefined mid-roll."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-inventory"), "-i", "somehost,",
         "--playbook-dir", str(PLAYBOOKS), "--host", "somehost"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert [m["name"] for m in seen["llm_models"]], seen.keys()
    assert "nginx_metrics_port" in seen


def _restarted_by_handler(**registered) -> list[str]:
    handler = next(h for h in yaml.safe_load((ROLES / "vllm/handlers/main.yml").read_text())
                   if h["name"] == "Restart vLLM instances")
    models = yaml.safe_load((ROLES.parent / "group_vars/all/models.yml").read_text())
    return role_value("vllm", handler["vars"]["vllm_restart_only"],
                      llm_models=models["llm_models"], **registered)


def _env_files(*changed: str) -> dict:
    return {"results": [{"changed": n in changed, "vllm_instance": {"name": n}}
                        for n in ("text2sql", "sqlcoder", "embed")]}


def test_a_model_update_restarts_only_the_engines_whose_settings_changed():
    """model_update.yml promises to restart what changed: one model's new limit or revision
    restarts that engine, not every engine of the host."""
    assert _restarted_by_handler(vllm_env_files=_env_files("embed"),
                                 vllm_unit_file={"changed": False},
                                 vllm_engine_install={"changed": False}) == ["embed"]
    assert _restarted_by_handler(vllm_env_files=_env_files("sqlcoder", "embed")) == [
        "sqlcoder", "embed"]
    # the unit or vLLM itself changed: every engine runs the new one
    every = ["text2sql", "sqlcoder", "embed"]
    assert _restarted_by_handler(vllm_env_files=_env_files(),
                                 vllm_unit_file={"changed": True}) == every
    assert _restarted_by_handler(vllm_env_files=_env_files("embed"),
                                 vllm_engine_install={"changed": True}) == every


def test_a_roll_stopped_by_hand_has_a_playbook_that_resumes_every_drained_host():
    [play] = yaml.safe_load((PLAYBOOKS / "resume.yml").read_text())
    assert play["hosts"] == "gpu_hosts" and "serial" not in play
    assert [_step(t) for t in play["tasks"]] == ["gateway:resume.yml"]
    # resume.yml signals only a gateway that says it is drained
    [probe, signal] = _tasks("resume.yml")
    assert "SIGUSR2" in signal["ansible.builtin.command"]["cmd"]
    assert 'gateway_resume_probe.json.status == "draining"' in signal["when"]
