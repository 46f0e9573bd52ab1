"""stack/aws_ops.py against moto: real boto3 calls, an in-memory AWS.

External programs (terraform, ssh) are small scripts on a PATH of the test's own, so the real
subprocess paths run; errors AWS would return (quota) are injected with botocore's
before-call hook, the same path a real response takes through boto3.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import boto3
import pytest
import yaml
from moto import mock_aws

from stack import aws_ops

NAME = "llm"
REGION = "us-east-1"
AMI = "ami-12c6146b"  # one of moto's built-in images (looking them up costs a second per call)


# ---- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def paths(tmp_path, monkeypatch):
    """A terraform dir, an inventory path and a PATH holding only the fakes a test writes."""
    tf_dir = tmp_path / "terraform"
    tf_dir.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(aws_ops, "KNOWN_HOSTS", tmp_path / "known_hosts")
    monkeypatch.setattr(aws_ops, "GRAFANA_PASSWORD", tmp_path / "local" / "grafana-admin-password")
    # no credentials from the machine running the tests, and no metadata-service probe
    for var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_REGION", "AWS_DEFAULT_REGION", "TF_VAR_region", "TF_VAR_name", "SSH_KEY",
                "AWS_ENDPOINT_URL", aws_ops.SIM_ADDRESSES_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    class Paths:
        tf = tf_dir
        bin = bin_dir
        out = tmp_path / "inventory" / "hosts.yml"

        def tool(self, name: str, script: str) -> None:
            path = bin_dir / name
            path.write_text("#!/bin/sh\nPATH=/usr/bin:/bin\n" + textwrap.dedent(script))
            path.chmod(path.stat().st_mode | stat.S_IEXEC)

        def run(self, *argv: str) -> int:
            return aws_ops.main(["--tf-dir", str(tf_dir), "--out", str(self.out), *argv])

    return Paths()


@pytest.fixture
def aws(paths):
    with mock_aws():
        yield boto3.Session(region_name=REGION)


def make_hosts(session, count: int = 2, name: str = NAME) -> list[dict]:
    """GPU hosts as Terraform leaves them: tagged, a models volume each, an Elastic IP each."""
    ec2 = session.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.42.0.0/24",
                               AvailabilityZone=f"{REGION}a")["Subnet"]["SubnetId"]
    hosts = []
    for i in range(count):
        inst = ec2.run_instances(
            ImageId=AMI, InstanceType="g5.xlarge", MinCount=1, MaxCount=1, SubnetId=subnet,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [
                {"Key": "Name", "Value": f"{name}-gpu-{i}"}, {"Key": "Project", "Value": name},
                {"Key": "Role", "Value": "gpu-host"}, {"Key": "SshUser", "Value": "ubuntu"},
            ]}],
        )["Instances"][0]
        volume = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=100, VolumeType="gp3",
                                   Encrypted=True)["VolumeId"]
        ec2.attach_volume(VolumeId=volume, InstanceId=inst["InstanceId"], Device="/dev/sdf")
        eip = ec2.allocate_address(Domain="vpc")
        ec2.associate_address(AllocationId=eip["AllocationId"], InstanceId=inst["InstanceId"])
        hosts.append({"id": inst["InstanceId"], "ip": eip["PublicIp"], "volume": volume,
                      "allocation": eip["AllocationId"]})
    return hosts


def states(session, ids: list[str]) -> list[str]:
    reservations = session.client("ec2").describe_instances(InstanceIds=ids)["Reservations"]
    by_id = {i["InstanceId"]: i["State"]["Name"] for r in reservations for i in r["Instances"]}
    return [by_id[i] for i in ids]


class _Http:
    def __init__(self, status: int):
        self.status_code = status
        self.headers: dict = {}


def inject(session, service: str, operation: str, body: dict, status: int = 200) -> None:
    """Answer `operation` with `body` (an error when status >= 300), as a real response would
    arrive: botocore's before-call hook short-circuits the HTTP request only."""
    session.events.register(f"before-call.{service}.{operation}",
                            lambda **_: (_Http(status), {**body, "ResponseMetadata": {}}))


def inject_error(session, service: str, operation: str, code: str, message: str) -> None:
    inject(session, service, operation, {"Error": {"Code": code, "Message": message}}, 400)


def use_session(monkeypatch, session):
    monkeypatch.setattr(aws_ops, "_session", lambda region: session)


def one_error_line(captured) -> str:
    err = captured.err.strip()
    assert "Traceback" not in err and "Traceback" not in captured.out
    assert err.count("\n") == 0, err
    assert err.startswith("error: ")
    return err


TF_OUTPUTS = {
    "name": {"value": NAME}, "region": {"value": REGION}, "ssh_user": {"value": "ubuntu"},
    "api_endpoint": {"value": "https://ec2-198-51-100-10.compute-1.amazonaws.com"},
    "api_tls_trusted": {"value": False}, "model_bucket_name": {"value": None},
    "vpc_cidr": {"value": "10.42.0.0/16"},
    # one host: no shared rate-limit cache
    "cache_endpoint": {"value": None}, "cache_port": {"value": None},
    "cache_auth_token_ssm_parameter": {"value": None}, "cache_subnet_cidrs": {"value": []},
    "hosts": {"value": [{
        "name": "llm-gpu-0", "instance_id": "i-0123456789abcdef0", "instance_type": "g5.xlarge",
        "availability_zone": "us-east-1a", "private_ip": "10.42.0.10",
        "public_ip": "198.51.100.10", "public_dns": "ec2-198-51-100-10.compute-1.amazonaws.com",
        "models_volume_id": "vol-0123456789abcdef0",
    }]},
}


# ---- inventory ----------------------------------------------------------------------------------


def test_inventory_finds_hosts_by_tags_when_terraform_has_no_state(paths, aws, monkeypatch):
    paths.tool("terraform", "echo '{}'\n")  # what `terraform output -json` says without state
    ours = make_hosts(aws, count=2)
    other = make_hosts(aws, count=1, name="other")  # another deployment in the same account
    gone = make_hosts(aws, count=1, name=NAME)[0]
    aws.client("ec2").terminate_instances(InstanceIds=[gone["id"]])
    use_session(monkeypatch, aws)

    assert paths.run("inventory") == 0

    doc = yaml.safe_load(paths.out.read_text())
    group = doc["all"]["children"]["gpu_hosts"]
    assert list(group["hosts"]) == ["llm-gpu-0", "llm-gpu-1"]
    for name, made in zip(["llm-gpu-0", "llm-gpu-1"], ours, strict=True):
        host = group["hosts"][name]
        assert host["ansible_host"] == made["ip"]
        assert host["aws_instance_id"] == made["id"]
        assert host["aws_models_volume_id"] == made["volume"]
        assert host["models_volume_device"] == aws_ops.volume_device(made["volume"])
        assert host["aws_instance_type"] == "g5.xlarge"
        assert host["aws_private_ip"].startswith("10.42.0.")
    ids = {h["aws_instance_id"] for h in group["hosts"].values()}
    assert other[0]["id"] not in ids and gone["id"] not in ids
    assert group["vars"]["ansible_user"] == "ubuntu"
    assert group["vars"]["aws_region"] == REGION
    assert "StrictHostKeyChecking=accept-new" in group["vars"]["ansible_ssh_common_args"]
    # several hosts sit behind a load balancer only Terraform knows about
    assert group["vars"]["api_endpoint"] is None
    assert list(doc["all"]["children"]["monitoring"]["hosts"]) == ["llm-gpu-0"]


