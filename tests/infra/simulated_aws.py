"""The simulated `make deploy`: the real Makefile verbs against moto's server, with the hosts'
addresses pointed at the systemd test hosts.

Every difference from a real deploy is listed, with its reason, in simulated_aws.yml beside this
file; this module reads it and applies exactly that:

* ``Emulator``: moto's server (PyPI moto[server]) on 127.0.0.1, a free port, started here and
  stopped by its PID. It runs from this module (``python -m tests.infra.simulated_aws serve``)
  so that it can be given what AWS has and moto lacks: an Ubuntu 24.04 AMI and Canonical's SSM
  parameter naming it.
* ``Workspace``: a copy of this checkout's files (tracked and untracked, not ignored) where the
  make verbs run, so that the test's Terraform state, inventory, known_hosts and Grafana
  password never touch the checkout's own (which may hold a real deployment).
* ``prepare_login``: the test host made to look like a booted Ubuntu image: the login user with
  the key pair's key and passwordless sudo, and a cloud-init that reports done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stack import procs

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES_FILE = Path(__file__).with_name("simulated_aws.yml")
REGION = "us-east-1"  # terraform/variables.tf's default: the simulation keeps it
# the image moto is given; the ID only has to look like one
UBUNTU_AMI = {
    "ami_id": "ami-0b7f1d3c5e9a24680",
    "name": "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20261115",
    "description": "Canonical, Ubuntu, 24.04, amd64 noble image",
    "owner_id": "099720109477",
    "public": True,
    "virtualization_type": "hvm",
    "architecture": "x86_64",
    "state": "available",
    "platform": None,
    "image_type": "machine",
    "hypervisor": "xen",
    "root_device_name": "/dev/sda1",
    "root_device_type": "ebs",
    "sriov": "simple",
    "creation_date": "2026-11-15T00:00:00.000Z",
}
# files of a deployment that belong to one checkout and must not be copied into the workspace
DEPLOYMENT_FILES = ("terraform/terraform.tfvars", "terraform/terraform.tfvars.json",
                    "terraform/backend.tf", "ansible/inventories/aws/hosts.yml")


class SimulationError(Exception):
    pass


# ---- the overrides ------------------------------------------------------------------------------


def overrides() -> dict[str, dict[str, dict]]:
    """simulated_aws.yml, checked: every entry has a value and a one-line reason."""
    doc = yaml.safe_load(OVERRIDES_FILE.read_text())
    for section, entries in doc.items():
        for name, entry in entries.items():
            if not isinstance(entry, dict) or set(entry) != {"value", "why"}:
                raise SimulationError(f"{OVERRIDES_FILE.name}: {section}.{name} needs exactly "
                                      "`value` and `why`")
            if not str(entry["why"]).strip() or "\n" in str(entry["why"]).strip():
                raise SimulationError(f"{OVERRIDES_FILE.name}: {section}.{name}: `why` must be "
                                      "one line")
    return doc


def ansible_overrides(model_paths: dict[str, str]) -> dict:
    """The extra vars of the simulated site.yml run."""
    found = {k: v["value"] for k, v in overrides()["ansible"].items()}
    found["models_local_paths"] = model_paths
    return found


def fleet_overrides(endpoint: str) -> dict:
    """The extra vars the two-host site.yml run adds (tests/infra/test_site_fleet.py)."""
    found = {k: v["value"] for k, v in overrides()["fleet"].items()}
    found["gateway_aws_env"] = {**found["gateway_aws_env"], "AWS_ENDPOINT_URL": endpoint}
    return found


def terraform_overrides() -> dict[str, object]:
    return {k: v["value"] for k, v in overrides()["terraform"].items()}


# ---- moto ---------------------------------------------------------------------------------------


def _ssm_parameter_name() -> str:
    return overrides()["emulator"]["ssm_parameter"]["value"]


def serve(port_file: Path, region: str) -> None:
    """Run moto's server on 127.0.0.1 (a free port, written to port_file) until SIGTERM."""
    ami_file = port_file.with_suffix(".amis.json")
    ami_file.write_text(json.dumps([{**UBUNTU_AMI, "region_name": region}]))
    # read by moto at import time
    os.environ["MOTO_AMIS_PATH"] = str(ami_file)
    os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = overrides()["emulator"][
        "MOTO_IAM_LOAD_MANAGED_POLICIES"]["value"]
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.core.utils import utcnow
    from moto.server import ThreadedMotoServer
    from moto.ssm.models import Parameter, ssm_backends

    # Canonical's public parameter, as AWS serves it; moto refuses a put under /aws/
    name = _ssm_parameter_name()
    ssm_backends[DEFAULT_ACCOUNT_ID][region]._parameters[name].append(Parameter(
        account_id=DEFAULT_ACCOUNT_ID, name=name, value=UBUNTU_AMI["ami_id"],
        parameter_type="String", description=None, allowed_pattern=None, keyid=None,
        last_modified_date=utcnow(), version=1, data_type="aws:ec2:image"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(server.get_host_and_port()[1]))
    tmp.replace(port_file)
    while not stop:
        time.sleep(0.2)
    server.stop()


@dataclass
class Emulator:
    """moto's server in a process of its own, stopped by the PID it was started with."""

    workdir: Path
    region: str = REGION
    port: int = 0
    pid: int = 0
    start: int | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Emulator:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / "moto.port"
        port_file.unlink(missing_ok=True)
        log = open(self.workdir / "moto.log", "wb")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.infra.simulated_aws", "serve", "--port-file",
             str(port_file), "--region", self.region],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        self.pid, self.start = proc.pid, procs.start_time(proc.pid)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise SimulationError("moto's server did not start: "
                                      + (self.workdir / "moto.log").read_text()[-3000:])
            time.sleep(0.1)
        self.port = int(port_file.read_text())
        return self

    def __exit__(self, *exc) -> None:
        if self.pid:
            procs.stop(self.pid, self.start, timeout=10)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)
            self.pid = 0


