"""`make smoke-gpu`: the first-real-deploy checks on one GPU host, run over SSH.

In order, stopping at the first failure (docs/aws.md, "First real deploy"):
1. driver   nvidia-smi shows the GPU the instance type carries and a driver of the pinned
            branch (nvidia_driver_branch, the nvidia_driver role's defaults);
2. dcgm     dcgm-exporter's /metrics (dcgm_exporter_listen) serves the DCGM fields the alert
            rules read, as listed in the dcgm_exporter role's own fields;
3. engine   each declared model's vllm@<name>.service is active and its /health answers 200 on
            its declared port;
4. request  one completion (one embedding for an embed model) through the gateway on the
            host's loopback (gateway_port), with the operator's key sent on ssh's stdin;
5. memory   GPU memory each engine holds (nvidia-smi --query-compute-apps) next to the
            planner's share (and, on a multi-GPU type, its GPU): information, never a failure.

Nothing here is a copy: ports, units, the branch, the fields and the shares are read from the
declaration, the roles and the planner each time. This module only builds commands and reads
their answers; stack/aws_ops.py runs them over SSH.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stack import declaration, gpu_planner

ROOT = Path(__file__).resolve().parents[1]
ROLES = ROOT / "ansible" / "roles"
GROUP_VARS = ROOT / "ansible" / "group_vars" / "all"
RULES = ROOT / "monitoring" / "rules"
DOC = "docs/aws.md, First real deploy"

DRIVER_COMMAND = "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"
MEMORY_COMMAND = ("nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits"
                  " | while IFS=', ' read -r pid mib; do"
                  " echo \"$pid $mib $(ps -o unit= -p \"$pid\")\"; done")

# (remote command, text for its stdin) -> (exit status, stdout, stderr)
Runner = Callable[[str, str], tuple[int, str, str]]


@dataclass(frozen=True)
class Expected:
    instance_type: str
    gpu: gpu_planner.Gpu
    driver_branch: str
    dcgm_port: int
    dcgm_fields: tuple[str, ...]
    gateway_port: int
    models: tuple[declaration.ModelSpec, ...]
    shares: dict[str, float] = field(default_factory=dict)
    gpus: dict[str, int] = field(default_factory=dict)  # on multi-GPU types only


@dataclass
class Result:
    check: str
    status: str  # ok, FAILED, info
    seen: str
    problem: str = ""
    next_step: str = ""


def ansible_setting(role: str, name: str):
    """A variable as the playbook sees it without host overrides: group_vars/all, else the
    role's defaults."""
    for path in sorted(GROUP_VARS.glob("*.yml")):
        found = yaml.safe_load(path.read_text()) or {}
        if name in found:
            return found[name]
    return (yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {})[name]


def alert_dcgm_fields() -> tuple[str, ...]:
    """The DCGM fields our counters file enables (dcgm_exporter role vars) that the rules in
    monitoring/rules read. DCGM_EXP_* series are the exporter's own, present only once it has
    counted something, and label-type fields are not series: neither can be asked for."""
    listed = yaml.safe_load((ROLES / "dcgm_exporter" / "vars" / "main.yml").read_text())
    fields = [f["name"] for f in listed["dcgm_exporter_fields"]
              if f["type"] != "label" and f["name"].startswith("DCGM_FI_")]
    exprs = " ".join(rule["expr"] for path in sorted(RULES.glob("*.yml"))
                     for group in yaml.safe_load(path.read_text())["groups"]
                     for rule in group["rules"])
    used = set(re.findall(r"\bDCGM_[A-Z0-9_]+\b", exprs))
    return tuple(f for f in fields if f in used)


def expected(instance_type: str) -> Expected:
    kind, count = gpu_planner.instance_gpus(instance_type)
    gpu = gpu_planner.GPUS[kind]
    models = tuple(declaration.load(declaration.DECLARATION))
    try:
        plans = gpu_planner.plan_gpus(list(models), gpu_planner.gpu_target(instance_type))
    except (gpu_planner.PlanError, declaration.DeclarationError):
        plans = []
    listen = str(ansible_setting("dcgm_exporter", "dcgm_exporter_listen"))
    return Expected(
        instance_type=instance_type, gpu=gpu,
        driver_branch=str(ansible_setting("nvidia_driver", "nvidia_driver_branch")),
        dcgm_port=int(listen.rsplit(":", 1)[1]), dcgm_fields=alert_dcgm_fields(),
        gateway_port=int(ansible_setting("gateway", "gateway_port")), models=models,
        shares={p.name: p.fraction for p in plans},
        gpus={p.name: p.gpu for p in plans} if count > 1 else {})


