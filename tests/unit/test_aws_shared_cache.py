"""Several hosts from Terraform's outputs to the roles' variables: the shared rate-limit cache
becomes the gateways' rediss:// URL and the NAME of the SSM parameter holding its AUTH token
(never the token), the gateway unit may reach the cache's subnets, and nginx behind the load
balancer trusts X-Forwarded-For from the VPC's range, all written by `make inventory`, read
back by Ansible, rendered into the gateway's config and accepted by the app. Without Terraform
state the same is found in AWS (moto)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.config import load_config
from stack import aws_ops
from tests.unit.test_aws_ops import (  # noqa: F401
    REGION,
    TF_OUTPUTS,
    _terraform_says,
    aws,
    make_hosts,
    paths,
    use_session,
)
from tests.unit.test_gateway_unit import gateway_vars, render, unit
from tests.unit.test_role_templates import ROLES, ROOT

ENDPOINT = "master.llm-limits.abc123.use1.cache.amazonaws.com"
PARAMETER = "/llm/gateway/redis-auth-token"
CACHE_SUBNETS = ["10.42.2.0/24", "10.42.3.0/24"]
HOST = TF_OUTPUTS["hosts"]["value"][0]
# two hosts as Terraform outputs them: a load balancer in front, the shared cache behind
SEVERAL = {
    **TF_OUTPUTS,
    "api_endpoint": {"value": "https://api.example.com"}, "api_tls_trusted": {"value": True},
    "api_tls": {"value": "acm"},
    "hosts": {"value": [HOST, {**HOST, "name": "llm-gpu-1", "instance_id": "i-0123456789abcdef1",
                               "availability_zone": "us-east-1b", "private_ip": "10.42.1.10"}]},
    "cache_endpoint": {"value": ENDPOINT}, "cache_port": {"value": 6379},
    "cache_auth_token_ssm_parameter": {"value": PARAMETER},
    "cache_subnet_cidrs": {"value": CACHE_SUBNETS},
}


def options(role: str) -> dict:
    return yaml.safe_load((ROLES / role / "meta/argument_specs.yml").read_text())[
        "argument_specs"]["main"]["options"]


def group_vars(paths) -> dict:  # noqa: F811
    return yaml.safe_load(paths.out.read_text())["all"]["children"]["gpu_hosts"]["vars"]


# ---- from Terraform's outputs ------------------------------------------------------------------


def test_several_hosts_share_the_cache_through_the_gateways_variables(paths):  # noqa: F811
    _terraform_says(paths, SEVERAL)
    assert paths.run("inventory") == 0

    gv = group_vars(paths)
    assert gv["gateway_redis_url"] == f"rediss://{ENDPOINT}:6379"
    assert gv["gateway_redis_auth_ssm_parameter"] == PARAMETER
    assert gv["gateway_ip_allow"] == CACHE_SUBNETS
    # the role's own variables where it has them (the token's parameter is read by the
    # gateway's side of issue 17)
    assert {"gateway_redis_url", "gateway_ip_allow"} <= set(options("gateway"))


def test_behind_the_load_balancer_nginx_trusts_the_vpc_range_from_terraform(paths):  # noqa: F811
    _terraform_says(paths, {**SEVERAL, "vpc_cidr": {"value": "10.7.0.0/20"}})
    assert paths.run("inventory") == 0

    gv = group_vars(paths)
    assert {"nginx_behind_load_balancer", "nginx_load_balancer_cidrs"} <= set(options("nginx"))
    assert gv["nginx_behind_load_balancer"] is True
    # one source: the range is Terraform's output, not a guess of ours
    assert gv["nginx_load_balancer_cidrs"] == ["10.7.0.0/20"]
    assert gv["aws_vpc_cidr"] == "10.7.0.0/20"


def test_one_host_keeps_counting_in_process_and_faces_clients_directly(paths):  # noqa: F811
    _terraform_says(paths, TF_OUTPUTS)
    assert paths.run("inventory") == 0

    gv = group_vars(paths)
    # absent, so the roles' defaults apply: counters in the gateway, no forwarded header
    assert not {k for k in gv if k.startswith(("gateway_", "nginx_behind", "nginx_load"))}
    assert gv["aws_vpc_cidr"] == "10.42.0.0/16"


def test_outputs_without_a_vpc_range_leave_nginx_as_it_was_and_say_so(paths, capsys):  # noqa: F811
    _terraform_says(paths, {k: v for k, v in SEVERAL.items() if k != "vpc_cidr"})
    assert paths.run("inventory") == 0

    assert "nginx_behind_load_balancer" not in group_vars(paths)
    assert "run `make deploy` to refresh the outputs" in capsys.readouterr().out


def test_the_inventory_holds_no_secret_of_the_cache(paths):  # noqa: F811
    _terraform_says(paths, SEVERAL)
    assert paths.run("inventory") == 0

    text = paths.out.read_text()
    assert "auth_token" not in text.replace("gateway_redis_auth_ssm_parameter", "")
    # a URL with a password would read rediss://user:secret@host
    assert "@" not in group_vars(paths)["gateway_redis_url"]


def test_ansible_sees_the_cache_and_the_load_balancer_on_every_host(paths):  # noqa: F811
    ansible_inventory = Path(sys.executable).parent / "ansible-inventory"
    if not ansible_inventory.exists():
        pytest.fail("ansible-inventory is missing from the venv: run `make deps`")
    _terraform_says(paths, SEVERAL)
    assert paths.run("inventory") == 0
    proc = subprocess.run([str(ansible_inventory), "-i", str(paths.out), "--list"],
                          capture_output=True, text=True,
                          env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    hostvars = json.loads(proc.stdout)["_meta"]["hostvars"]
    assert set(hostvars) == {"llm-gpu-0", "llm-gpu-1"}
    for host in hostvars.values():
        assert host["gateway_redis_url"] == f"rediss://{ENDPOINT}:6379"
        assert host["gateway_redis_auth_ssm_parameter"] == PARAMETER
        assert host["nginx_load_balancer_cidrs"] == ["10.42.0.0/16"]


def test_the_gateway_config_gets_the_shared_cache_and_the_app_accepts_it(paths, tmp_path):  # noqa: F811
    _terraform_says(paths, SEVERAL)
    assert paths.run("inventory") == 0
    gv = group_vars(paths)
    values = gateway_vars(**{k: v for k, v in gv.items() if k.startswith("gateway_")})

    cfg = tmp_path / "gateway.yml"
    cfg.write_text(render(ROLES / "gateway/templates/gateway.yml.j2", values))
    assert yaml.safe_load(cfg.read_text())["rate_limit"]["redis_url"] == (
        f"rediss://{ENDPOINT}:6379")
    assert load_config(cfg).rate_limit.redis_url == f"rediss://{ENDPOINT}:6379"
    # the password: a file the role saves from SSM before the gateway starts (the gateway's
    # sandbox cannot reach SSM), never the parameter itself in the gateway's config
    rl = load_config(cfg).rate_limit
    assert rl.redis_password_file == Path("/etc/llm-gateway/redis-password")
    assert rl.redis_password_ssm_parameter is None
    tasks = yaml.safe_load((ROLES / "gateway/tasks/main.yml").read_text())
    names = [t["name"] for t in tasks]
    save = tasks[names.index("The shared cache's password, from SSM with the instance role")]
    assert save["ansible.builtin.command"]["argv"][3:6] == [
        "save-ssm-password", "{{ gateway_redis_auth_ssm_parameter }}",
        "{{ gateway_redis_password_file }}"]
    assert names.index(save["name"]) < names.index("Gateway enabled and running")
    # and its unit may reach the cache's subnets, besides loopback
    allowed = unit(gateway_ip_allow=gv["gateway_ip_allow"])["IPAddressAllow"].split()
    assert allowed == ["localhost", *CACHE_SUBNETS]


# ---- without Terraform state: found in AWS -----------------------------------------------------


def _cache_in(session, subnet_cidrs: list[str]) -> str:
    """The replication group terraform/modules/cache makes, under the name it gives it."""
    ec2 = session.client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "cidr", "Values": ["10.42.0.0/16"]}])["Vpcs"][0]
    subnets = [ec2.create_subnet(VpcId=vpc["VpcId"], CidrBlock=c,
                                 AvailabilityZone=f"{REGION}{z}")["Subnet"]["SubnetId"]
               for c, z in zip(subnet_cidrs, "ab", strict=False)]
    elasticache = session.client("elasticache")
    elasticache.create_cache_subnet_group(CacheSubnetGroupName="llm-cache", SubnetIds=subnets,
                                          CacheSubnetGroupDescription="private subnets")
    group = elasticache.create_replication_group(
        ReplicationGroupId="llm-limits", ReplicationGroupDescription="rate limits",
        Engine="valkey", CacheNodeType="cache.t4g.micro", NumCacheClusters=1, Port=6379,
        CacheSubnetGroupName="llm-cache", TransitEncryptionEnabled=True, AuthToken="t" * 64,
    )["ReplicationGroup"]
    return group["NodeGroups"][0]["PrimaryEndpoint"]["Address"]


def test_without_state_the_cache_and_the_vpc_are_found_in_aws(paths, aws, monkeypatch):  # noqa: F811
    paths.tool("terraform", "echo '{}'\n")
    make_hosts(aws, count=2)
    endpoint = _cache_in(aws, CACHE_SUBNETS)
    use_session(monkeypatch, aws)

    assert paths.run("inventory") == 0

    gv = group_vars(paths)
    assert re.fullmatch(r"[\w.-]+", endpoint)
    assert gv["gateway_redis_url"] == f"rediss://{endpoint}:6379"
    assert gv["gateway_redis_auth_ssm_parameter"] == PARAMETER
    assert gv["gateway_ip_allow"] == CACHE_SUBNETS
    assert gv["nginx_behind_load_balancer"] is True
    assert gv["nginx_load_balancer_cidrs"] == ["10.42.0.0/16"]


def test_without_state_and_without_a_cache_the_gateways_count_alone(paths, aws, monkeypatch):  # noqa: F811
    paths.tool("terraform", "echo '{}'\n")
    make_hosts(aws, count=1)
    use_session(monkeypatch, aws)

    assert paths.run("inventory") == 0

    assert not {k for k in group_vars(paths) if k.startswith("gateway_")}


def test_the_names_searched_for_are_the_ones_terraform_gives():
    tf = (ROOT / "terraform/modules/cache/main.tf").read_text()
    group_id = re.search(r'replication_group_id\s*=\s*"([^"]+)"', tf).group(1)
    parameter = re.search(r'resource "aws_ssm_parameter" "auth_token" \{.*?\bname\s*=\s*"([^"]+)"',
                          tf, re.S).group(1)
    subnet_group = re.search(
        r'resource "aws_elasticache_subnet_group" "this" \{.*?\bname\s*=\s*"([^"]+)"',
        tf, re.S).group(1)
    assert group_id.replace("${var.name}", "{name}") == aws_ops.CACHE_GROUP_ID
    assert subnet_group.replace("${var.name}", "{name}") == aws_ops.CACHE_SUBNET_GROUP
    assert parameter.replace("${var.name}", "{name}") == aws_ops.CACHE_TOKEN_PARAMETER
