"""Two GPU hosts as one service: one budget per key, one key set, one view, and a rolling
restart that fails no request (tests/infra/fleet.py sets the scene).

site.yml converges both test hosts from the inventory `make inventory` writes for a deployment
of two hosts (a load balancer, a key store in S3, a shared cache). It runs after the simulated
`make deploy` (test_site_converge.py), so the first host only changes and the second is
converged from nothing; both then serve the same models from the same declaration.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import ssl
import subprocess
import time

import httpx
import pytest
import yaml

from stack import declaration, local
from tests.infra import fleet
from tests.infra import simulated_aws as sim

pytestmark = pytest.mark.infra

ANSIBLE = local.ROOT / "ansible"
BIN = local.ROOT / ".venv" / "bin"
MODELS = declaration.load()
GENERATE = next(m.name for m in MODELS if m.task == "generate")
EMBED = next(m.name for m in MODELS if m.task == "embed")
NAMES = ("llm-gpu-0", "llm-gpu-1")  # Terraform's names for a deployment's two hosts
# the hosts' own certificates are self-signed behind a load balancer, which does not check them
NO_VERIFY = ssl.create_default_context()
NO_VERIFY.check_hostname, NO_VERIFY.verify_mode = False, ssl.CERT_NONE


def _ansible(tmp, inventory, playbook: str, extra: dict, log: str) -> str:
    (tmp / "extra.yml").write_text(yaml.safe_dump(extra))
    out = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), playbook,
                          "-e", f"@{tmp / 'extra.yml'}"], cwd=ANSIBLE, capture_output=True,
                         text=True, timeout=3600)
    (tmp / log).write_text(out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    return out.stdout


def _move_own_keys(tmp, inventory, extra: dict, first, aws) -> dict:
    """docs/aws.md, Growing from one host to several, step 4: the first host served alone
    with keys in its own file (the simulated deploy made some); a key is added there, the
    gateway role's guard must refuse to switch that host to the still empty store, then the
    file goes into the store with `app.keys import` (what `make key-import` runs)."""
    own = "/etc/llm-gateway/keys.json"
    key = first.ssh(f"/opt/llm-gateway/venv/bin/python -m app.keys --file {own} "
                    f"create moved-{time.time_ns()}", check=True).stdout.strip()
    (tmp / "guard.yml").write_text(yaml.safe_dump([{
        "hosts": NAMES[0], "become": True, "gather_facts": False,
        "tasks": [{"ansible.builtin.include_role": {
            "name": "gateway", "tasks_from": "keys_store_guard.yml"}}]}]))
    (tmp / "extra.yml").write_text(yaml.safe_dump(extra))
    guard = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory),
                            str(tmp / "guard.yml"), "-e", f"@{tmp / 'extra.yml'}"],
                           cwd=ANSIBLE, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "ANSIBLE_CALLBACK_RESULT_FORMAT": "json"})
    copy = tmp / "own-keys.json"
    copy.write_text(first.ssh(f"cat {own}", check=True).stdout)
    imported = subprocess.run([str(BIN / "python"), "-m", "app.keys", "--store",
                               fleet.KEYS_OBJECT, "import", str(copy)],
                              capture_output=True, text=True, timeout=60, cwd=local.ROOT,
                              env={**aws.env(), "PATH": "/usr/bin:/bin"})
    assert imported.returncode == 0, imported.stderr
    copy.unlink()
    return {"key": key, "guard": guard, "imported": imported.stderr}


@pytest.fixture(scope="module")
def fleet_hosts(test_hosts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    hosts = dict(zip(NAMES, test_hosts[:2], strict=True))
    key = test_hosts[0].ssh_key
    public = (key.parent / f"{key.name}.pub").read_text()
    local.ensure_tls(tmp / "redis-tls", addresses=(fleet.BRIDGE,))
    password = secrets.token_urlsafe(24)
    aws = fleet.Aws(tmp, str(BIN / "python"))
    redis = lb = None
    try:
        redis = fleet.shared_redis(tmp / "redis", tmp / "redis-tls", password)
        for h in hosts.values():
            sim.prepare_login(h, "ubuntu", public)
            fleet.trust_ca(h, (tmp / "redis-tls" / "ca.crt").read_text())
        # what Terraform's key_store and cache modules leave in the account
        s3 = aws.client("s3")
        s3.create_bucket(Bucket=fleet.BUCKET)
        s3.put_object(Bucket=fleet.BUCKET, Key="keys.json", Body=fleet.EMPTY_KEY_SET)
        aws.client("ssm").put_parameter(Name=fleet.TOKEN_PARAMETER, Value=password,
                                        Type="SecureString")
        inventory = tmp / "hosts.yml"
        inventory.write_text(yaml.safe_dump(fleet.inventory(hosts, redis.port, key, tmp)))
        extra = {**sim.ansible_overrides(local.model_paths(MODELS)),
                 **sim.fleet_overrides(aws.endpoint)}
        moved = _move_own_keys(tmp, inventory, extra, hosts[NAMES[0]], aws)
        converge = _ansible(tmp, inventory, "site.yml", extra, "site.log")
        lb = fleet.LoadBalancer(tmp / "lb", {n: h.address for n, h in hosts.items()})
        yield {"hosts": hosts, "aws": aws, "redis": redis, "lb": lb, "tmp": tmp,
               "inventory": inventory, "extra": extra, "converge": converge, "moved": moved}
    finally:
        for part in (lb, redis, aws):
            if part:
                part.stop()


def keys_cli(f, *args: str) -> str:
    out = subprocess.run([str(BIN / "python"), "-m", "app.keys", "--store", fleet.KEYS_OBJECT,
                          *args], capture_output=True, text=True, timeout=60,
                         env={**f["aws"].env(), "PATH": "/usr/bin:/bin"}, cwd=local.ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


def _status(address: str, key: str) -> int:
    return httpx.get(f"https://{address}/v1/models", verify=NO_VERIFY, timeout=10,
                     headers={"authorization": f"Bearer {key}"}).status_code


def _wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.5)
    return result


def test_both_hosts_converge_with_the_shared_cache_and_the_key_store(fleet_hosts):
    out = fleet_hosts["converge"]
    for name in NAMES:
        line = next(x for x in out.splitlines() if re.match(rf"^{name}\s+:", x))
        assert " failed=0 " in line and " unreachable=0 " in line, line
    for h in fleet_hosts["hosts"].values():
        cfg = yaml.safe_load(h.ssh("cat /etc/llm-gateway/gateway.yml", check=True).stdout)
        assert cfg["keys_s3"]["url"] == fleet.KEYS_OBJECT
        assert cfg["rate_limit"]["redis_url"] == f"rediss://{fleet.BRIDGE}:{fleet_hosts['redis'].port}"
        # the token went from SSM to a file only root and the gateway's group can read
        mode = h.ssh("stat -c '%U:%G %a' /etc/llm-gateway/redis-password", check=True).stdout
        assert mode.split() == ["root:llm-gateway", "640"]
        for path in ("/etc/llm-gateway/gateway.yml", "/etc/systemd/system/gateway.service"):
            assert fleet_hosts["redis"].password not in h.ssh(f"cat {path}", check=True).stdout


def test_a_key_made_once_works_on_every_host_and_a_revoked_one_nowhere(fleet_hosts):
    addresses = [h.address for h in fleet_hosts["hosts"].values()]
    key = keys_cli(fleet_hosts, "create", f"fleet-{time.time_ns()}")
    _wait_for(lambda: all(_status(a, key) == 200 for a in addresses), 30,
              "both hosts accept a key written once to the key store")
    name = next(line.split()[0] for line in keys_cli(fleet_hosts, "list").splitlines()
                if line.startswith("fleet-"))
    keys_cli(fleet_hosts, "revoke", name)
    _wait_for(lambda: all(_status(a, key) == 401 for a in addresses), 30,
              "both hosts refuse the revoked key")


def test_a_single_hosts_own_keys_move_into_the_store_and_work_on_every_host(fleet_hosts):
    moved = fleet_hosts["moved"]
    guard = moved["guard"].stdout
    # before the import the switch was refused, naming the key and the way out
    assert moved["guard"].returncode != 0, guard
    assert re.search(r"working key\(s\) of /etc/llm-gateway/keys\.json on this host are not in "
                     r"the key store .*: .*moved-\d+ \(id ", guard), guard[-3000:]
    assert "make key-import FILE=keys.json" in guard
    assert "imported" in moved["imported"] and moved["key"] not in moved["imported"]
    for h in fleet_hosts["hosts"].values():
        assert _status(h.address, moved["key"]) == 200, h.name


def test_a_keys_budget_is_exact_across_both_hosts(fleet_hosts):
    """200 requests at once, half to each host, against a budget of 12 per minute: 12 pass."""
    budget = 12
    key = keys_cli(fleet_hosts, "create", f"budget-{time.time_ns()}", "--rpm", str(budget),
                   "--concurrency", "1000")
    addresses = [h.address for h in fleet_hosts["hosts"].values()]
    _wait_for(lambda: all(_status(a, key) == 200 for a in addresses), 30, "the key is known")

    async def burst() -> list[int]:
        async with httpx.AsyncClient(verify=NO_VERIFY, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as c:
            body = {"model": GENERATE, "prompt": "SELECT", "max_tokens": 1}
            rs = await asyncio.gather(*[
                c.post(f"https://{addresses[i % 2]}/v1/completions", json=body,
                       headers={"authorization": f"Bearer {key}"}) for i in range(200)])
            return [r.status_code for r in rs]

    codes = asyncio.run(burst())
    assert codes.count(200) == budget and codes.count(429) == 200 - budget, \
        {c: codes.count(c) for c in set(codes)}


def test_behind_the_load_balancer_the_hosts_see_the_client(fleet_hosts):
    lb = fleet_hosts["lb"]
    marker = f"fleet-client-{time.time_ns()}"
    assert httpx.get(f"{lb.url}/health", headers={"user-agent": marker}).status_code == 200
    logs = "".join(h.ssh(f"grep -h {marker} /var/log/nginx/*.log || true").stdout
                   for h in fleet_hosts["hosts"].values())
    [line] = logs.splitlines()
    # the load balancer connects from the bridge; the client is this machine's loopback
    assert json.loads(line)["remote"] == "127.0.0.1", line


def test_one_prometheus_sees_every_target_of_both_hosts_and_no_instance_is_down(fleet_hosts):
    """The first host's Prometheus scrapes its peer over the private address: node exporter
    directly, the gateway and every engine through the peer's allow-listed metrics listener."""
    first, peer = fleet_hosts["hosts"].values()

    def api(path: str) -> dict:
        return json.loads(first.ssh(f"curl -s http://127.0.0.1:9090/api/v1/{path}",
                                    check=True).stdout)["data"]

    def targets() -> dict[tuple[str, str, str], str]:
        return {(t["labels"]["job"], t["labels"]["host"], t["labels"].get("model", "")):
                t["health"] for t in api("targets")["activeTargets"] if "host" in t["labels"]}

    wanted = {(job, name, "") for job in ("gateway", "node") for name in NAMES} | \
             {("vllm", name, m.name) for name in NAMES for m in MODELS}
    found = _wait_for(lambda: (t := targets()) and all(t.get(w) == "up" for w in wanted) and t,
                      120, f"every target of both hosts up: {targets()}")
    assert wanted <= set(found)
    # the peer's listener answers the monitoring host alone: not this machine, not the API
    listener = f"http://{peer.address}:9180"
    assert httpx.get(f"{listener}/gateway/metrics", timeout=5).status_code == 403
    shown = first.ssh(f"curl -s -o /dev/null -w '%{{http_code}}' {listener}/v1/models").stdout
    assert shown == "404"
    # InstanceDown needs its `for:` to pass; what would feed it is already quiet
    assert not [a for a in api("alerts")["alerts"] if a["labels"]["alertname"] == "InstanceDown"]