def unit(model: declaration.ModelSpec) -> str:
    return f"vllm@{model.name}.service"


def dcgm_command(exp: Expected) -> str:
    return f"curl -sS -f -m 10 http://127.0.0.1:{exp.dcgm_port}/metrics"


def engine_command(model: declaration.ModelSpec) -> str:
    return (f"systemctl is-active {unit(model)};"
            f" curl -s -o /dev/null -m 5 -w '%{{http_code}}' http://127.0.0.1:{model.port}/health")


def request_body(model: declaration.ModelSpec) -> tuple[str, dict]:
    if model.task == "embed":
        return "/v1/embeddings", {"model": model.name, "input": "smoke test"}
    return "/v1/completions", {"model": model.name, "prompt": "SELECT", "max_tokens": 4,
                               "temperature": 0}


def request_command(exp: Expected, model: declaration.ModelSpec) -> str:
    """curl through the gateway; the Authorization header comes from stdin (-H @-), so the key
    is on no command line, in no process list and in no shell history."""
    path, body = request_body(model)
    return (f"curl -sS -m {model.timeout_s:g} -H @- -H 'Content-Type: application/json'"
            f" --data-binary {shlex.quote(json.dumps(body, separators=(',', ':')))}"
            f" -w '\\n%{{http_code}} %{{time_total}}' http://127.0.0.1:{exp.gateway_port}{path}")


def commands(exp: Expected) -> list[str]:
    """Every remote command of a healthy run, in order."""
    return [DRIVER_COMMAND, dcgm_command(exp), *(engine_command(m) for m in exp.models),
            *(request_command(exp, m) for m in exp.models), MEMORY_COMMAND]


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no output"])[-1]


def check_driver(exp: Expected, run: Runner) -> Result:
    rc, out, err = run(DRIVER_COMMAND, "")
    nxt = ("`make ssh CMD='sudo dmesg | grep -i nvidia'` and `make logs UNIT=nvidia-persistenced`;"
           f" {DOC}, driver")
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines()]
    if rc != 0 or not rows or any(len(r) != 3 for r in rows):
        return Result("driver", "FAILED", f"nvidia-smi exit {rc}",
                      f"nvidia-smi does not answer: {_last_line(err or out)}", nxt)
    name, mib, version = rows[0]
    seen = f"{len(rows)} x {name}, {mib}, driver {version}"
    wrong = [r[0] for r in rows if exp.gpu.name not in r[0]]
    if wrong:
        return Result("driver", "FAILED", seen,
                      f"expected {exp.gpu.name} ({exp.instance_type}), nvidia-smi reports "
                      f"{', '.join(wrong)}",
                      "check instance_type in terraform/terraform.tfvars and the inventory's "
                      "aws_instance_type (`make inventory`)")
    old = [r[2] for r in rows if r[2].split(".")[0] != exp.driver_branch]
    if old:
        return Result("driver", "FAILED", seen,
                      f"driver {old[0]} is not of the pinned branch {exp.driver_branch} "
                      "(nvidia_driver_branch)",
                      "run `make deploy` again (the nvidia_driver role installs the branch and "
                      "reboots); an image that keeps its own driver needs "
                      f"nvidia_driver_keep_working: false; {DOC}, driver")
    return Result("driver", "ok", seen)


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


def check_dcgm(exp: Expected, run: Runner) -> Result:
    rc, out, err = run(dcgm_command(exp), "")
    nxt = ("`make logs UNIT=dcgm-exporter` and `make logs UNIT=nvidia-dcgm`; "
           f"{DOC}, DCGM")
    if rc != 0:
        return Result("dcgm", "FAILED", f"curl exit {rc}",
                      f"dcgm-exporter does not answer on :{exp.dcgm_port}/metrics: "
                      f"{_last_line(err)}", nxt)
    samples: dict[str, str] = {}
    for line in out.splitlines():
        if (m := _SAMPLE.match(line)) and not line.startswith("#"):
            samples.setdefault(m.group(1), m.group(2))
    missing = [f for f in exp.dcgm_fields if f not in samples]
    temp = samples.get("DCGM_FI_DEV_GPU_TEMP")
    seen = (f"{len(exp.dcgm_fields) - len(missing)}/{len(exp.dcgm_fields)} alert fields"
            + (f", GPU {float(temp):g} C" if temp else ""))
    if missing:
        return Result("dcgm", "FAILED", seen,
                      f"dcgm-exporter's /metrics lacks {', '.join(missing)}",
                      "the counters file (dcgm_exporter_counters_file) must list it: "
                      "run `make deploy` again; " + nxt)
    return Result("dcgm", "ok", seen)