# ---- the workspace: a copy of the checkout ---------------------------------------------------


def copy_checkout(dest: Path) -> Path:
    """The checkout's files (tracked, and untracked ones git does not ignore) under dest, with
    their times kept, minus any deployment of its own (tfvars, backend, inventory)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    for rel in sorted(set(listed.stdout.decode().split("\0")) - {""}):
        src = ROOT / rel
        if rel in DEPLOYMENT_FILES or rel.endswith(".auto.tfvars") or not src.is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


def terraform_cli_config(path: Path, mirror: Path | None) -> Path:
    """A Terraform CLI configuration: providers from the filesystem mirror when there is one
    (this machine has no registry access), else Terraform's defaults."""
    if mirror is None:
        path.write_text("# no provider mirror on this machine: the registry\n")
    else:
        path.write_text("provider_installation {\n  filesystem_mirror {\n"
                        f"    path    = {json.dumps(str(mirror))}\n"
                        '    include = ["registry.terraform.io/*/*"]\n  }\n}\n')
    return path


@dataclass
class Workspace:
    """Where the make verbs of the simulated deploy run, and with what."""

    root: Path
    venv: Path
    emulator: Emulator
    ssh_key: Path
    addresses: dict[str, str]
    ansible_vars: dict
    mirror: Path | None
    log_dir: Path
    timings: list[tuple[str, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        copy_checkout(self.root)
        self.home = self.root / ".local" / "sim-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        sim = self.root / ".local" / "simulation"
        sim.mkdir(parents=True, exist_ok=True)
        (sim / "host-addresses.yml").write_text(yaml.safe_dump(self.addresses))
        (sim / "ansible-overrides.yml").write_text(yaml.safe_dump(self.ansible_vars))
        terraform_cli_config(sim / "terraform.rc", self.mirror)
        self.sim = sim

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items()
                if k in ("PATH", "LANG", "LC_ALL", "TERM", "TMPDIR", "AWS_CA_BUNDLE")}
        inputs = overrides()["inputs"]
        tf_vars = {"admin_cidrs": json.dumps(inputs["admin_cidrs"]["value"]),
                   "ssh_public_key": Path(f"{self.ssh_key}.pub").read_text().strip()}
        tf_vars.update({k: json.dumps(v) if not isinstance(v, str) else v
                        for k, v in terraform_overrides().items()})
        return {
            **keep,
            "HOME": str(self.home),
            # AWS: moto only, with credentials that are no one's
            "AWS_ENDPOINT_URL": self.emulator.endpoint,
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": str(self.home / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.home / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "TF_CLI_CONFIG_FILE": str(self.sim / "terraform.rc"),
            "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1",
            "LLM_SIM_HOST_ADDRESSES": str(self.sim / "host-addresses.yml"),
            "ANSIBLE_FORCE_COLOR": "0",
            **{f"TF_VAR_{k}": v for k, v in tf_vars.items()},
        }

    def make(self, target: str, *args: str, timeout: float = 3600,
             check: bool = True) -> subprocess.CompletedProcess:
        """`make <target>` in the workspace with the checkout's venv (never reinstalled)."""
        venv = str(self.venv)
        argv = ["make", "--no-print-directory", "-o", f"{venv}/.installed", target,
                f"VENV={venv}", f"SSH_KEY={self.ssh_key}", *args]
        t = time.monotonic()
        proc = subprocess.run(argv, cwd=self.root, env=self.env(), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        seconds = time.monotonic() - t
        # Terraform colours its output for the user; the checks read the plain text
        proc.stdout, proc.stderr = _plain(proc.stdout), _plain(proc.stderr)
        self.timings.append((target, seconds, proc.returncode))
        n = len(self.timings)
        (self.log_dir / f"{n:02d}-make-{target}.log").write_text(self._redact(
            f"$ {shlex.join(argv)}\n# exit {proc.returncode} after {seconds:.0f} s\n"
            + proc.stdout + "\n--- stderr ---\n" + proc.stderr))
        print(f"[simulated-aws] make {target}: exit {proc.returncode} in {seconds:.0f} s",
              file=sys.stderr, flush=True)
        if check and proc.returncode != 0:
            raise SimulationError(f"make {target} failed (exit {proc.returncode}); log "
                                  f"{self.log_dir}:\n{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}")
        return proc

    def _redact(self, text: str) -> str:
        """The log without the deployment's Grafana password (`make inventory` shows it once)."""
        with contextlib.suppress(OSError):
            password = (self.root / ".local" / "grafana-admin-password").read_text().strip()
            if password:
                text = text.replace(password, "<redacted>")
        return text

    def instance(self, project: str = "llm") -> dict:
        """The deployment's one instance as the emulator reports it (terminated ones too)."""
        found = [i for r in self.aws("ec2").describe_instances(Filters=[
            {"Name": "tag:Project", "Values": [project]}])["Reservations"]
            for i in r["Instances"]]
        if len(found) != 1:
            raise SimulationError(f"expected one instance tagged Project={project}, found "
                                  f"{len(found)}")
        return found[0]

    def instance_id(self) -> str:
        return self.instance()["InstanceId"]

    def instance_state(self) -> str:
        return self.instance()["State"]["Name"]

    def aws(self, service: str):
        """A boto3 client on the emulator, to check what the verbs did."""
        import boto3

        return boto3.client(service, region_name=self.emulator.region,
                            endpoint_url=self.emulator.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing")


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# ---- the test host as a booted Ubuntu image ------------------------------------------------------

CLOUD_INIT_STANDIN = """#!/bin/sh
# Test host only (tests/infra/simulated_aws.py): a booted cloud image's cloud-init has finished.
case "$1" in
  status) echo "status: done"; exit 0 ;;
  *) echo "cloud-init stand-in: only 'status' is answered on a test host" >&2; exit 1 ;;
esac
"""


def prepare_login(host, user: str, public_key: str) -> None:
    """What cloud-init does on Ubuntu's image from the key pair: the login user with the key and
    passwordless sudo; and a cloud-init whose status is done. `host` is a tests.infra.hosts
    TestHost (root over SSH)."""
    script = f"""set -e
id -u {user} >/dev/null 2>&1 || useradd -m -s /bin/bash {user}
install -d -m 700 -o {user} -g {user} /home/{user}/.ssh
printf '%s\\n' {shlex.quote(public_key)} > /home/{user}/.ssh/authorized_keys
chown {user}: /home/{user}/.ssh/authorized_keys && chmod 600 /home/{user}/.ssh/authorized_keys
echo '{user} ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/90-cloud-init-users
chmod 440 /etc/sudoers.d/90-cloud-init-users
cat > /usr/local/bin/cloud-init <<'EOF'
{CLOUD_INIT_STANDIN}EOF
chmod 755 /usr/local/bin/cloud-init
"""
    host.ssh(script, check=True, timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.infra.simulated_aws")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="moto's server with an Ubuntu 24.04 AMI and its SSM name")
    s.add_argument("--port-file", type=Path, required=True)
    s.add_argument("--region", default=REGION)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port_file, args.region)
    return 0


if __name__ == "__main__":
    sys.exit(main())