def _started(h) -> dict[str, str]:
    units = [f"vllm@{m.name}.service" for m in MODELS] + ["gateway.service"]
    out = h.ssh("systemctl show -p ExecMainStartTimestampMonotonic --value " + " ".join(units),
                check=True).stdout.split()
    return dict(zip(units, out, strict=True))


def _roll_under_load(f, playbook: str, extra: dict, log: str) -> dict[str, set[str]]:
    """`playbook` while clients keep completions, streams and embeddings going through the
    load balancer; no request may fail, and each host must leave the pool and come back
    before the other leaves. Returns the units each host restarted."""
    lb, hosts = f["lb"], f["hosts"]
    key = keys_cli(f, "create", f"roll-{time.time_ns()}", "--rpm", "100000",
                   "--tpm", "100000000", "--concurrency", "64")
    _wait_for(lambda: all(_status(h.address, key) == 200 for h in hosts.values()), 30,
              "the key is known")
    before = {n: _started(h) for n, h in hosts.items()}
    t0 = len(lb.transitions)
    with fleet.Load(lb.url, key, GENERATE, embed=EMBED) as load:
        _wait_for(lambda: load.ok >= 10, 120, "traffic flows before the roll")
        _ansible(f["tmp"], f["inventory"], playbook, {**f["extra"], **extra}, log)
    assert not load.failures, load.failures[:10]
    assert load.ok >= 30, load.ok
    assert lb.transitions[t0:] == [(NAMES[0], False), (NAMES[0], True),
                                   (NAMES[1], False), (NAMES[1], True)], lb.transitions
    after = {n: _started(h) for n, h in hosts.items()}
    return {n: {u for u in after[n] if after[n][u] != before[n][u]} for n in hosts}