def test_inventory_keeps_the_address_of_a_stopped_host(paths, aws, monkeypatch):
    paths.tool("terraform", "exit 1\n")  # e.g. a backend that needs `terraform init`
    made = make_hosts(aws, count=1)[0]
    aws.client("ec2").stop_instances(InstanceIds=[made["id"]])
    use_session(monkeypatch, aws)

    assert paths.run("inventory", "--source", "ec2") == 0

    group = yaml.safe_load(paths.out.read_text())["all"]["children"]["gpu_hosts"]
    assert group["hosts"]["llm-gpu-0"]["ansible_host"] == made["ip"]
    assert group["vars"]["api_endpoint"].startswith("https://")


def test_inventory_prefers_terraform_outputs(paths, capsys):
    paths.tool("terraform", f"""\
        case "$*" in *"output -json"*) cat <<'EOF'
        {json.dumps(TF_OUTPUTS)}
        EOF
        ;; *) exit 1 ;; esac
        """)
    # no moto and no credentials: a call to AWS would fail this test

    assert paths.run("inventory") == 0

    doc = yaml.safe_load(paths.out.read_text())
    group = doc["all"]["children"]["gpu_hosts"]
    assert group["hosts"]["llm-gpu-0"]["ansible_host"] == "198.51.100.10"
    assert group["hosts"]["llm-gpu-0"]["aws_models_volume_id"] == "vol-0123456789abcdef0"
    assert group["vars"]["api_endpoint"] == "https://ec2-198-51-100-10.compute-1.amazonaws.com"
    assert group["vars"]["api_tls_trusted"] is False
    assert "from terraform" in capsys.readouterr().out
    # the inventory answers `endpoint` without AWS or terraform
    assert paths.run("endpoint") == 0 and paths.run("endpoint", "--tls") == 0
    assert capsys.readouterr().out.split() == [
        "https://ec2-198-51-100-10.compute-1.amazonaws.com", "self-signed"]


def _terraform_says(paths, outputs: dict) -> None:
    paths.tool("terraform", f"""\
        case "$*" in *"output -json"*) cat <<'EOF'
        {json.dumps(outputs)}
        EOF
        ;; *) exit 1 ;; esac
        """)


# ---- test only: the simulated deploy's address map (tests/infra/simulated_aws.py) ------------


def _simulating(paths, monkeypatch, tmp_path, mapping) -> None:
    _terraform_says(paths, TF_OUTPUTS)
    path = tmp_path / "addresses.yml"
    path.write_text(yaml.safe_dump(mapping) if not isinstance(mapping, str) else mapping)
    monkeypatch.setenv(aws_ops.SIM_ADDRESSES_ENV, str(path))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the emulator's


def test_simulation_points_ssh_and_the_endpoint_at_the_test_host(paths, monkeypatch, tmp_path,
                                                                 capsys):
    _simulating(paths, monkeypatch, tmp_path, {"llm-gpu-0": "10.213.0.11"})
    assert paths.run("inventory") == 0
    assert "SIMULATION" in capsys.readouterr().out
    group = yaml.safe_load(paths.out.read_text())["all"]["children"]["gpu_hosts"]
    host = group["hosts"]["llm-gpu-0"]
    assert host["ansible_host"] == "10.213.0.11"
    # what Terraform said stays as it said it; only where the tools connect moves
    assert host["aws_public_dns"] == "ec2-198-51-100-10.compute-1.amazonaws.com"
    assert host["aws_instance_id"] == "i-0123456789abcdef0"
    assert group["vars"]["api_endpoint"] == "https://10.213.0.11"
    assert paths.run("endpoint") == 0
    assert capsys.readouterr().out.split() == ["https://10.213.0.11"]
    argv = aws_ops.ssh_argv(aws_ops.read_inventory(paths.out),
                            aws_ops.read_inventory(paths.out).hosts[0], None)
    assert argv[-1] == "ubuntu@10.213.0.11"


@pytest.mark.parametrize("mapping, says", [
    ({"llm-gpu-9": "10.213.0.11"}, "has no address for llm-gpu-0"),
    ({"llm-gpu-0": "ec2-198-51-100-10.compute-1.amazonaws.com"}, "is not an IP address"),
    ("[10.213.0.11]", "want a YAML mapping of host name to address"),
], ids=["host-missing", "not-an-address", "not-a-mapping"])
def test_a_bad_simulation_map_is_one_clear_line(paths, monkeypatch, tmp_path, capsys, mapping,
                                                says):
    _simulating(paths, monkeypatch, tmp_path, mapping)
    assert paths.run("inventory") == 2
    assert says in one_error_line(capsys.readouterr())
    assert not paths.out.exists()


