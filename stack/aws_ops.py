"""Operate the AWS deployment: what `make deploy`, `make status`, `make stop` ... call.

    python -m stack.aws_ops preflight [--count N] [--instance-type T] [--ansible-playbook P]
    python -m stack.aws_ops terraform init|plan|apply|destroy [terraform arguments]
    python -m stack.aws_ops inventory [--source auto|terraform|ec2]
    python -m stack.aws_ops wait-ssh [--timeout S]
    python -m stack.aws_ops status | stop | start
    python -m stack.aws_ops ssh [--host HOST] [-- COMMAND] | logs UNIT [--host HOST]
    python -m stack.aws_ops endpoint [--tls] | summary
    python -m stack.aws_ops key-store       (the app.keys arguments of the deployment's key set)
    python -m stack.aws_ops smoke [--url URL] [--insecure | --trusted] [--attempts N]
    python -m stack.aws_ops smoke-gpu [--host HOST]     (LLM_API_KEY: a key of the deployment)

The hosts come from `terraform output -json` when this checkout holds the state; otherwise
(the state lives elsewhere, or is lost) they are found by their EC2 tags, Project=<name> and
Role=gpu-host, which Terraform sets. stop/start always go by the tags.

Region and name come from the flags, else Terraform's outputs, else terraform.tfvars, else
TF_VAR_region / TF_VAR_name, else the variables' defaults: the same answer Terraform gets.

Every failure a user can cause (no AWS credentials, no terraform or ansible, no G-instance
vCPU quota, a region without the GPU type) ends in one line saying what to do, exit status 2.

Test only: LLM_SIM_HOST_ADDRESSES names a YAML file {host name: address}. The simulated deploy
(tests/infra/simulated_aws.py, against an AWS emulator whose instance addresses lead nowhere)
sets it so that every connection these tools make, and the inventory's ansible_host, go to
its test hosts instead. It is refused unless AWS_ENDPOINT_URL (the emulator) is set too.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import yaml
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    WaiterError,
)

ROOT = Path(__file__).resolve().parents[1]
TF_DIR = ROOT / "terraform"
INVENTORY = ROOT / "ansible" / "inventories" / "aws" / "hosts.yml"
# a known_hosts of our own: Elastic IPs are reused after destroy/deploy, and a stale entry in
# ~/.ssh/known_hosts would block SSH; `make destroy` removes this file
KNOWN_HOSTS = ROOT / ".local" / "aws_known_hosts"
# Grafana's admin password, made by `make inventory` (so by `make deploy`) when missing: shown
# once, kept on the controller only (mode 0600, .local/ is not in git), read by Ansible at run
# time through the inventory's file lookup; `make destroy` removes it
GRAFANA_PASSWORD = ROOT / ".local" / "grafana-admin-password"

DEFAULT_NAME = "llm"  # keep in step with terraform/variables.tf
DEFAULT_REGION = "us-east-1"
DEFAULT_INSTANCE_TYPE = "g5.xlarge"
HOST_ROLE = "gpu-host"
# names terraform/modules/cache gives the shared rate-limit cache and its token's parameter
# (keep in step with it): how `make inventory` finds them without the Terraform state
CACHE_GROUP_ID = "{name}-limits"
CACHE_SUBNET_GROUP = "{name}-cache"
CACHE_TOKEN_PARAMETER = "/{name}/gateway/redis-auth-token"
# the units `make status` shows; Debian/Ubuntu's node exporter unit is named after its package
# (the node_exporter role installs prometheus-node-exporter)
UNITS = ["nginx.service", "gateway.service", "vllm@*.service",
         "prometheus-node-exporter.service", "dcgm-exporter.service", "prometheus.service",
         "prometheus-alertmanager.service"]
# Service Quotas codes of the "Running On-Demand ... instances" vCPU limits
QUOTA_CODES = {"g": ("L-DB2E81BA", "G and VT"), "p": ("L-417A185B", "P")}

INSTALL_TERRAFORM = ("terraform not found on PATH: install Terraform 1.10 or newer "
                     "(https://developer.hashicorp.com/terraform/install), then retry")
NO_CREDENTIALS = ("AWS credentials not found: run `aws configure` (or `aws sso login --profile P` "
                  "and export AWS_PROFILE=P), or export AWS_ACCESS_KEY_ID and "
                  "AWS_SECRET_ACCESS_KEY, then retry")
BAD_CREDENTIALS = ("AWS rejected the credentials ({code}): check AWS_PROFILE / the access key, "
                   "or log in again (`aws sso login`), then retry")


class OpsError(Exception):
    """A failure with a message for the user; main() prints it as one line."""


@dataclass
class Host:
    name: str
    instance_id: str
    public_ip: str | None
    public_dns: str | None = None
    private_ip: str | None = None
    instance_type: str | None = None
    availability_zone: str | None = None
    models_volume_id: str | None = None
    state: str | None = None


@dataclass
class Deployment:
    """What the tools need to know about one deployment, from Terraform or from EC2 tags."""

    name: str
    region: str
    ssh_user: str
    hosts: list[Host]
    api_endpoint: str | None = None
    api_tls_trusted: bool = False
    model_bucket_name: str | None = None
    # s3://bucket/prefix the hosts may read and write (Terraform's model_cache_url)
    model_cache_url: str | None = None
    # the SNS topic the hosts' Alertmanager publishes alerts to (Terraform's alert_topic_arn)
    alert_topic_arn: str | None = None
    # s3://bucket/key of the one key set every host reads (Terraform's key_store_url), and
    # S3's address ranges the gateway unit must be allowed to reach it
    key_store_url: str | None = None
    key_store_s3_cidrs: list[str] = field(default_factory=list)
    source: str = "terraform"
    # where the endpoint's certificate comes from: acm, letsencrypt or self-signed (tls_mode())
    api_tls: str | None = None
    # a single host with domain_name: nginx gets a Let's Encrypt certificate for it (DNS-01)
    letsencrypt_domain: str | None = None
    letsencrypt_email: str | None = None
    # the VPC's range: behind the load balancer nginx trusts X-Forwarded-For from it alone
    vpc_cidr: str | None = None
    # the shared rate-limit cache (several hosts): where it answers (TLS), the SSM parameter
    # holding its AUTH token (a name, never the token), the subnets its nodes sit in
    cache_endpoint: str | None = None
    cache_port: int | None = None
    cache_auth_token_ssm_parameter: str | None = None
    cache_subnet_cidrs: tuple[str, ...] = ()


# ---- test only: the simulated deploy's host addresses --------------------------------------------

SIM_ADDRESSES_ENV = "LLM_SIM_HOST_ADDRESSES"


def simulated_addresses() -> dict[str, str] | None:
    """{host name: address} from the file $LLM_SIM_HOST_ADDRESSES names, None when unset."""
    name = os.environ.get(SIM_ADDRESSES_ENV, "").strip()
    if not name:
        return None
    if not os.environ.get("AWS_ENDPOINT_URL"):
        # a real deployment's hosts must never be swapped for other addresses
        raise OpsError(f"{SIM_ADDRESSES_ENV} is set but AWS_ENDPOINT_URL is not: the address "
                       "map is for the simulated deploy against an AWS emulator only; unset it")
    path = Path(name)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise OpsError(f"{SIM_ADDRESSES_ENV}={name}: cannot read it ({e}); it is for the "
                       "simulated deploy only: unset it for a real one") from None
    if not isinstance(doc, dict) or not doc:
        raise OpsError(f"{SIM_ADDRESSES_ENV}={name}: want a YAML mapping of host name to "
                       "address, such as {llm-gpu-0: 10.213.0.11}")
    for host, address in doc.items():
        try:
            ipaddress.ip_address(str(address))
        except ValueError:
            raise OpsError(f"{SIM_ADDRESSES_ENV}={name}: {host}: {address!r} is not an IP "
                           "address") from None
    return {str(k): str(v) for k, v in doc.items()}


def simulate(dep: Deployment) -> Deployment:
    """With $LLM_SIM_HOST_ADDRESSES set, the deployment as the simulation reaches it: each
    host's public address, and an endpoint that named a host, replaced by its test host's
    address. Unchanged otherwise."""
    addresses = simulated_addresses()
    if addresses is None:
        return dep
    missing = [h.name for h in dep.hosts if h.name not in addresses]
    if missing:
        raise OpsError(f"{SIM_ADDRESSES_ENV} has no address for {', '.join(missing)}")
    for h in dep.hosts:
        fake = {a for a in (h.public_ip, h.public_dns) if a}
        h.public_ip = addresses[h.name]
        if dep.api_endpoint and dep.api_endpoint.removeprefix("https://") in fake:
            dep.api_endpoint = f"https://{h.public_ip}"
    return dep


# ---- settings: the same values Terraform sees -------------------------------------------------

# `key = "string"` or `key = 3` on one line; lists and maps are not needed here
_TFVAR_SCALAR = re.compile(r'^\s*(\w+)\s*=\s*(?:"([^"]*)"|([\w.-]+))\s*(?:#.*)?$')
_TFVAR_ANY = re.compile(r"^\s*(\w+)\s*=")


def tfvars_files(tf_dir: Path = TF_DIR) -> list[Path]:
    """The variable files Terraform loads by itself, in its order (a later file wins):
    terraform.tfvars, terraform.tfvars.json, then every *.auto.tfvars(.json) by name."""
    if not tf_dir.is_dir():
        return []
    fixed = [tf_dir / "terraform.tfvars", tf_dir / "terraform.tfvars.json"]
    auto = sorted((p for p in tf_dir.iterdir()
                   if p.name.endswith((".auto.tfvars", ".auto.tfvars.json")) and p.is_file()),
                  key=lambda p: p.name)
    return [p for p in fixed if p.exists()] + auto


def _read_tfvars(path: Path) -> tuple[dict[str, str], set[str]]:
    """(scalar settings, every name the file sets) of one variable file."""
    if path.name.endswith(".json"):
        try:
            doc = json.loads(path.read_text())
        except ValueError as e:
            raise OpsError(f"{path}: not valid JSON ({e}): fix it (Terraform would refuse "
                           "it too)") from None
        scalars = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in doc.items()
                   if isinstance(v, str | int | float | bool)}
        return scalars, set(doc)
    scalars, names = {}, set()
    for line in path.read_text().splitlines():
        if m := _TFVAR_SCALAR.match(line):
            scalars[m.group(1)] = m.group(2) if m.group(2) is not None else m.group(3)
        if m := _TFVAR_ANY.match(line):
            names.add(m.group(1))
    return scalars, names


def tfvars(tf_dir: Path = TF_DIR) -> dict[str, str]:
    """The scalar settings (region, name, instance_type, host_count) of the variable files
    Terraform loads, merged the way it merges them."""
    found: dict[str, str] = {}
    for path in tfvars_files(tf_dir):
        found.update(_read_tfvars(path)[0])
    return found


def tfvars_names(tf_dir: Path = TF_DIR) -> set[str]:
    """Every variable the files set, lists and maps included."""
    names: set[str] = set()
    for path in tfvars_files(tf_dir):
        names |= _read_tfvars(path)[1]
    return names


def setting(key: str, default: str, outputs: dict | None = None, tf_dir: Path = TF_DIR) -> str:
    if outputs and outputs.get(key, {}).get("value"):
        return str(outputs[key]["value"])
    return tfvars(tf_dir).get(key) or os.environ.get(f"TF_VAR_{key}") or default


# ---- external tools ---------------------------------------------------------------------------


def require_binary(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise OpsError(hint)
    return path


def run_streaming(argv: list[str]) -> tuple[int, str]:
    """Run a command with its output shown as it comes (prompts included); return rc and output."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = bytearray()
    while chunk := os.read(proc.stdout.fileno(), 65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        seen += chunk
        if len(seen) > 2_000_000:  # only the end matters for explaining a failure
            del seen[:-1_000_000]
    return proc.wait(), seen.decode(errors="replace")


def terraform_outputs(tf_dir: Path = TF_DIR) -> dict | None:
    """`terraform output -json`, or None when there is no terraform, no state or no outputs."""
    tf = shutil.which("terraform")
    if tf is None:
        return None
    proc = subprocess.run([tf, f"-chdir={tf_dir}", "output", "-json", "-no-color"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    try:
        outputs = json.loads(proc.stdout or "{}")
    except ValueError:
        return None
    return outputs if outputs.get("hosts", {}).get("value") else None


# what terraform apply/destroy print when AWS refuses, and what to do about it
_TERRAFORM_FAILURES = [
    (r"VcpuLimitExceeded|You have requested more vCPU capacity",
     "the account's vCPU quota for GPU instances is too low for this deployment: {quota_hint}"),
    (r"No valid credential sources found|NoCredentialProviders|failed to refresh cached "
     r"credentials|no EC2 IMDS role found", NO_CREDENTIALS),
    (r"ExpiredToken|RequestExpired|token included in the request is expired",
     "the AWS session has expired: log in again (`aws sso login`) and retry"),
    (r"InvalidClientTokenId|UnrecognizedClientException|AuthFailure|SignatureDoesNotMatch",
     "AWS rejected the credentials: check AWS_PROFILE / the access key, then retry"),
    (r"InsufficientInstanceCapacity",
     "AWS has no spare capacity for this instance type in that zone right now: retry in a while "
     "(or set another region in terraform/terraform.tfvars)"),
    (r"Unsupported: Your requested instance type|is not supported in your requested "
     r"Availability Zone",
     "the instance type is not offered where it was requested: `python -m stack.aws_ops "
     "preflight` lists the zones that have it; pick a region with two"),
]


def explain_terraform_failure(output: str, region: str, instance_type: str) -> str | None:
    # Terraform colours and wraps its errors inside a box: match on the plain, joined text
    flat = " ".join(re.sub(r"\x1b\[[0-9;]*m|│", " ", output).split())
    for pattern, message in _TERRAFORM_FAILURES:
        if re.search(pattern, flat):
            return message.format(quota_hint=quota_hint(region, instance_type, None, None))
    return None


# ---- AWS ----------------------------------------------------------------------------------------


def _session(region: str) -> boto3.Session:
    """Every AWS client comes from here (tests hand in a session of their own)."""
    return boto3.Session(region_name=region)


def quota_code(instance_type: str) -> tuple[str, str]:
    return QUOTA_CODES["p" if instance_type.startswith("p") else "g"]


def same_quota(instance_type: str, other: str) -> bool:
    """Whether `other` counts against the same vCPU quota: G and VT types share one, P another."""
    def group(t: str) -> str | None:
        family = t.split(".", 1)[0]
        if family.startswith("vt") or family.startswith("g"):
            return "g"
        return "p" if family.startswith("p") else None
    return group(instance_type) is not None and group(instance_type) == group(other)


def quota_hint(region: str, instance_type: str, have: float | None, need: int | None,
               in_use: int = 0) -> str:
    code, family = quota_code(instance_type)
    wanted = max((need or 0) + in_use, 8)
    used = f", {in_use} of them taken by other running {family} instances" if in_use else ""
    now = (f"it allows {have:g} vCPUs{used}, the {instance_type} hosts need {need}; "
           if need else "")
    return (f"{now}request more under Service Quotas > EC2 > 'Running On-Demand {family} "
            f"instances' ({code}) in {region}, or run `aws service-quotas "
            f"request-service-quota-increase --service-code ec2 --quota-code {code} "
            f"--desired-value {wanted} --region {region}` (new accounts start low; approval can "
            f"take a day)")


def explain_client_error(err: ClientError, region: str = "", instance_type: str = "") -> str:
    code = err.response.get("Error", {}).get("Code", "")
    message = err.response.get("Error", {}).get("Message", "")
    op = err.operation_name
    if code == "VcpuLimitExceeded" or "You have requested more vCPU capacity" in message:
        return ("the account's vCPU quota for GPU instances is too low to start them: "
                + quota_hint(region or "the region", instance_type or DEFAULT_INSTANCE_TYPE,
                             None, None))
    if code == "InsufficientInstanceCapacity":
        return (f"AWS has no spare {instance_type or 'GPU'} capacity in that zone right now: "
                "retry in a while")
    if code in {"AuthFailure", "InvalidClientTokenId", "UnrecognizedClientException",
                "SignatureDoesNotMatch"}:
        return BAD_CREDENTIALS.format(code=code)
    if code in {"ExpiredToken", "ExpiredTokenException", "RequestExpired"}:
        return "the AWS session has expired: log in again (`aws sso login`) and retry"
    if code in {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"}:
        return f"the AWS identity may not call {op}: grant it (see docs/aws.md, prerequisites)"
    return f"AWS {op} failed: {code}: {message}"


def vcpus_in_use(session: boto3.Session, instance_type: str, name: str) -> int:
    """vCPUs of the running (or starting) instances that count against the same quota as
    instance_type, apart from this deployment's own hosts (Terraform keeps those)."""
    ec2 = session.client("ec2")
    counted: list[str] = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": "instance-state-name", "Values": ["pending", "running"]}]):
        for reservation in page["Reservations"]:
            for inst in reservation["Instances"]:
                tags = _tags(inst)
                ours = tags.get("Project") == name and tags.get("Role") == HOST_ROLE
                if not ours and same_quota(instance_type, inst["InstanceType"]):
                    counted.append(inst["InstanceType"])
    if not counted:
        return 0
    kinds = sorted(set(counted))
    per_type = {}
    for i in range(0, len(kinds), 100):
        for t in ec2.describe_instance_types(InstanceTypes=kinds[i:i + 100])["InstanceTypes"]:
            per_type[t["InstanceType"]] = t["VCpuInfo"]["DefaultVCpus"]
    return sum(per_type[t] for t in counted)


def find_instances(session: boto3.Session, name: str,
                   states: tuple[str, ...] = ("pending", "running", "stopping", "stopped")
                   ) -> list[dict]:
    ec2 = session.client("ec2")
    found = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": "tag:Project", "Values": [name]},
        {"Name": "tag:Role", "Values": [HOST_ROLE]},
        {"Name": "instance-state-name", "Values": list(states)},
    ]):
        for reservation in page["Reservations"]:
            found.extend(reservation["Instances"])
    return sorted(found, key=lambda i: _tags(i).get("Name", i["InstanceId"]))


def _tags(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def deployment_from_outputs(outputs: dict) -> Deployment:
    value = {k: v.get("value") for k, v in outputs.items()}
    known = {f.name for f in fields(Host)}
    try:
        return simulate(Deployment(
            name=value["name"], region=value["region"], ssh_user=value["ssh_user"],
            hosts=[Host(**{k: v for k, v in h.items() if k in known}) for h in value["hosts"]],
            api_endpoint=value.get("api_endpoint"),
            api_tls_trusted=bool(value.get("api_tls_trusted")),
            model_bucket_name=value.get("model_bucket_name"),
            model_cache_url=value.get("model_cache_url"), source="terraform",
            api_tls=value.get("api_tls"), letsencrypt_domain=value.get("letsencrypt_domain"),
            letsencrypt_email=value.get("letsencrypt_email"),
            alert_topic_arn=value.get("alert_topic_arn"),
            vpc_cidr=value.get("vpc_cidr"),
            cache_endpoint=value.get("cache_endpoint"), cache_port=value.get("cache_port"),
            cache_auth_token_ssm_parameter=value.get("cache_auth_token_ssm_parameter"),
            cache_subnet_cidrs=tuple(value.get("cache_subnet_cidrs") or ()),
            key_store_url=value.get("key_store_url"),
            key_store_s3_cidrs=list(value.get("key_store_s3_cidrs") or []),
        ))
    except (KeyError, TypeError) as e:
        raise OpsError(f"the Terraform outputs lack {e}: run `make deploy` (or "
                       "`python -m stack.aws_ops terraform apply`) to refresh them") from None


def deployment_from_tags(session: boto3.Session, name: str, region: str) -> Deployment:
    instances = find_instances(session, name)
    if not instances:
        raise OpsError(f"no GPU hosts tagged Project={name}, Role={HOST_ROLE} in {region}: "
                       "deploy first (`make deploy`), or pass --name/--region of your deployment")
    ec2 = session.client("ec2")
    hosts = []
    for inst in instances:
        volumes = [m["Ebs"]["VolumeId"] for m in inst.get("BlockDeviceMappings", [])
                   if m["DeviceName"] != inst.get("RootDeviceName") and "Ebs" in m]
        hosts.append(Host(
            name=_tags(inst).get("Name", inst["InstanceId"]), instance_id=inst["InstanceId"],
            public_ip=inst.get("PublicIpAddress"), public_dns=inst.get("PublicDnsName") or None,
            private_ip=inst.get("PrivateIpAddress"), instance_type=inst["InstanceType"],
            availability_zone=inst["Placement"]["AvailabilityZone"],
            models_volume_id=volumes[0] if volumes else None, state=inst["State"]["Name"],
        ))
    # a stopped instance shows no public IP; its Elastic IP is still associated
    missing = [h.instance_id for h in hosts if not h.public_ip]
    if missing:
        for addr in ec2.describe_addresses(
                Filters=[{"Name": "instance-id", "Values": missing}])["Addresses"]:
            for h in hosts:
                if h.instance_id == addr.get("InstanceId"):
                    h.public_ip = addr["PublicIp"]
    user = _tags(instances[0]).get("SshUser", "ubuntu")
    single = hosts[0] if len(hosts) == 1 else None
    vpcs = ec2.describe_vpcs(VpcIds=[instances[0]["VpcId"]])["Vpcs"]
    return simulate(Deployment(
        name=name, region=region, ssh_user=user, hosts=hosts, source="ec2 tags",
        # several hosts sit behind a load balancer whose name only Terraform knows
        api_endpoint=f"https://{single.public_dns or single.public_ip}" if single else None,
        vpc_cidr=vpcs[0]["CidrBlock"] if vpcs else None,
        **shared_cache_from_aws(session, name),
    ))


def shared_cache_from_aws(session: boto3.Session, name: str) -> dict:
    """The shared rate-limit cache's fields of a Deployment, found by the names Terraform gives
    it; empty when the deployment has none (a single host)."""
    elasticache = session.client("elasticache")
    try:
        group = elasticache.describe_replication_groups(
            ReplicationGroupId=CACHE_GROUP_ID.format(name=name))["ReplicationGroups"][0]
    except ClientError as e:
        if e.response["Error"]["Code"] == "ReplicationGroupNotFoundFault":
            return {}
        raise
    primary = group["NodeGroups"][0]["PrimaryEndpoint"]
    subnet_ids = [sn["SubnetIdentifier"] for sn in elasticache.describe_cache_subnet_groups(
        CacheSubnetGroupName=CACHE_SUBNET_GROUP.format(name=name)
    )["CacheSubnetGroups"][0]["Subnets"]]
    subnets = session.client("ec2").describe_subnets(SubnetIds=subnet_ids)["Subnets"]
    return {"cache_endpoint": primary["Address"], "cache_port": primary["Port"],
            "cache_auth_token_ssm_parameter": CACHE_TOKEN_PARAMETER.format(name=name),
            "cache_subnet_cidrs": tuple(sorted(sn["CidrBlock"] for sn in subnets))}


# ---- inventory ---------------------------------------------------------------------------------


def ssh_common_args() -> str:
    return f"-o UserKnownHostsFile={KNOWN_HOSTS} -o StrictHostKeyChecking=accept-new"


# Nitro instances show each EBS volume as an NVMe disk whose serial is the volume ID without its
# dash; udev links it under this name. /dev/nvme1n1 and the like are not stable: on g5 the
# instance-store disk can take that name first.
EBS_BY_ID = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_"
_VOLUME_ID = re.compile(r"vol-([0-9a-f]{8}|[0-9a-f]{17})")


def volume_device(volume_id: str) -> str:
    """The stable device path of an attached EBS volume on a Nitro instance."""
    if not _VOLUME_ID.fullmatch(volume_id):
        raise OpsError(f"{volume_id!r} is not an EBS volume ID (vol-<hex>): run `make inventory` "
                       "again after `make deploy`")
    return EBS_BY_ID + volume_id.replace("-", "", 1)


def behind_load_balancer(dep: Deployment) -> bool:
    """Terraform puts the load balancer in front when there is more than one host."""
    return len(dep.hosts) > 1


def inventory_document(dep: Deployment, identity: str | None = None) -> dict:
    host_vars = {}
    for h in dep.hosts:
        host_vars[h.name] = {
            "ansible_host": h.public_ip,
            "aws_instance_id": h.instance_id,
            "aws_instance_type": h.instance_type,
            "aws_availability_zone": h.availability_zone,
            "aws_private_ip": h.private_ip,
            "aws_public_dns": h.public_dns,
            "aws_models_volume_id": h.models_volume_id,
        }
        if h.models_volume_id:
            # the models role formats it if blank and mounts it at models_dir
            host_vars[h.name]["models_volume_device"] = volume_device(h.models_volume_id)
    group_vars = {
        "ansible_user": dep.ssh_user,
        "ansible_ssh_common_args": ssh_common_args(),
        "aws_project": dep.name,
        "aws_region": dep.region,
        "api_endpoint": dep.api_endpoint,
        "api_tls_trusted": dep.api_tls_trusted,
        "aws_model_bucket_name": dep.model_bucket_name,
    }
    if dep.model_cache_url:
        # the models role's shared weights cache: the instance role may write there
        group_vars["models_s3_cache"] = dep.model_cache_url
    if dep.key_store_url:
        # the gateway role's own variables: every host reads the one key set with the instance
        # role, which Terraform allows that object only; make key-* write it
        group_vars["gateway_keys_s3_url"] = dep.key_store_url
        group_vars["gateway_keys_s3_region"] = dep.region
        group_vars["gateway_keys_s3_ip_allow"] = dep.key_store_s3_cidrs
    group_vars["api_tls"] = tls_mode(dep)
    if dep.letsencrypt_domain:
        # the nginx role's own variables: certbot answers DNS-01 in Route53 with the instance
        # role, which Terraform allows the zone's _acme-challenge record only
        group_vars["nginx_letsencrypt_domain"] = dep.letsencrypt_domain
        group_vars["nginx_letsencrypt_email"] = dep.letsencrypt_email or ""
    if dep.vpc_cidr:
        group_vars["aws_vpc_cidr"] = dep.vpc_cidr
    if behind_load_balancer(dep) and dep.vpc_cidr:
        # Terraform puts a load balancer in front of more than one host: nginx takes the
        # client's address from X-Forwarded-For, trusted from the VPC's range alone (the load
        # balancer's nodes sit in its public subnets), so per-IP limits and logs see clients
        group_vars["nginx_behind_load_balancer"] = True
        group_vars["nginx_load_balancer_cidrs"] = [dep.vpc_cidr]
    if dep.cache_endpoint:
        # one budget per key across the hosts: the gateway role's own variables. The token is
        # not here: the gateway reads it from this SSM parameter with the instance role,
        # which Terraform allows that one parameter only
        group_vars["gateway_redis_url"] = f"rediss://{dep.cache_endpoint}:{dep.cache_port}"
        group_vars["gateway_redis_auth_ssm_parameter"] = dep.cache_auth_token_ssm_parameter
        # the gateway unit reaches loopback only, and now the cache's subnets
        group_vars["gateway_ip_allow"] = list(dep.cache_subnet_cidrs)
    if identity:
        group_vars["ansible_ssh_private_key_file"] = identity
    monitoring_vars = {
        # the password's file, not the password: the inventory holds no secret
        "monitoring_grafana_admin_password":
            f"{{{{ lookup('ansible.builtin.file', '{GRAFANA_PASSWORD}') }}}}",
    }
    if dep.alert_topic_arn:
        # alerts go to the deployment's SNS topic, published with the instance role (Terraform
        # allows it on this topic only); group_vars/monitoring.yml may choose otherwise
        monitoring_vars["monitoring_alert_receiver"] = "sns"
        monitoring_vars["monitoring_alert_sns_topic_arn"] = dep.alert_topic_arn
    return {"all": {"children": {
        "gpu_hosts": {"vars": group_vars, "hosts": host_vars},
        # Prometheus and Grafana run on the first GPU host unless a monitoring host is added
        "monitoring": {
            "hosts": {dep.hosts[0].name: None},
            "vars": monitoring_vars,
        },
    }}}


def ensure_grafana_password(path: Path | None = None) -> str | None:
    """Create Grafana's admin password file (mode 0600) if it is missing; the new password, or
    None when the file was there already."""
    path = path or GRAFANA_PASSWORD
    path.parent.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(18)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if not path.read_text().strip():
            raise OpsError(f"{path} is empty: delete it and run `make inventory` to make a new "
                           "Grafana admin password") from None
        return None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(password + "\n")
    return password


def write_inventory(dep: Deployment, path: Path = INVENTORY, identity: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Written by `make inventory` (python -m stack.aws_ops inventory) from "
              f"{dep.source}.\n# Do not edit: run it again after `make deploy`.\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + yaml.safe_dump(inventory_document(dep, identity), sort_keys=False))
    tmp.replace(path)


def read_inventory(path: Path = INVENTORY) -> Deployment:
    if not path.exists():
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        raise OpsError(f"{shown} does not exist: run `make inventory` "
                       "(after `make deploy`)")
    doc = yaml.safe_load(path.read_text())
    group = doc["all"]["children"]["gpu_hosts"]
    gv = group["vars"]
    hosts = [Host(name=n, instance_id=v["aws_instance_id"], public_ip=v["ansible_host"],
                  public_dns=v.get("aws_public_dns"), private_ip=v.get("aws_private_ip"),
                  instance_type=v.get("aws_instance_type"),
                  availability_zone=v.get("aws_availability_zone"),
                  models_volume_id=v.get("aws_models_volume_id"))
             for n, v in group["hosts"].items()]
    return Deployment(name=gv["aws_project"], region=gv["aws_region"],
                      ssh_user=gv["ansible_user"], hosts=hosts,
                      api_endpoint=gv.get("api_endpoint"),
                      api_tls_trusted=bool(gv.get("api_tls_trusted")),
                      model_bucket_name=gv.get("aws_model_bucket_name"),
                      model_cache_url=gv.get("models_s3_cache"), source="inventory",
                      api_tls=gv.get("api_tls"),
                      letsencrypt_domain=gv.get("nginx_letsencrypt_domain") or None,
                      letsencrypt_email=gv.get("nginx_letsencrypt_email") or None,
                      alert_topic_arn=(doc["all"]["children"].get("monitoring", {}).get("vars")
                                       or {}).get("monitoring_alert_sns_topic_arn"),
                      key_store_url=gv.get("gateway_keys_s3_url"),
                      key_store_s3_cidrs=gv.get("gateway_keys_s3_ip_allow") or [])


# ---- commands ----------------------------------------------------------------------------------


def _region_name(args: argparse.Namespace, outputs: dict | None = None) -> tuple[str, str]:
    region = args.region or setting("region", DEFAULT_REGION, outputs, args.tf_dir)
    name = args.name or setting("name", DEFAULT_NAME, outputs, args.tf_dir)
    return region, name


def cmd_preflight(args: argparse.Namespace) -> int:
    missing = [hint for tool, hint in [
        ("terraform", INSTALL_TERRAFORM),
        (args.ansible_playbook, f"{args.ansible_playbook} not found: install Ansible "
                                "(`make deps` installs what the playbooks need), then retry"),
        ("ssh", "ssh not found: install an OpenSSH client, then retry"),
        ("curl", "curl not found: install curl, then retry"),
    ] if shutil.which(tool) is None]
    if missing:
        raise OpsError(missing[0])
    required = ("admin_cidrs", "ssh_public_key")
    have_vars = tfvars_names(args.tf_dir) | {v for v in required if f"TF_VAR_{v}" in os.environ}
    if not tfvars_files(args.tf_dir) and not all(v in have_vars for v in required):
        raise OpsError("terraform/terraform.tfvars is missing: copy terraform/terraform.tfvars."
                       "example and set admin_cidrs (your address) and ssh_public_key")
    unset = [v for v in required if v not in have_vars]
    if unset:
        raise OpsError(f"{' and '.join(unset)} not set: add them to terraform/terraform.tfvars "
                       "(see terraform.tfvars.example), a *.auto.tfvars file or TF_VAR_<name>")
    region, name = _region_name(args)
    instance_type = args.instance_type or setting("instance_type", DEFAULT_INSTANCE_TYPE,
                                                  tf_dir=args.tf_dir)
    configured = setting("host_count", "1", tf_dir=args.tf_dir)
    count = args.count or (int(configured) if configured.isdigit() else 1)
    session = _session(region)
    who = session.client("sts").get_caller_identity()
    print(f">> AWS account {who['Account']} as {who['Arn']}, region {region}")

    ec2 = session.client("ec2")
    offered = {o["Location"] for o in ec2.describe_instance_type_offerings(
        LocationType="availability-zone",
        Filters=[{"Name": "instance-type", "Values": [instance_type]}],
    )["InstanceTypeOfferings"]}
    # the region's own zones, as Terraform picks them: Local and Wavelength Zones do not count
    regular = {z["ZoneName"] for z in ec2.describe_availability_zones(Filters=[
        {"Name": "opt-in-status", "Values": ["opt-in-not-required"]},
        {"Name": "zone-type", "Values": ["availability-zone"]},
    ])["AvailabilityZones"]}
    zones = sorted(offered & regular)
    if not zones:
        raise OpsError(f"region {region} does not offer {instance_type}: set `region` in "
                       "terraform/terraform.tfvars to one that does (us-east-1, us-west-2, "
                       "eu-west-1 ...; `aws ec2 describe-instance-type-offerings --filters "
                       f"Name=instance-type,Values={instance_type} --region R` lists them)")
    if len(zones) < 2:
        raise OpsError(f"region {region} offers {instance_type} in one zone only ({zones[0]}); "
                       "the network needs two: choose another region")
    print(f">> {instance_type} is offered in {', '.join(zones)}")

    vcpus = ec2.describe_instance_types(InstanceTypes=[instance_type])[
        "InstanceTypes"][0]["VCpuInfo"]["DefaultVCpus"]
    need = vcpus * count
    in_use = vcpus_in_use(session, instance_type, name)
    code, family = quota_code(instance_type)
    try:
        have = session.client("service-quotas").get_service_quota(
            ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"]
    except ClientError as e:
        # reading quotas needs servicequotas:GetServiceQuota; without it, apply will tell
        print(f">> vCPU quota not readable ({e.response['Error']['Code']}); "
              f"{count} x {instance_type} needs {need} vCPUs of '{family}' instances"
              + (f", and other running ones take {in_use}" if in_use else ""))
        return 0
    if have - in_use < need:
        raise OpsError("the account's vCPU quota for GPU instances is too low: "
                       + quota_hint(region, instance_type, have, need, in_use))
    print(f">> vCPU quota for {family} instances: {have:g}, other running instances take "
          f"{in_use}, this deployment needs {need}")
    return 0


def cmd_terraform(args: argparse.Namespace) -> int:
    tf = require_binary("terraform", INSTALL_TERRAFORM)
    region, _ = _region_name(args)
    instance_type = setting("instance_type", DEFAULT_INSTANCE_TYPE, tf_dir=args.tf_dir)
    steps = [args.tf_args]
    if args.tf_args[:1] != ["init"]:
        # cheap when nothing changed; picks up a new backend.tf or module
        steps.insert(0, ["init", "-input=false"])
    for step in steps:
        rc, output = run_streaming([tf, f"-chdir={args.tf_dir}", *step])
        if rc != 0:
            hint = explain_terraform_failure(output, region, instance_type)
            if hint:
                print(f"error: {hint}", file=sys.stderr)
            return rc
    return 0


def cmd_inventory(args: argparse.Namespace) -> int:
    outputs = None
    if args.source in ("auto", "terraform"):
        if args.source == "terraform":
            require_binary("terraform", INSTALL_TERRAFORM)
        outputs = terraform_outputs(args.tf_dir)
        if outputs is None and args.source == "terraform":
            raise OpsError("terraform has no outputs here: run `make deploy` first, or use "
                           "--source ec2 to find the hosts by their tags")
    if outputs is not None:
        dep = deployment_from_outputs(outputs)
    else:
        region, name = _region_name(args)
        print(f">> no Terraform state here: finding hosts by tags Project={name}, "
              f"Role={HOST_ROLE} in {region}")
        dep = deployment_from_tags(_session(region), name, region)
    if simulated_addresses() is not None:
        print(f">> SIMULATION ({SIM_ADDRESSES_ENV} is set, test only): the hosts' addresses "
              "are the test hosts'", flush=True)
    write_inventory(dep, args.out, args.identity)
    print(f">> {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}: "
          f"{len(dep.hosts)} host(s) from {dep.source}")
    if behind_load_balancer(dep) and not dep.vpc_cidr:
        print(">> note: the outputs name no VPC range, so nginx will see the load balancer's "
              "addresses instead of the clients': run `make deploy` to refresh the outputs")
    for h in dep.hosts:
        print(f"   {h.name:<16} {h.public_ip or '-':<16} {h.instance_id}")
    password = ensure_grafana_password()
    if password:
        shown = GRAFANA_PASSWORD.relative_to(ROOT) if GRAFANA_PASSWORD.is_relative_to(ROOT) \
            else GRAFANA_PASSWORD
        print(f">> Grafana admin password (user admin), shown this once: {password}\n"
              f"   kept in {shown} (mode 0600, not in git); Ansible reads it from there")
    return 0


def _hosts_for_ssh(args: argparse.Namespace) -> Deployment:
    """The inventory if it exists (fast, no AWS calls), else the same discovery as inventory."""
    if args.out.exists():
        return read_inventory(args.out)
    outputs = terraform_outputs(args.tf_dir)
    if outputs is not None:
        return deployment_from_outputs(outputs)
    region, name = _region_name(args)
    return deployment_from_tags(_session(region), name, region)


def ssh_argv(dep: Deployment, host: Host, identity: str | None, batch: bool = True) -> list[str]:
    argv = ["ssh", "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={KNOWN_HOSTS}", "-o", "ConnectTimeout=10"]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    if identity:
        argv += ["-i", identity]
    return [*argv, f"{dep.ssh_user}@{host.public_ip}"]


def pick_host(dep: Deployment, wanted: str | None) -> Host:
    if not wanted:
        return dep.hosts[0]
    for i, h in enumerate(dep.hosts):
        if wanted in (h.name, h.instance_id, h.public_ip, str(i)):
            return h
    raise OpsError(f"no host {wanted!r}; hosts: {', '.join(h.name for h in dep.hosts)}")


def cmd_ssh(args: argparse.Namespace) -> int:
    require_binary("ssh", "ssh not found: install an OpenSSH client, then retry")
    KNOWN_HOSTS.parent.mkdir(parents=True, exist_ok=True)
    dep = _hosts_for_ssh(args)
    host = pick_host(dep, args.host)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    argv = ssh_argv(dep, host, args.identity, batch=bool(args.command))
    if args.command:
        argv.append(shlex.join(args.command) if len(args.command) > 1 else args.command[0])
    return subprocess.call(argv)


def cmd_logs(args: argparse.Namespace) -> int:
    require_binary("ssh", "ssh not found: install an OpenSSH client, then retry")
    KNOWN_HOSTS.parent.mkdir(parents=True, exist_ok=True)
    dep = _hosts_for_ssh(args)
    unit = args.unit if "." in args.unit else f"{args.unit}.service"
    journal = ["journalctl", "--no-pager", "-u", shlex.quote(unit), "-n", str(args.lines)]
    if args.host or len(dep.hosts) == 1:
        host = pick_host(dep, args.host)
        return subprocess.call([*ssh_argv(dep, host, args.identity), "sudo", *journal, "-f"])
    # several hosts: the recent lines of each; HOST= follows one
    rc = 0
    for host in dep.hosts:
        print(f"==> {host.name} ({host.public_ip}): {unit}")
        rc |= subprocess.call([*ssh_argv(dep, host, args.identity), "sudo", *journal])
    print("(pass HOST=<name> to follow one host)")
    return rc


def _probe_host(dep: Deployment, host: Host, identity: str | None) -> tuple[str, str]:
    """Unit states and the local /ready answer, through one SSH call."""
    remote = ("systemctl list-units --all --no-legend --plain --type=service "
              + " ".join(shlex.quote(u) for u in UNITS)
              + "; echo \"ready=$(curl -sk -o /dev/null -m 5 -w '%{http_code}' "
                "https://127.0.0.1/ready)\"")
    try:
        proc = subprocess.run([*ssh_argv(dep, host, identity), remote], capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "ssh timed out", "-"
    if proc.returncode == 255:
        return "ssh failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1], "-"
    units, ready = [], "-"
    for line in proc.stdout.splitlines():
        if line.startswith("ready="):
            ready = line.split("=", 1)[1] or "-"
            continue
        parts = line.split()
        if len(parts) >= 4:
            units.append(f"{parts[0].removesuffix('.service')}={parts[2]}/{parts[3]}")
    return " ".join(units) or "no units yet", ready


def cmd_status(args: argparse.Namespace) -> int:
    outputs = terraform_outputs(args.tf_dir)
    region, name = _region_name(args, outputs)
    instances = find_instances(_session(region), name)
    if not instances:
        print(f">> no GPU hosts tagged Project={name} in {region}")
        return 0
    dep = (deployment_from_outputs(outputs) if outputs else
           read_inventory(args.out) if args.out.exists() else
           deployment_from_tags(_session(region), name, region))
    print(f"{'host':<16} {'instance':<20} {'state':<9} {'address':<16} {'ready':<5} units")
    for inst in instances:
        tag_name = _tags(inst).get("Name", inst["InstanceId"])
        known = next((h for h in dep.hosts if h.instance_id == inst["InstanceId"]), None)
        host = known or simulate(Deployment(name, region, dep.ssh_user, [Host(
            tag_name, inst["InstanceId"], inst.get("PublicIpAddress"))])).hosts[0]
        state = inst["State"]["Name"]
        units, ready = ("-", "-")
        if state == "running" and host.public_ip and not args.no_ssh:
            units, ready = _probe_host(dep, host, args.identity)
        print(f"{tag_name:<16} {inst['InstanceId']:<20} {state:<9} {host.public_ip or '-':<16} "
              f"{ready:<5} {units}")
    if dep.api_endpoint:
        print(f"endpoint: {dep.api_endpoint}")
    return 0


def _change_power(args: argparse.Namespace, action: str) -> int:
    region, name = _region_name(args, terraform_outputs(args.tf_dir))
    session = _session(region)
    ec2 = session.client("ec2")
    wanted_from = ("running", "pending") if action == "stop" else ("stopped",)
    instances = find_instances(session, name, wanted_from)
    if not instances:
        print(f">> no GPU hosts to {action} (Project={name}, {region})")
        return 0
    ids = [i["InstanceId"] for i in instances]
    instance_type = instances[0]["InstanceType"]
    print(f">> {action} {len(ids)} host(s): {', '.join(ids)}")
    try:
        if action == "stop":
            # stop, not terminate: the EBS volumes and Elastic IPs stay with the instances
            ec2.stop_instances(InstanceIds=ids)
        else:
            ec2.start_instances(InstanceIds=ids)
    except ClientError as e:
        raise OpsError(explain_client_error(e, region, instance_type)) from None
    if args.no_wait:
        return 0
    waiter = ec2.get_waiter("instance_stopped" if action == "stop" else "instance_running")
    try:
        waiter.wait(InstanceIds=ids, WaiterConfig={"Delay": args.poll, "MaxAttempts": 60})
    except WaiterError as e:
        raise OpsError(f"the hosts did not finish {action}ping: {e}; check `make status`") \
            from None
    if action == "stop":
        print(">> stopped: the GPU hours stop; volumes and Elastic IPs remain (and are billed)")
    else:
        print(">> running: the services start by themselves; `make wait-ssh` then "
              "`make status` shows when /ready answers (models take minutes to load)")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    return _change_power(args, "stop")


def cmd_start(args: argparse.Namespace) -> int:
    return _change_power(args, "start")


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=5):
            return True
    except OSError:
        return False


def cmd_wait_ssh(args: argparse.Namespace) -> int:
    require_binary("ssh", "ssh not found: install an OpenSSH client, then retry")
    KNOWN_HOSTS.parent.mkdir(parents=True, exist_ok=True)
    dep = _hosts_for_ssh(args)
    deadline = time.monotonic() + args.timeout
    for host in dep.hosts:
        label = f"{host.name} ({host.public_ip})"
        if not host.public_ip:
            raise OpsError(f"{host.name} has no public address: run `make inventory` again")
        started, last_note = time.monotonic(), 0.0
        while not _port_open(host.public_ip, args.port):
            waited = time.monotonic() - started
            if time.monotonic() > deadline:
                raise OpsError(f"{label}: port {args.port} still closed after {waited:.0f} s: "
                               "check `make status` and that admin_cidrs holds your address")
            if waited - last_note >= 15:
                print(f">> {label}: waiting for SSH ({waited:.0f} s)", flush=True)
                last_note = waited
            time.sleep(args.poll)
        print(f">> {label}: SSH port open; waiting for cloud-init to finish", flush=True)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OpsError(f"{label}: cloud-init not done within {args.timeout} s")
            try:
                proc = subprocess.run(
                    [*ssh_argv(dep, host, args.identity), "cloud-init status --wait"],
                    capture_output=True, text=True, timeout=remaining)
            except subprocess.TimeoutExpired:
                raise OpsError(f"{label}: cloud-init not done within {args.timeout} s") from None
            # 255: sshd answers before the key is installed; 2: done with recoverable errors
            if proc.returncode in (0, 2):
                status = (proc.stdout.strip().splitlines() or ["status: done"])[-1]
                print(f">> {label}: {status}", flush=True)
                break
            if proc.returncode != 255:
                raise OpsError(f"{label}: cloud-init failed ({proc.stdout.strip()[-200:]}): "
                               f"see `make ssh HOST={host.name} CMD='cloud-init status --long'`")
            time.sleep(args.poll)
    return 0


def _ssh_runner(dep: Deployment, host: Host, identity: str | None):
    """A gpu_smoke runner: one SSH call per remote command, stdin handed over as given."""
    def run(remote: str, stdin: str) -> tuple[int, str, str]:
        try:
            proc = subprocess.run([*ssh_argv(dep, host, identity), remote], input=stdin,
                                  capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            return 124, "", "ssh timed out after 180 s"
        if proc.returncode == 255:
            raise OpsError(f"{host.name} ({host.public_ip}): ssh failed: "
                           + (proc.stderr.strip().splitlines() or ["?"])[-1]
                           + "; `make wait-ssh`, and check admin_cidrs holds your address")
        return proc.returncode, proc.stdout, proc.stderr
    return run


def cmd_smoke_gpu(args: argparse.Namespace) -> int:
    from stack import gpu_smoke  # reads the declaration, the roles and the planner

    key = os.environ.get("LLM_API_KEY", "").strip()
    if not key:
        raise OpsError("set LLM_API_KEY to a key of this deployment (`make summary` shows how "
                       "to create one): the request check sends it to the host on ssh's stdin, "
                       "never on a command line, and never prints it")
    require_binary("ssh", "ssh not found: install an OpenSSH client, then retry")
    KNOWN_HOSTS.parent.mkdir(parents=True, exist_ok=True)
    dep = _hosts_for_ssh(args)
    hosts = [pick_host(dep, args.host)] if args.host else dep.hosts
    failed = []
    for host in hosts:
        instance_type = host.instance_type or setting("instance_type", DEFAULT_INSTANCE_TYPE,
                                                      tf_dir=args.tf_dir)
        try:
            exp = gpu_smoke.expected(instance_type)
        except ValueError as e:
            raise OpsError(str(e)) from None
        results = gpu_smoke.run_checks(exp, key, _ssh_runner(dep, host, args.identity))
        print(gpu_smoke.table(f"{host.name} ({host.public_ip}, {instance_type})", results),
              flush=True)
        if results[-1].status == "FAILED":
            failed.append(host.name)
    if failed:
        print(f">> smoke-gpu FAILED on {', '.join(failed)}")
        return 1
    print(f">> smoke-gpu: all checks passed on {len(hosts)} host(s)")
    return 0


def cmd_endpoint(args: argparse.Namespace) -> int:
    dep = read_inventory(args.out)
    if args.tls:
        print("trusted" if tls_mode(dep) in TRUSTED_TLS else "self-signed")
    elif dep.api_endpoint:
        print(dep.api_endpoint)
    else:
        raise OpsError("the endpoint is unknown to the inventory: run `make inventory` where "
                       "the Terraform state is")
    return 0


# ---- TLS of the endpoint, and the HTTPS smoke test (`make deploy`'s last step) -------------------

# certificates a client trusts without being told to: who issues them
TRUSTED_TLS = {"acm": "the load balancer's ACM certificate",
               "letsencrypt": "Let's Encrypt's certificate on the host"}


def tls_mode(dep: Deployment) -> str:
    """acm, letsencrypt or self-signed: trusted only with a load balancer (ACM) or a single host
    with a Let's Encrypt name. An inventory from before Terraform said so is judged by the same
    rule: a name alone never made nginx's certificate trusted."""
    if dep.api_tls in ("acm", "letsencrypt", "self-signed"):
        return dep.api_tls
    if dep.api_tls_trusted and len(dep.hosts) > 1:
        return "acm"
    if dep.api_tls_trusted and dep.letsencrypt_domain:
        return "letsencrypt"
    return "self-signed"


def _https_get(url: str, context: ssl.SSLContext, timeout: float) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout,
                                       context=context)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     headers={"User-Agent": "llm-stack-smoke"})
        response = conn.getresponse()
        response.read(4096)
        return response.status
    finally:
        conn.close()


def _untrusted_hint(mode: str, host: str, reason: str) -> str:
    if mode == "letsencrypt":
        return (f"{host} presents a certificate this machine does not trust ({reason}): nginx "
                "still serves its self-signed fallback, so Let's Encrypt has not issued one. "
                "The Ansible output says why (\"Let's Encrypt did not issue\"), or `make ssh "
                "CMD='sudo tail -n 40 /var/log/letsencrypt/letsencrypt.log'`; check that "
                "route53_zone_id is the hosted zone of domain_name, then `make deploy` again")
    if mode == "acm":
        return (f"{host} presents a certificate this machine does not trust ({reason}): the load "
                "balancer's ACM certificate must cover domain_name (certificate_arn), and "
                f"domain_name must point at the load balancer (`dig +short {host}`)")
    return f"{host} presents a certificate this machine does not trust ({reason})"


def smoke(url: str, trusted: bool, mode: str, attempts: int = 20, delay: float = 15,
          timeout: float = 10, sleep=time.sleep) -> int:
    """GET url until it answers 200; the number of attempts it took. Retries what time can fix
    (no DNS yet, refused, timeouts, 5xx and 429 while models load); stops at once on what it
    cannot (an untrusted certificate where one is promised, another 4xx). OpsError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise OpsError(f"{url!r} is not an https:// URL: run `make inventory` (the endpoint "
                       "comes from Terraform)")
    if trusted:
        context = ssl.create_default_context()
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    host = parts.hostname
    last = "no attempt made"
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            status = _https_get(url, context, timeout)
        except ssl.SSLCertVerificationError as e:
            raise OpsError(_untrusted_hint(mode, host, e.verify_message or str(e))) from None
        except socket.gaierror:
            last = f"{host} does not resolve (yet: a new DNS record can take minutes)"
        except ConnectionRefusedError:
            last = f"{host}:{parts.port or 443} refused the connection (nginx not listening)"
        except TimeoutError:
            last = f"no answer within {timeout:g} s (security group, api_allowed_cidrs?)"
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if status == 200:
                return attempt
            if 400 <= status < 500 and status not in (408, 429):
                raise OpsError(f"{url} answered {status}: nginx or the gateway refuses "
                                 "/ready; `make logs UNIT=nginx` and `make logs UNIT=gateway`")
            last = f"HTTP {status}" + (" (models still loading?)" if status == 503 else "")
        if attempt < attempts:
            print(f">> {url}: {last}; attempt {attempt + 1}/{attempts} in {delay:g} s",
                  flush=True)
            sleep(delay)
    raise OpsError(f"{url} did not answer 200 in {attempts} attempts "
                   f"({time.monotonic() - started:.0f} s); last: {last}. `make status` shows "
                   "the units and /ready on each host; `make logs UNIT=gateway` (or nginx, "
                   "vllm@<model>) says more")


def cmd_smoke(args: argparse.Namespace) -> int:
    dep = read_inventory(args.out)
    mode = tls_mode(dep)
    if args.url:
        url = args.url
    elif dep.api_endpoint:
        url = dep.api_endpoint.rstrip("/") + "/ready"
    else:
        raise OpsError("the endpoint is unknown to the inventory: run `make inventory` where "
                       "the Terraform state is")
    trusted = args.trusted if args.trusted is not None else mode in TRUSTED_TLS
    what = (f"certificate must be trusted: {TRUSTED_TLS.get(mode, mode)}" if trusted else
            "certificate not checked: nginx's self-signed one")
    print(f">> GET {url} ({what})", flush=True)
    took = smoke(url, trusted, mode, args.attempts, args.delay, args.timeout)
    print(f">> {url} answered 200" + (f" after {took} attempts" if took > 1 else ""))
    return 0


def cmd_key_store(args: argparse.Namespace) -> int:
    """The `python -m app.keys` arguments that reach the deployment's key set (make key-*):
    `--store s3://... --region R` with a key store; nothing when there is no AWS deployment
    here (make then uses the local stack's keys file); an error when the deployment keeps its
    keys on each host."""
    outputs = terraform_outputs(args.tf_dir)
    if outputs is not None:
        dep = deployment_from_outputs(outputs)
    elif args.out.exists():
        dep = read_inventory(args.out)
    else:
        return 0
    if not dep.key_store_url:
        raise OpsError(
            f"the deployment {dep.name} keeps its keys in a file on each host (one host, "
            "create_key_store = false): change them with ansible/playbooks/rotate_key.yml, or "
            "set create_key_store = true in terraform/terraform.tfvars and `make deploy` to "
            "keep one key set for every host, which make key-* then change")
    print(shlex.join(["--store", dep.key_store_url, "--region", dep.region]))
    return 0


def _gateway_defaults() -> dict:
    """Where the Ansible gateway role installs the app: its defaults are the one source."""
    path = ROOT / "ansible" / "roles" / "gateway" / "defaults" / "main.yml"
    found = yaml.safe_load(path.read_text()) if path.exists() else {}
    return {"user": found.get("gateway_user", "llm-gateway"),
            "install_dir": found.get("gateway_install_dir", "/opt/llm-gateway"),
            "keys_file": f"{found.get('gateway_config_dir', '/etc/llm-gateway')}/keys.json"}


def cmd_summary(args: argparse.Namespace) -> int:
    dep = read_inventory(args.out)
    gw = _gateway_defaults()
    trusted = tls_mode(dep) in TRUSTED_TLS
    k = "" if trusted else "-k "
    create = (f"sudo {gw['install_dir']}/venv/bin/python -m app.keys --file {gw['keys_file']} "
              f"create my-app --models '*' && sudo chown {gw['user']}: {gw['keys_file']}")
    print(f">> deployed: {len(dep.hosts)} GPU host(s) in {dep.region}")
    print(f"   endpoint     {dep.api_endpoint}"
          + ("" if trusted else "   (self-signed certificate: curl -k)"))
    print(f"   OpenAI SDK   base_url=\"{dep.api_endpoint}/v1\"")
    if dep.key_store_url:
        print("   create a key (printed once; every host's gateway picks it up within seconds):")
        print("     make key-create NAME=my-app MODELS='*'")
    elif len(dep.hosts) == 1:
        print("   create a key (printed once; the gateway reads the keys file by itself):")
        print(f"     make ssh CMD=\"{create}\"")
    else:
        print("   create a key on every host at once (printed once):")
        print("     ANSIBLE_CONFIG=ansible/ansible.cfg ansible-playbook -i "
              f"{INVENTORY.relative_to(ROOT)} ansible/playbooks/rotate_key.yml "
              "-e key_name=my-app -e key_action=create")
    print(f"   try it       curl {k}{dep.api_endpoint}/v1/models -H \"Authorization: Bearer $KEY\"")
    print("   check it     export LLM_API_KEY (read -rs), then make smoke-gpu (docs/aws.md)")
    print("   operate      make status | make logs UNIT=gateway | make ssh")
    print("   save money   make stop (make start resumes); make destroy removes it all")
    return 0


# ---- entry point -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stack.aws_ops", description=__doc__.split("\n")[0])
    p.add_argument("--region", help="AWS region (default: as Terraform has it)")
    p.add_argument("--name", help="deployment name, the Project tag (default: as Terraform)")
    p.add_argument("--tf-dir", type=Path, default=TF_DIR, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=INVENTORY, help="inventory file")
    p.add_argument("--identity", default=os.environ.get("SSH_KEY") or None,
                   help="SSH private key (default: $SSH_KEY, else ssh's own defaults)")
    sub = p.add_subparsers(dest="command_name", required=True)

    s = sub.add_parser("preflight", help="check tools, credentials, GPU offering and quota")
    s.add_argument("--instance-type")
    s.add_argument("--count", type=int)
    s.add_argument("--ansible-playbook", default="ansible-playbook")
    s.set_defaults(func=cmd_preflight)

    s = sub.add_parser("terraform", help="terraform init + the given command in terraform/")
    s.add_argument("tf_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_terraform)

    s = sub.add_parser("inventory", help="write the Ansible inventory")
    s.add_argument("--source", choices=["auto", "terraform", "ec2"], default="auto")
    s.set_defaults(func=cmd_inventory)

    s = sub.add_parser("wait-ssh", help="wait for SSH and cloud-init on every host")
    s.add_argument("--timeout", type=float, default=900)
    s.add_argument("--poll", type=float, default=5)
    s.add_argument("--port", type=int, default=22, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_wait_ssh)

    s = sub.add_parser("status", help="instance state, units and /ready per host")
    s.add_argument("--no-ssh", action="store_true", help="instance states only")
    s.set_defaults(func=cmd_status)

    for verb, func in (("stop", cmd_stop), ("start", cmd_start)):
        s = sub.add_parser(verb, help=f"{verb} the GPU instances (volumes and IPs stay)")
        s.add_argument("--no-wait", action="store_true")
        s.add_argument("--poll", type=int, default=15, help="seconds between state checks")
        s.set_defaults(func=func)

    s = sub.add_parser("ssh", help="SSH to a host (the first by default), or run a command there")
    s.add_argument("--host", help="name, index or instance ID (default: the first host)")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_ssh)

    s = sub.add_parser("logs", help="journal of a unit (follows one host)")
    s.add_argument("unit")
    s.add_argument("--host")
    s.add_argument("--lines", type=int, default=100)
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("smoke-gpu", help="first-real-deploy checks on each GPU host: driver, "
                       "DCGM, engines, one request each (LLM_API_KEY)")
    s.add_argument("--host", help="name, index or instance ID (default: every host)")
    s.set_defaults(func=cmd_smoke_gpu)

    s = sub.add_parser("endpoint", help="print the API endpoint (from the inventory)")
    s.add_argument("--tls", action="store_true", help="print 'trusted' or 'self-signed'")
    s.set_defaults(func=cmd_endpoint)

    s = sub.add_parser("smoke", help="HTTPS smoke test: GET <endpoint>/ready until 200, "
                       "checking the certificate where it is trusted (ACM, Let's Encrypt)")
    s.add_argument("--url", help="default: the inventory's endpoint + /ready")
    tls = s.add_mutually_exclusive_group()
    tls.add_argument("--trusted", dest="trusted", action="store_true", default=None,
                     help="require a certificate this machine trusts")
    tls.add_argument("--insecure", dest="trusted", action="store_false",
                     help="do not check the certificate (self-signed)")
    s.add_argument("--attempts", type=int, default=20)
    s.add_argument("--delay", type=float, default=15, help="seconds between attempts")
    s.add_argument("--timeout", type=float, default=10, help="seconds per attempt")
    s.set_defaults(func=cmd_smoke)

    s = sub.add_parser("key-store", help="`python -m app.keys` arguments for the deployment's "
                       "key set (empty without an AWS deployment here)")
    s.set_defaults(func=cmd_key_store)

    s = sub.add_parser("summary", help="the endpoint and how to get a key, after a deploy")
    s.set_defaults(func=cmd_summary)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "tf_args", None) == []:
        parser().error("terraform needs a command, such as plan or apply")
    try:
        return args.func(args)
    except OpsError as e:
        message = str(e)
    except NoCredentialsError:
        message = NO_CREDENTIALS
    except ClientError as e:
        message = explain_client_error(e, args.region or "")
    except EndpointConnectionError as e:
        message = f"cannot reach AWS ({e}): check the network, proxy and region"
    except BotoCoreError as e:
        message = f"AWS: {e}"
    except KeyboardInterrupt:
        return 130
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