def test_a_rolling_restart_under_load_fails_no_request(fleet_hosts):
    """rolling_restart.yml of the gateways (vllm_restart_only: []): an engine restarted under
    load is the model update's test below, not yet in `make test`."""
    restarted = _roll_under_load(fleet_hosts, "playbooks/rolling_restart.yml",
                                 {"vllm_restart_only": []}, "roll.log")
    assert restarted == {n: {"gateway.service"} for n in NAMES}, restarted


def _ready(h) -> dict:
    return json.loads(h.ssh("curl -s http://127.0.0.1:8080/ready", check=True).stdout)


def test_resume_yml_brings_back_a_host_left_drained_and_leaves_the_others(fleet_hosts):
    """A roll stopped by hand (Ctrl-C runs no rescue) leaves its host drained."""
    hosts = fleet_hosts["hosts"]
    first, other = hosts[NAMES[0]], hosts[NAMES[1]]
    first.ssh("systemctl kill --signal=SIGUSR1 --kill-who=main gateway.service", check=True)
    _wait_for(lambda: _ready(first)["status"] == "draining", 30, "the host drains")
    started = _started(other)
    _ansible(fleet_hosts["tmp"], fleet_hosts["inventory"], "playbooks/resume.yml",
             fleet_hosts["extra"], "resume.log")
    for h in hosts.values():
        ready = _ready(h)
        assert (ready["status"], ready["accepting"]) == ("ready", True), (h.name, ready)
    assert _started(other) == started
    _wait_for(lambda: all(fleet_hosts["lb"].healthy.values()), 30, "the balancer takes it back")