def test_a_missing_simulation_map_is_one_clear_line(paths, monkeypatch, tmp_path, capsys):
    _terraform_says(paths, TF_OUTPUTS)
    monkeypatch.setenv(aws_ops.SIM_ADDRESSES_ENV, str(tmp_path / "nothing.yml"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert paths.run("inventory") == 2
    assert "unset it for a real one" in one_error_line(capsys.readouterr())


def test_the_simulation_map_is_refused_against_real_aws(paths, monkeypatch, tmp_path, capsys):
    _simulating(paths, monkeypatch, tmp_path, {"llm-gpu-0": "10.213.0.11"})
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert paths.run("inventory") == 2
    assert "for the simulated deploy against an AWS emulator only" in one_error_line(
        capsys.readouterr())
    assert not paths.out.exists()


MODELS_ROLE_OPTIONS = yaml.safe_load(
    (aws_ops.ROOT / "ansible/roles/models/meta/argument_specs.yml").read_text()
)["argument_specs"]["main"]["options"]


def test_models_volume_maps_to_its_stable_nvme_path(paths):
    _terraform_says(paths, TF_OUTPUTS)
    assert paths.run("inventory") == 0

    host = yaml.safe_load(paths.out.read_text())["all"]["children"]["gpu_hosts"]["hosts"][
        "llm-gpu-0"]
    # the models role's own variable, so the role formats and mounts that very disk
    assert "models_volume_device" in MODELS_ROLE_OPTIONS
    assert host["models_volume_device"] == (
        "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0")
    assert host["aws_models_volume_id"] == "vol-0123456789abcdef0"


@pytest.mark.parametrize("bad", ["vol0123456789abcdef0", "vol-xyz", "/dev/nvme1n1", ""])
def test_a_volume_id_that_is_not_one_is_refused(bad):
    with pytest.raises(aws_ops.OpsError):
        aws_ops.volume_device(bad)


def test_model_bucket_becomes_the_models_s3_cache(paths):
    url = "s3://llm-models-20250101000000000000000001/hf-cache"
    _terraform_says(paths, {**TF_OUTPUTS,
                            "model_bucket_name": {"value": "llm-models-20250101000000000000000001"},
                            "model_cache_url": {"value": url}})
    assert paths.run("inventory") == 0

    group = yaml.safe_load(paths.out.read_text())["all"]["children"]["gpu_hosts"]
    assert "models_s3_cache" in MODELS_ROLE_OPTIONS
    assert group["vars"]["models_s3_cache"] == url
    assert aws_ops.read_inventory(paths.out).model_cache_url == url


def test_no_bucket_leaves_the_cache_off(paths):
    _terraform_says(paths, TF_OUTPUTS)  # model_bucket_name null, no model_cache_url
    assert paths.run("inventory") == 0

    group = yaml.safe_load(paths.out.read_text())["all"]["children"]["gpu_hosts"]
    # absent, so the role's default (no cache) applies
    assert "models_s3_cache" not in group["vars"]


MONITORING_ROLE_OPTIONS = yaml.safe_load(
    (aws_ops.ROOT / "ansible/roles/monitoring/meta/argument_specs.yml").read_text()
)["argument_specs"]["main"]["options"]
ALERT_TOPIC = "arn:aws:sns:us-east-1:123456789012:llm-alerts"


def test_the_alert_topic_routes_the_monitoring_hosts_alerts_to_sns(paths):
    _terraform_says(paths, {**TF_OUTPUTS, "alert_topic_arn": {"value": ALERT_TOPIC}})
    assert paths.run("inventory") == 0

    doc = yaml.safe_load(paths.out.read_text())["all"]["children"]
    monitoring = doc["monitoring"]["vars"]
    # the monitoring role's own variables, set where the role runs
    assert {"monitoring_alert_receiver", "monitoring_alert_sns_topic_arn"} <= set(
        MONITORING_ROLE_OPTIONS)
    assert monitoring["monitoring_alert_receiver"] == "sns"
    assert monitoring["monitoring_alert_sns_topic_arn"] == ALERT_TOPIC
    assert "monitoring_alert_receiver" not in doc["gpu_hosts"]["vars"]
    assert aws_ops.read_inventory(paths.out).alert_topic_arn == ALERT_TOPIC


def test_without_a_topic_the_roles_default_receiver_applies(paths):
    _terraform_says(paths, TF_OUTPUTS)  # state from before the alerts topic existed
    assert paths.run("inventory") == 0

    monitoring = yaml.safe_load(paths.out.read_text())["all"]["children"]["monitoring"]["vars"]
    assert not any(k.startswith("monitoring_alert") for k in monitoring)
    assert aws_ops.read_inventory(paths.out).alert_topic_arn is None


def test_inventory_from_terraform_without_state_says_what_to_do(paths, capsys):
    paths.tool("terraform", "echo '{}'\n")
    assert paths.run("inventory", "--source", "terraform") == 2
    assert "make deploy" in one_error_line(capsys.readouterr())


def test_no_tagged_hosts_is_a_clear_error(paths, aws, monkeypatch, capsys):
    paths.tool("terraform", "echo '{}'\n")
    use_session(monkeypatch, aws)
    assert paths.run("inventory") == 2
    assert "no GPU hosts tagged Project=llm" in one_error_line(capsys.readouterr())


def test_region_and_name_come_from_terraform_tfvars(paths, aws, monkeypatch):
    (paths.tf / "terraform.tfvars").write_text(
        'admin_cidrs = ["203.0.113.7/32"]\nname   = "other"  # second deployment\n'
        'region = "eu-west-1"\n')
    paths.tool("terraform", "echo '{}'\n")
    seen = {}

    def session_for(region):
        seen["region"] = region
        return aws

    make_hosts(aws, count=1, name="other")
    monkeypatch.setattr(aws_ops, "_session", session_for)

    assert paths.run("inventory") == 0
    assert seen["region"] == "eu-west-1"
    assert list(yaml.safe_load(paths.out.read_text())["all"]["children"]["gpu_hosts"]["hosts"]) \
        == ["other-gpu-0"]


# ---- stop / start --------------------------------------------------------------------------------


def test_stop_then_start_keeps_volumes_and_addresses(paths, aws, monkeypatch, capsys):
    paths.tool("terraform", "echo '{}'\n")
    made = make_hosts(aws, count=2)
    ids = [h["id"] for h in made]
    use_session(monkeypatch, aws)
    ec2 = aws.client("ec2")

    assert paths.run("stop", "--poll", "1") == 0
    assert states(aws, ids) == ["stopped", "stopped"]
    addresses = {a["AllocationId"]: a.get("InstanceId") for a in ec2.describe_addresses()[
        "Addresses"]}
    assert all(addresses[h["allocation"]] == h["id"] for h in made)
    volumes = ec2.describe_volumes(VolumeIds=[h["volume"] for h in made])["Volumes"]
    assert [v["Attachments"][0]["InstanceId"] for v in volumes] == ids

    assert paths.run("start", "--poll", "1") == 0
    assert states(aws, ids) == ["running", "running"]
    assert "running" in capsys.readouterr().out


def test_stop_touches_no_other_deployment(paths, aws, monkeypatch):
    paths.tool("terraform", "echo '{}'\n")
    ours = make_hosts(aws, count=1)[0]
    theirs = make_hosts(aws, count=1, name="other")[0]
    use_session(monkeypatch, aws)

    assert paths.run("stop", "--poll", "1") == 0
    assert states(aws, [ours["id"], theirs["id"]]) == ["stopped", "running"]


def test_start_over_the_vcpu_quota_is_one_clear_line(paths, aws, monkeypatch, capsys):
    paths.tool("terraform", "echo '{}'\n")
    made = make_hosts(aws, count=1)[0]
    aws.client("ec2").stop_instances(InstanceIds=[made["id"]])
    inject_error(aws, "ec2", "StartInstances", "VcpuLimitExceeded",
                 "You have requested more vCPU capacity than your current vCPU limit of 0 allows "
                 "for the instance bucket that the specified instance type belongs to.")
    use_session(monkeypatch, aws)

    assert paths.run("start") == 2
    err = one_error_line(capsys.readouterr())
    assert "vCPU quota" in err and "L-DB2E81BA" in err and "request-service-quota-increase" in err
    assert states(aws, [made["id"]]) == ["stopped"]


# ---- preflight -----------------------------------------------------------------------------------


TFVARS = 'admin_cidrs = ["203.0.113.7/32"]\nssh_public_key = "ssh-ed25519 AAAAC3Nza test"\n'


@pytest.fixture
def tools(paths):
    for tool in ("terraform", "ansible-playbook", "ssh", "curl"):
        paths.tool(tool, "exit 0\n")
    (paths.tf / "terraform.tfvars").write_text(TFVARS)
    return paths


def test_preflight_asks_for_the_settings_first(tools, capsys):
    (tools.tf / "terraform.tfvars").unlink()
    assert tools.run("preflight") == 2
    err = one_error_line(capsys.readouterr())
    assert "terraform.tfvars.example" in err and "admin_cidrs" in err


def test_preflight_passes_where_g5_is_offered(tools, aws, monkeypatch, capsys):
    use_session(monkeypatch, aws)
    assert tools.run("preflight") == 0
    out = capsys.readouterr().out
    assert "g5.xlarge is offered in us-east-1a" in out
    # moto does not model EC2 quotas: unreadable quotas are reported, not fatal
    assert "vCPU quota not readable" in out and "needs 4 vCPUs" in out


def test_preflight_refuses_a_region_without_g5(tools, aws, monkeypatch, capsys):
    # af-south-1 has no g5 in moto's copy of the EC2 offerings (nor did it in AWS's)
    use_session(monkeypatch, boto3.Session(region_name="af-south-1"))
    assert tools.run("--region", "af-south-1", "preflight") == 2
    err = one_error_line(capsys.readouterr())
    assert "region af-south-1 does not offer g5.xlarge" in err and "terraform.tfvars" in err


def test_preflight_refuses_a_quota_below_the_hosts(tools, aws, monkeypatch, capsys):
    inject(aws, "service-quotas", "GetServiceQuota",
           {"Quota": {"QuotaCode": "L-DB2E81BA", "Value": 4.0}})
    use_session(monkeypatch, aws)

    assert tools.run("preflight", "--count", "1") == 0
    assert "vCPU quota for G and VT instances: 4" in capsys.readouterr().out

    assert tools.run("preflight", "--count", "3") == 2
    err = one_error_line(capsys.readouterr())
    assert "allows 4 vCPUs, the g5.xlarge hosts need 12" in err and "L-DB2E81BA" in err


def test_preflight_reads_auto_tfvars_as_terraform_does(tools, aws, monkeypatch, capsys):
    # Terraform: terraform.tfvars, then *.auto.tfvars by name, each later file winning; the
    # environment only fills what no file sets
    (tools.tf / "terraform.tfvars").write_text('instance_type = "g5.xlarge"\nhost_count = 1\n')
    (tools.tf / "a.auto.tfvars").write_text(TFVARS + 'instance_type = "g6.xlarge"\n')
    (tools.tf / "zz.auto.tfvars.json").write_text('{"instance_type": "g5.2xlarge", '
                                                   '"host_count": 2}')
    monkeypatch.setenv("TF_VAR_instance_type", "g4dn.xlarge")
    inject(aws, "service-quotas", "GetServiceQuota",
           {"Quota": {"QuotaCode": "L-DB2E81BA", "Value": 12.0}})
    use_session(monkeypatch, aws)

    assert tools.run("preflight") == 2
    err = one_error_line(capsys.readouterr())
    # two g5.2xlarge hosts of 8 vCPUs each
    assert "allows 12 vCPUs, the g5.2xlarge hosts need 16" in err


def test_preflight_takes_the_keys_from_an_auto_tfvars_file(tools, aws, monkeypatch, capsys):
    (tools.tf / "terraform.tfvars").unlink()
    (tools.tf / "secrets.auto.tfvars").write_text(TFVARS)
    use_session(monkeypatch, aws)
    assert tools.run("preflight") == 0
    (tools.tf / "secrets.auto.tfvars").write_text('admin_cidrs = ["203.0.113.7/32"]\n')
    assert tools.run("preflight") == 2
    err = one_error_line(capsys.readouterr())
    assert "ssh_public_key not set" in err and "auto.tfvars" in err


def test_preflight_subtracts_the_g_instances_already_running(tools, aws, monkeypatch, capsys):
    ec2 = aws.client("ec2")
    # another team's g5.xlarge (4 vCPUs) and a CPU instance, which the G quota does not count
    for kind in ("g5.xlarge", "m5.large"):
        ec2.run_instances(ImageId=AMI, InstanceType=kind, MinCount=1, MaxCount=1)
    make_hosts(aws, count=1)  # this deployment's own host: Terraform keeps it, no new vCPUs
    inject(aws, "service-quotas", "GetServiceQuota",
           {"Quota": {"QuotaCode": "L-DB2E81BA", "Value": 8.0}})
    use_session(monkeypatch, aws)

    assert tools.run("preflight", "--count", "1") == 0
    assert "other running instances take 4, this deployment needs 4" in capsys.readouterr().out

    assert tools.run("preflight", "--count", "2") == 2
    err = one_error_line(capsys.readouterr())
    assert ("allows 8 vCPUs, 4 of them taken by other running G and VT instances, the "
            "g5.xlarge hosts need 8") in err
    assert "--desired-value 12" in err


def test_preflight_does_not_count_local_zones(tools, aws, monkeypatch, capsys):
    # moto offers g5.xlarge in us-east-1a ... f; say the region's regular zones (what AWS
    # answers with the opt-in-not-required filter) are only us-east-1a: Local Zones that offer
    # the type must not make up the second zone
    asked = []
    aws.events.register("before-parameter-build.ec2.DescribeAvailabilityZones",
                        lambda params, **_: asked.append(dict(params)))
    inject(aws, "ec2", "DescribeAvailabilityZones", {"AvailabilityZones": [
        {"ZoneName": "us-east-1a", "ZoneType": "availability-zone", "State": "available"}]})
    use_session(monkeypatch, aws)
    assert tools.run("preflight") == 2
    err = one_error_line(capsys.readouterr())
    assert "offers g5.xlarge in one zone only (us-east-1a)" in err
    filters = {f["Name"]: f["Values"] for f in asked[0]["Filters"]}
    assert filters["opt-in-status"] == ["opt-in-not-required"]


def test_missing_aws_credentials_is_one_clear_line(tools, capsys):
    # no moto: botocore looks for credentials, finds none and must not reach the network
    assert tools.run("preflight") == 2
    err = one_error_line(capsys.readouterr())
    assert "AWS credentials not found" in err and "aws configure" in err
    assert tools.run("stop") == 2
    assert "AWS credentials not found" in one_error_line(capsys.readouterr())


def test_rejected_credentials_are_one_clear_line(tools, aws, monkeypatch, capsys):
    inject_error(aws, "sts", "GetCallerIdentity", "InvalidClientTokenId",
                 "The security token included in the request is invalid.")
    use_session(monkeypatch, aws)
    assert tools.run("preflight") == 2
    assert "AWS rejected the credentials (InvalidClientTokenId)" in one_error_line(
        capsys.readouterr())


def test_missing_terraform_is_one_clear_line(paths, capsys):
    assert paths.run("terraform", "plan") == 2
    assert "terraform not found" in one_error_line(capsys.readouterr())
    (paths.tf / "terraform.tfvars").write_text(TFVARS)
    paths.tool("ansible-playbook", "exit 0\n")
    assert paths.run("preflight") == 2
    assert "install Terraform" in one_error_line(capsys.readouterr())


def test_missing_ansible_is_one_clear_line(paths, capsys):
    for tool in ("terraform", "ssh", "curl"):
        paths.tool(tool, "exit 0\n")
    assert paths.run("preflight") == 2
    assert "ansible-playbook not found" in one_error_line(capsys.readouterr())


# ---- terraform wrapper ---------------------------------------------------------------------------


def test_terraform_quota_failure_is_explained(paths, capsys):
    paths.tool("terraform", """\
        case "$*" in
          *" init "*|*" init") echo "Terraform has been successfully initialized!" ;;
          *) echo "Error: creating EC2 Instance: operation error EC2: RunInstances, api error \
VcpuLimitExceeded: You have requested more vCPU capacity than your current vCPU limit of 0"
             exit 1 ;;
        esac
        """)
    assert paths.run("terraform", "apply") == 1
    captured = capsys.readouterr()
    assert "successfully initialized" in captured.out and "RunInstances" in captured.out
    assert "vCPU quota" in captured.err and "L-DB2E81BA" in captured.err


@pytest.mark.parametrize(("printed", "explained"), [
    # coloured, boxed and wrapped the way Terraform prints errors
    ("\x1b[31m│\x1b[0m Error: No valid credential sources found\n", "AWS credentials not found"),
    ("│ Error: creating EC2 Instance: api error Unsupported: Your\n│ requested instance type "
     "(g5.xlarge) is not supported in your requested\n│ Availability Zone (us-east-1e).",
     "not offered where it was requested"),
    ("│ api error InsufficientInstanceCapacity: We currently do not have sufficient",
     "no spare capacity"),
    ("Error: Invalid value for variable", None),
])
def test_terraform_errors_users_can_fix_are_explained(printed, explained):
    hint = aws_ops.explain_terraform_failure(printed, REGION, "g5.xlarge")
    assert (hint is None) if explained is None else (explained in hint)


def test_terraform_runs_init_then_the_command_in_the_terraform_dir(paths, tmp_path):
    log = tmp_path / "calls"
    paths.tool("terraform", f'echo "$*" >> {log}\n')
    assert paths.run("terraform", "plan", "-input=false") == 0
    assert log.read_text().splitlines() == [
        f"-chdir={paths.tf} init -input=false", f"-chdir={paths.tf} plan -input=false"]


# ---- status and wait-ssh -------------------------------------------------------------------------


# The one remote command `make status` runs, written out: the unit names are those the roles
# install (Debian/Ubuntu's node exporter is prometheus-node-exporter.service).
STATUS_COMMAND = (
    "systemctl list-units --all --no-legend --plain --type=service nginx.service "
    "gateway.service 'vllm@*.service' prometheus-node-exporter.service dcgm-exporter.service "
    "prometheus.service prometheus-alertmanager.service; "
    "echo \"ready=$(curl -sk -o /dev/null -m 5 -w '%{http_code}' https://127.0.0.1/ready)\"")


def strict_ssh(paths, tmp_path, command: str, answer: str) -> None:
    """A fake ssh that answers only the exact remote command given (its last argument), as a
    host would; any other command fails the way a remote error does."""
    (tmp_path / "ssh-expected").write_text(command)
    (tmp_path / "ssh-answer").write_text(textwrap.dedent(answer))
    paths.tool("ssh", f"""\
        for a in "$@"; do last="$a"; done
        if [ "$last" = "$(cat {tmp_path / 'ssh-expected'})" ]; then
            cat {tmp_path / 'ssh-answer'}
        else
            echo "unexpected remote command: $last" >&2; exit 1
        fi
        """)


def test_status_shows_state_units_and_ready_per_host(paths, aws, monkeypatch, capsys, tmp_path):
    paths.tool("terraform", "echo '{}'\n")
    strict_ssh(paths, tmp_path, STATUS_COMMAND, """\
        gateway.service loaded active running LLM gateway
        nginx.service loaded active running nginx
        prometheus-node-exporter.service loaded active running Prometheus exporter
        prometheus-alertmanager.service loaded failed failed Alertmanager
        vllm@text2sql.service loaded activating start vLLM text2sql
        ready=503
        """)
    made = make_hosts(aws, count=2)
    aws.client("ec2").stop_instances(InstanceIds=[made[1]["id"]])
    use_session(monkeypatch, aws)

    assert paths.run("status") == 0

    lines = capsys.readouterr().out.splitlines()
    first = next(line for line in lines if line.startswith("llm-gpu-0"))
    second = next(line for line in lines if line.startswith("llm-gpu-1"))
    assert "running" in first and "503" in first
    assert "gateway=active/running" in first and "vllm@text2sql=activating/start" in first
    assert "prometheus-node-exporter=active/running" in first
    assert "prometheus-alertmanager=failed/failed" in first
    assert "stopped" in second and made[1]["ip"] in second and "gateway" not in second


def _inventory_on_loopback(paths):
    paths.tool("terraform", f"""\
        case "$*" in *"output -json"*) cat <<'EOF'
        {json.dumps({**TF_OUTPUTS, "hosts": {"value": [
            {**TF_OUTPUTS["hosts"]["value"][0], "public_ip": "127.0.0.1"}]}})}
        EOF
        ;; *) exit 1 ;; esac
        """)
    assert paths.run("inventory") == 0


def test_wait_ssh_waits_for_the_port_then_cloud_init(paths, capsys):
    _inventory_on_loopback(paths)
    paths.tool("ssh", 'case "$*" in *"cloud-init status --wait"*) echo "...."; '
                      'echo "status: done" ;; *) exit 9 ;; esac\n')
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert paths.run("wait-ssh", "--port", str(port), "--timeout", "30", "--poll", "0.1") == 0
    out = capsys.readouterr().out
    assert "SSH port open" in out and "status: done" in out


def test_wait_ssh_gives_up_with_a_hint(paths, capsys):
    _inventory_on_loopback(paths)
    paths.tool("ssh", "exit 0\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, not listening: connections are refused
        assert paths.run("wait-ssh", "--port", str(closed), "--timeout", "0.3",
                         "--poll", "0.1") == 2
    err = one_error_line(capsys.readouterr())
    assert "still closed" in err and "admin_cidrs" in err


def test_wait_ssh_reports_a_failed_cloud_init(paths, capsys):
    _inventory_on_loopback(paths)
    paths.tool("ssh", 'echo "status: error"; exit 1\n')
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert paths.run("wait-ssh", "--port", str(listener.getsockname()[1]),
                         "--timeout", "10", "--poll", "0.1") == 2
    assert "cloud-init failed" in one_error_line(capsys.readouterr())


# ---- ssh, logs, summary ------------------------------------------------------------------------


def test_ssh_runs_the_command_on_the_chosen_host_with_our_known_hosts(paths, tmp_path):
    outputs = {**TF_OUTPUTS, "hosts": {"value": [
        TF_OUTPUTS["hosts"]["value"][0],
        {**TF_OUTPUTS["hosts"]["value"][0], "name": "llm-gpu-1", "public_ip": "198.51.100.11",
         "instance_id": "i-0123456789abcdef1"}]}}
    paths.tool("terraform", f"""\
        case "$*" in *"output -json"*) cat <<'EOF'
        {json.dumps(outputs)}
        EOF
        ;; *) exit 1 ;; esac
        """)
    assert paths.run("inventory") == 0
    calls = tmp_path / "ssh-calls"
    paths.tool("ssh", f'for a in "$@"; do printf "%s\\n" "$a"; done > {calls}\n')

    assert paths.run("ssh", "--host", "llm-gpu-1", "--", "nvidia-smi -L") == 0
    argv = calls.read_text().splitlines()
    assert argv[-2:] == ["ubuntu@198.51.100.11", "nvidia-smi -L"]
    assert f"UserKnownHostsFile={aws_ops.KNOWN_HOSTS}" in argv and "BatchMode=yes" in argv

    assert paths.run("logs", "vllm@text2sql", "--host", "1") == 0
    argv = calls.read_text().splitlines()
    assert argv[-9:] == ["ubuntu@198.51.100.11", "sudo", "journalctl", "--no-pager", "-u",
                         "vllm@text2sql.service", "-n", "100", "-f"]


def test_ssh_to_an_unknown_host_lists_the_known_ones(paths, capsys):
    _inventory_on_loopback(paths)
    paths.tool("ssh", "exit 0\n")
    assert paths.run("ssh", "--host", "gpu-9") == 2
    assert "hosts: llm-gpu-0" in one_error_line(capsys.readouterr())


def test_summary_gives_the_endpoint_and_a_key_command(paths, capsys):
    _inventory_on_loopback(paths)
    capsys.readouterr()
    assert paths.run("summary") == 0
    out = capsys.readouterr().out
    assert 'base_url="https://ec2-198-51-100-10.compute-1.amazonaws.com/v1"' in out
    assert "python -m app.keys --file /etc/llm-gateway/keys.json create my-app" in out
    assert "curl -k https://" in out


def test_ansible_reads_the_written_inventory(paths):
    ansible_inventory = Path(sys.executable).parent / "ansible-inventory"
    if not ansible_inventory.exists():
        pytest.fail("ansible-inventory is missing from the venv: run `make deps`")
    _inventory_on_loopback(paths)
    proc = subprocess.run([str(ansible_inventory), "-i", str(paths.out), "--list"],
                          capture_output=True, text=True,
                          env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["gpu_hosts"]["hosts"] == ["llm-gpu-0"]
    assert seen["monitoring"]["hosts"] == ["llm-gpu-0"]
    host = seen["_meta"]["hostvars"]["llm-gpu-0"]
    assert host["ansible_host"] == "127.0.0.1" and host["ansible_user"] == "ubuntu"
    assert host["aws_instance_id"] == "i-0123456789abcdef0"
    assert host["models_volume_device"].endswith("_vol0123456789abcdef0")


# ---- Grafana's admin password ------------------------------------------------------------------


def test_inventory_makes_grafana_password_once_and_keeps_it_out_of_the_inventory(paths, capsys):
    _terraform_says(paths, TF_OUTPUTS)
    assert paths.run("inventory") == 0
    stored = aws_ops.GRAFANA_PASSWORD
    password = stored.read_text().strip()
    assert len(password) >= 20
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert capsys.readouterr().out.count(password) == 1  # shown once
    assert password not in paths.out.read_text()

    assert paths.run("inventory") == 0  # again: same password, not shown again
    assert stored.read_text().strip() == password
    assert password not in capsys.readouterr().out


def test_an_emptied_password_file_is_a_clear_error(paths, capsys):
    _terraform_says(paths, TF_OUTPUTS)
    aws_ops.GRAFANA_PASSWORD.parent.mkdir(parents=True)
    aws_ops.GRAFANA_PASSWORD.write_text("\n")
    assert paths.run("inventory") == 2
    assert "grafana-admin-password is empty" in capsys.readouterr().err


def test_ansible_gets_the_stored_grafana_password_on_the_monitoring_host(paths):
    ansible = Path(sys.executable).parent / "ansible"
    _terraform_says(paths, TF_OUTPUTS)
    assert paths.run("inventory") == 0
    # the monitoring role's own variable, so its preflight finds the password set
    options = yaml.safe_load((aws_ops.ROOT / "ansible/roles/monitoring/meta/argument_specs.yml")
                             .read_text())["argument_specs"]["main"]["options"]
    assert "monitoring_grafana_admin_password" in options
    # debug runs on the controller: no connection to the (fake) host is made
    proc = subprocess.run(
        [str(ansible), "monitoring", "-i", str(paths.out), "-m", "ansible.builtin.debug",
         "-a", "var=monitoring_grafana_admin_password", "--one-line"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PATH": "/usr/bin:/bin", "ANSIBLE_NOCOLOR": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    host, _, result = proc.stdout.partition(" | SUCCESS => ")
    assert host == "llm-gpu-0", proc.stdout
    result = json.loads(result)
    assert result["monitoring_grafana_admin_password"] == (
        aws_ops.GRAFANA_PASSWORD.read_text().strip())


def test_status_asks_for_the_units_the_roles_start():
    """Each unit `make status` lists is one an Ansible role manages by that exact name."""
    roles = Path(aws_ops.ROOT) / "ansible" / "roles"
    managed = set()
    for tasks in roles.glob("*/tasks/*.yml"):
        for task in yaml.safe_load(tasks.read_text()) or []:
            for module in ("ansible.builtin.systemd_service", "ansible.builtin.systemd"):
                if isinstance(task.get(module), dict) and "name" in task[module]:
                    managed.add(task[module]["name"])
    assert "vllm@.service" in {p.name for p in (Path(aws_ops.ROOT) / "systemd").iterdir()} \
        or "vllm@.service.j2" in {p.name for p in (Path(aws_ops.ROOT) / "systemd").iterdir()}
    missing = [u for u in aws_ops.UNITS if "*" not in u and u not in managed]
    assert not missing, f"no role manages {missing}"


# ---- smoke-gpu ----------------------------------------------------------------------------------

KEY = "sk-smoke-0123456789abcdef"
# the exact remote commands of a healthy run, for the committed declaration and role defaults
SMOKE_DRIVER = "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"
SMOKE_DCGM = "curl -sS -f -m 10 http://127.0.0.1:9400/metrics"


def smoke_engine(name: str, port: int) -> str:
    return (f"systemctl is-active vllm@{name}.service; curl -s -o /dev/null -m 5 "
            f"-w '%{{http_code}}' http://127.0.0.1:{port}/health")


def smoke_request(path: str, body: str, timeout: int) -> str:
    return (f"curl -sS -m {timeout} -H @- -H 'Content-Type: application/json' --data-binary "
            f"'{body}' -w '\\n%{{http_code}} %{{time_total}}' http://127.0.0.1:8080{path}")


SMOKE_COMPLETION = smoke_request(
    "/v1/completions",
    '{"model":"text2sql","prompt":"SELECT","max_tokens":4,"temperature":0}', 120)
SMOKE_MEMORY = ("nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits"
                " | while IFS=', ' read -r pid mib; do"
                " echo \"$pid $mib $(ps -o unit= -p \"$pid\")\"; done")
DCGM_METRICS = "".join(
    f'# HELP {n} help\n# TYPE {n} gauge\n{n}{{gpu="0",modelName="NVIDIA A10G"}} {v}\n'
    for n, v in [
        ("DCGM_FI_DEV_GPU_UTIL", 3), ("DCGM_FI_DEV_FB_USED", 20511),
        ("DCGM_FI_DEV_FB_FREE", 2011), ("DCGM_FI_DEV_GPU_TEMP", 41),
        ("DCGM_FI_DEV_POWER_USAGE", "61.204000"), ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", 0),
        ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 0), ("DCGM_FI_DEV_XID_ERRORS", 0)])


def healthy_host() -> dict[str, tuple[int, str]]:
    """What a converged g5.xlarge answers to each exact command: (exit status, stdout)."""
    done = '{"choices":[{"text":" name FROM"}],"usage":{"completion_tokens":4}}\n200 0.412'
    return {
        SMOKE_DRIVER: (0, "NVIDIA A10G, 23028 MiB, 580.95.05\n"),
        SMOKE_DCGM: (0, DCGM_METRICS),
        smoke_engine("text2sql", 8000): (0, "active\n200"),
        smoke_engine("sqlcoder", 8001): (0, "active\n200"),
        smoke_engine("embed", 8002): (0, "active\n200"),
        SMOKE_COMPLETION: (0, done),
        smoke_request("/v1/completions", '{"model":"sqlcoder","prompt":"SELECT",'
                      '"max_tokens":4,"temperature":0}', 120): (0, done),
        smoke_request("/v1/embeddings", '{"model":"embed","input":"smoke test"}', 30):
            (0, '{"data":[{"embedding":[' + ",".join(["0.1"] * 384) + "]}]}\n200 0.051"),
        SMOKE_MEMORY: (0, "4242 5880 vllm@text2sql.service\n4343 14390 vllm@sqlcoder.service\n"
                          "4444 852 vllm@embed.service\n"),
    }


def scripted_ssh(paths, tmp_path, answers: dict[str, tuple[int, str]]) -> Path:
    """A fake ssh answering only the exact remote commands scripted (its last argument); any
    other command fails as a remote error would. Each call's argv and stdin go to the log."""
    (tmp_path / "ssh-script.json").write_text(json.dumps(answers))
    log = tmp_path / "ssh-log.jsonl"
    script = paths.bin / "ssh"
    script.write_text(f"""#!{sys.executable}
import json, sys
answers = json.load(open({str(tmp_path / 'ssh-script.json')!r}))
remote = sys.argv[-1]
with open({str(log)!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "stdin": sys.stdin.read()}}) + "\\n")
if remote not in answers:
    print("unexpected remote command: " + remote, file=sys.stderr)
    sys.exit(1)
rc, out = answers[remote]
sys.stdout.write(out)
sys.exit(rc)
""")
    script.chmod(0o755)
    return log


def smoke(paths, tmp_path, monkeypatch, answers) -> tuple[int, Path]:
    _inventory_on_loopback(paths)
    monkeypatch.setenv("LLM_API_KEY", KEY)
    log = scripted_ssh(paths, tmp_path, answers)
    return paths.run("smoke-gpu"), log


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_smoke_gpu_on_a_healthy_host_prints_the_table(paths, tmp_path, monkeypatch, capsys):
    rc, log = smoke(paths, tmp_path, monkeypatch, healthy_host())
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = {line.split()[0] + (" " + line.split()[1] if line.split()[0] in
                               ("engine", "completion", "embedding", "gpu") else ""): line
            for line in out.splitlines() if line.startswith("  ")}
    assert "ok" in rows["driver"] and "NVIDIA A10G, 23028 MiB, driver 580.95.05" in rows["driver"]
    assert "8/8 alert fields, GPU 41 C" in rows["dcgm"]
    assert "vllm@sqlcoder.service active, /health 200 on :8001" in rows["engine sqlcoder"]
    assert "HTTP 200, 4 tokens, 0.41 s" in rows["completion text2sql"]
    assert "384 dimensions" in rows["embedding embed"]
    assert "info" in rows["gpu memory"] and "sqlcoder 14390/" in rows["gpu memory"]
    assert "all checks passed" in out
    # every command of a healthy run, in order, once; the key only ever on stdin
    seen = calls(log)
    assert [c["argv"][-1] for c in seen] == list(healthy_host())
    assert all(KEY not in " ".join(c["argv"]) for c in seen)
    requests = [c for c in seen if "/v1/" in c["argv"][-1]]
    assert len(requests) == 3 and all(c["stdin"] == f"Authorization: Bearer {KEY}\n"
                                      for c in requests)
    assert all(c["stdin"] == "" for c in seen if c not in requests)
    assert KEY not in out


@pytest.mark.parametrize("command, answer, last_check, says, hint", [
    (SMOKE_DRIVER, (0, "Tesla T4, 15360 MiB, 580.95.05\n"), "driver",
     "expected NVIDIA A10G (g5.xlarge), nvidia-smi reports Tesla T4", "instance_type"),
    (SMOKE_DRIVER, (0, "NVIDIA A10G, 23028 MiB, 570.133.20\n"), "driver",
     "driver 570.133.20 is not of the pinned branch 580", "nvidia_driver_keep_working"),
    (SMOKE_DRIVER, (9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
                       "driver.\n"), "driver", "nvidia-smi does not answer", "dmesg"),
    # its HELP and TYPE lines stay: only a sample counts
    (SMOKE_DCGM, (0, DCGM_METRICS.replace('DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{', 'DCGM_OTHER{')),
     "dcgm", "lacks DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "make logs UNIT=dcgm-exporter"),
    (smoke_engine("sqlcoder", 8001), (3, "failed\n000"), "engine sqlcoder",
     "vllm@sqlcoder.service is failed", "make logs UNIT=vllm@sqlcoder"),
    (smoke_engine("embed", 8002), (0, "active\n503"), "engine embed",
     "/health on :8002 answered 503", "make logs UNIT=vllm@embed"),
    (SMOKE_COMPLETION, (0, '{"error":{"message":"upstream text2sql timed out","type":'
                           '"upstream_error","code":"upstream_timeout"}}\n504 120.001'),
     "completion text2sql", "failed: upstream text2sql timed out", "make logs UNIT=gateway"),
    (SMOKE_COMPLETION, (0, '{"error":{"message":"invalid API key","type":'
                           '"authentication_error","code":"invalid_api_key"}}\n401 0.002'),
     "completion text2sql", "invalid API key", "the gateway refused LLM_API_KEY"),
], ids=["wrong-gpu", "old-driver-branch", "no-driver", "dcgm-field-missing", "unit-failed",
        "health-503", "completion-504", "completion-401"])
def test_smoke_gpu_stops_at_the_first_failure_and_says_what_next(
        paths, tmp_path, monkeypatch, capsys, command, answer, last_check, says, hint):
    answers = healthy_host()
    answers[command] = answer
    rc, log = smoke(paths, tmp_path, monkeypatch, answers)
    out = capsys.readouterr().out
    assert rc == 1, out
    assert f"FAILED {last_check}: " in out and says in out
    next_line = next(line for line in out.splitlines() if line.strip().startswith("next:"))
    assert hint in next_line
    # stopped there: nothing after the failing command was asked
    asked = [c["argv"][-1] for c in calls(log)]
    assert asked == list(answers)[:list(answers).index(command) + 1]
    assert "smoke-gpu FAILED on llm-gpu-0" in out and KEY not in out


def test_smoke_gpu_wants_a_key_before_touching_a_host(paths, tmp_path, monkeypatch, capsys):
    _inventory_on_loopback(paths)
    monkeypatch.delenv("LLM_API_KEY", raising=False)
    log = scripted_ssh(paths, tmp_path, healthy_host())
    assert paths.run("smoke-gpu") == 2
    assert "set LLM_API_KEY" in one_error_line(capsys.readouterr())
    assert not log.exists()


def test_smoke_gpu_reads_ports_units_branch_and_fields_from_their_homes(tmp_path, monkeypatch):
    """No copied constants: a declaration with other ports and names, and other role settings,
    change the commands."""
    from stack import declaration, gpu_smoke

    exp = gpu_smoke.expected("g5.xlarge")
    roles = Path(aws_ops.ROOT) / "ansible" / "roles"
    models = declaration.load()
    cmds = gpu_smoke.commands(exp)
    for m in models:
        assert any(f"vllm@{m.name}.service" in c and f"127.0.0.1:{m.port}/health" in c
                   for c in cmds)
    gateway = yaml.safe_load((roles / "gateway/defaults/main.yml").read_text())["gateway_port"]
    assert sum(f"127.0.0.1:{gateway}/v1/" in c for c in cmds) == len(models)
    dcgm = yaml.safe_load((roles / "dcgm_exporter/defaults/main.yml").read_text())
    assert f"127.0.0.1:{dcgm['dcgm_exporter_listen'].rsplit(':', 1)[1]}/metrics" in cmds[1]
    branch = yaml.safe_load((roles / "nvidia_driver/defaults/main.yml").read_text())[
        "nvidia_driver_branch"]
    assert exp.driver_branch == branch
    fields = yaml.safe_load((roles / "dcgm_exporter/vars/main.yml").read_text())[
        "dcgm_exporter_fields"]
    assert "DCGM_FI_DEV_GPU_TEMP" in exp.dcgm_fields
    assert set(exp.dcgm_fields) <= {f["name"] for f in fields}

    # now move everything: the commands follow
    moved = yaml.safe_load(declaration.DECLARATION.read_text())
    for i, m in enumerate(moved["llm_models"]):
        m["name"], m["port"] = f"other{i}", 9100 + i
    (tmp_path / "models.yml").write_text(yaml.safe_dump(moved))
    monkeypatch.setattr(declaration, "DECLARATION", tmp_path / "models.yml")
    group_vars = tmp_path / "group_vars"
    group_vars.mkdir()
    (group_vars / "site.yml").write_text(
        "nvidia_driver_branch: '590'\ngateway_port: 8181\ndcgm_exporter_listen: ':9499'\n")
    monkeypatch.setattr(gpu_smoke, "GROUP_VARS", group_vars)
    exp = gpu_smoke.expected("g5.xlarge")
    cmds = gpu_smoke.commands(exp)
    assert exp.driver_branch == "590"
    assert "http://127.0.0.1:9499/metrics" in cmds[1]
    assert "systemctl is-active vllm@other2.service" in cmds[4] and ":9102/health" in cmds[4]
    assert all("127.0.0.1:8181/v1/" in c for c in cmds[5:8])
    assert not any(":8000/" in c or "text2sql" in c for c in cmds)


def test_smoke_gpu_says_when_a_host_cannot_be_reached(paths, tmp_path, monkeypatch, capsys):
    _inventory_on_loopback(paths)
    monkeypatch.setenv("LLM_API_KEY", KEY)
    paths.tool("ssh", 'echo "ssh: connect to host 127.0.0.1 port 22: Connection refused" >&2\n'
                      "exit 255\n")
    assert paths.run("smoke-gpu") == 2
    err = one_error_line(capsys.readouterr())
    assert "llm-gpu-0 (127.0.0.1): ssh failed: ssh: connect to host" in err
    assert "admin_cidrs" in err


def test_smoke_gpu_shows_each_engines_gpu_on_a_multi_gpu_type(tmp_path, monkeypatch):
    """The planned shares come from the planner's placement: on a g5.12xlarge a pinned model
    has a GPU of its own (share of that GPU), and the memory line says which GPU."""
    from stack import declaration, gpu_smoke

    answer = healthy_host()[SMOKE_MEMORY]
    # one GPU: no GPU index, as before
    single = gpu_smoke.check_memory(gpu_smoke.expected("g5.xlarge"),
                                    lambda cmd, stdin: (answer[0], answer[1], "")).seen
    assert "of GPU" not in single and "sqlcoder 14390/" in single

    pinned = yaml.safe_load(declaration.DECLARATION.read_text())
    pinned["llm_models"][1]["gpu"] = 1  # sqlcoder
    (tmp_path / "models.yml").write_text(yaml.safe_dump(pinned))
    monkeypatch.setattr(declaration, "DECLARATION", tmp_path / "models.yml")
    exp = gpu_smoke.expected("g5.12xlarge")
    assert exp.gpus == {"text2sql": 0, "sqlcoder": 1, "embed": 2}  # spread, sqlcoder pinned
    assert exp.shares["sqlcoder"] > 0.9  # alone on GPU 1
    seen = gpu_smoke.check_memory(exp, lambda cmd, stdin: (answer[0], answer[1], "")).seen
    assert re.search(r"sqlcoder 14390/\d+ MiB \(share 0\.9\d\d of GPU 1\)", seen), seen
    assert re.search(r"text2sql 5880/\d+ MiB \(share 0\.\d+ of GPU 0\)", seen), seen