def check_engine(model: declaration.ModelSpec, run: Runner) -> Result:
    _, out, _ = run(engine_command(model), "")
    lines = out.strip().splitlines()
    state = lines[0].strip() if lines else "unknown"
    code = lines[-1].strip() if len(lines) > 1 else "-"
    seen = f"{unit(model)} {state}, /health {code} on :{model.port}"
    nxt = (f"`make logs UNIT=vllm@{model.name}`; {DOC}, engines (a model still loading shows "
           "activating: wait and run again)")
    if state != "active":
        return Result(f"engine {model.name}", "FAILED", seen, f"{unit(model)} is {state}", nxt)
    if code != "200":
        return Result(f"engine {model.name}", "FAILED", seen,
                      f"/health on :{model.port} answered {code}, not 200", nxt)
    return Result(f"engine {model.name}", "ok", seen)


def check_request(exp: Expected, model: declaration.ModelSpec, key: str, run: Runner) -> Result:
    kind = "embedding" if model.task == "embed" else "completion"
    name = f"{kind} {model.name}"
    rc, out, err = run(request_command(exp, model), f"Authorization: Bearer {key}\n")
    body, _, tail = out.rpartition("\n")
    code, _, took = tail.partition(" ")
    nxt = (f"`make logs UNIT=gateway`, then `make logs UNIT=vllm@{model.name}`; {DOC}, "
           "request")
    if rc != 0 or code != "200":
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = _last_line(err or body or "no answer")
        message = message.replace(key, "***")  # whatever it says, never the key
        if code in ("401", "403"):
            nxt = ("the gateway refused LLM_API_KEY: use a key of this deployment that may use "
                   f"{model.name} (`make summary` shows how to create one)")
        return Result(name, "FAILED", f"HTTP {code or '-'}",
                      f"POST {request_body(model)[0]} for {model.name} failed: {message}", nxt)
    try:
        answer = json.loads(body)
        if model.task == "embed":
            figure = f"{len(answer['data'][0]['embedding'])} dimensions"
        else:
            figure = f"{answer['usage']['completion_tokens']} tokens"
    except (ValueError, KeyError, IndexError, TypeError):
        return Result(name, "FAILED", "HTTP 200",
                      f"{request_body(model)[0]} for {model.name} answered 200 without a "
                      f"{kind}", nxt)
    return Result(name, "ok", f"HTTP 200, {figure}, {float(took or 0):.2f} s")


def check_memory(exp: Expected, run: Runner) -> Result:
    rc, out, _ = run(MEMORY_COMMAND, "")
    used: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1].isdigit():
            used[parts[2]] = used.get(parts[2], 0) + int(parts[1])
    if rc != 0 or not used:
        return Result("gpu memory", "info", "no compute processes seen")
    figures = []
    for m in exp.models:
        share = exp.shares.get(m.name)
        planned = " MiB"
        if share:
            on = f" of GPU {exp.gpus[m.name]}" if m.name in exp.gpus else ""
            planned = f"/{share * exp.gpu.mib:.0f} MiB (share {share:.3f}{on})"
        figures.append(f"{m.name} {used.pop(unit(m), 0)}{planned}")
    figures += [f"{u or 'other'} {mib} MiB" for u, mib in used.items()]
    return Result("gpu memory", "info", "; ".join(figures))


def run_checks(exp: Expected, key: str, run: Runner) -> list[Result]:
    """The checks in order; the list ends at the first failure."""
    steps: list[Callable[[], Result]] = [
        lambda: check_driver(exp, run), lambda: check_dcgm(exp, run),
        *(lambda m=m: check_engine(m, run) for m in exp.models),
        *(lambda m=m: check_request(exp, m, key, run) for m in exp.models),
        lambda: check_memory(exp, run)]
    results = []
    for step in steps:
        results.append(step())
        if results[-1].status == "FAILED":
            break
    return results


def table(host: str, results: list[Result]) -> str:
    width = max(len(r.check) for r in results)
    lines = [f"== {host}"]
    lines += [f"  {r.check:<{width}}  {r.status:<6}  {r.seen}" for r in results]
    for r in results:
        if r.status == "FAILED":
            lines.append(f"  FAILED {r.check}: {r.problem}")
            lines.append(f"  next: {r.next_step}")
    return "\n".join(lines)