@pytest.mark.skipif(not os.environ.get("LLM_TEST_ENGINE_ROLL"), reason=(
    "set LLM_TEST_ENGINE_ROLL=1: a CPU engine restarting beside the other host's busy engines "
    "took over 14 minutes here (every CPU engine binds its OpenMP threads to core 0)"))
def test_a_model_update_under_load_restarts_the_changed_engine_and_fails_no_request(
        fleet_hosts):
    """Last (it leaves the hosts on a changed declaration): model_update.yml with one model's
    engine setting changed restarts that engine on each host, drained, and nothing else. A
    roll that restarted the engine without draining first fails here: its requests get 503
    until the balancer sees the host's /ready fail. Not in `make test` yet (the skip reason);
    it has not passed on this machine."""
    declared = yaml.safe_load((ANSIBLE / "group_vars/all/models.yml").read_text())["llm_models"]
    changed = [{**m, "max_num_seqs": m["max_num_seqs"] // 2} if m["name"] == EMBED else m
               for m in declared]
    restarted = _roll_under_load(fleet_hosts, "playbooks/model_update.yml",
                                 {"llm_models": changed}, "model_update.log")
    assert restarted == {n: {f"vllm@{EMBED}.service"} for n in NAMES}, restarted
    seqs = next(m["max_num_seqs"] for m in changed if m["name"] == EMBED)
    for h in fleet_hosts["hosts"].values():
        env = h.ssh(f"cat /etc/vllm/{EMBED}.env", check=True).stdout
        assert f"--max-num-seqs {seqs} " in env
