"""terraform/ proven offline: fmt, validate, `terraform test` with mock providers, checkov.

The hashicorp/aws provider comes from a filesystem mirror when the machine has one (found at
run time, never a fixed path) and from the registry otherwise. Everything runs in a copy of
terraform/, so the working tree gets no .terraform/ or lock file from the tests.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.infra

ROOT = Path(__file__).resolve().parents[2]
TF_DIR = ROOT / "terraform"
CHECKOV = ROOT / ".local" / "tools-venv" / "bin" / "checkov"
# where provider mirrors usually live: Terraform's implied local mirror directories, plus /opt
MIRROR_BASES = [
    "~/.terraform.d/plugins", "~/.local/share/terraform/plugins",
    "/usr/local/share/terraform/plugins", "/usr/share/terraform/plugins", "/opt",
]


def terraform_binary() -> str:
    found = shutil.which("terraform") or shutil.which("terraform", path=str(ROOT / ".local/bin"))
    if found is None:
        pytest.fail("terraform is not installed: run `make deps` (it installs Terraform into "
                    ".local/bin when missing), or install Terraform 1.10+ yourself")
    return found


def provider_mirror() -> Path | None:
    """A directory laid out as <host>/hashicorp/aws/<version>/<os_arch>/terraform-provider-aws*:
    $TF_PROVIDER_MIRROR if set, else the first such directory at or one level below a base."""
    if os.environ.get("TF_PROVIDER_MIRROR"):
        return Path(os.environ["TF_PROVIDER_MIRROR"])
    for base in MIRROR_BASES:
        base = os.path.expanduser(base)
        for depth in ("", "*/"):
            hits = glob.glob(f"{base}/{depth}*/hashicorp/aws/*/*/terraform-provider-aws*")
            if hits:
                # .../<mirror>/<host>/hashicorp/aws/<version>/<os_arch>/<binary>
                return Path(sorted(hits)[-1]).parents[5]
    return None


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
    # a CLI config variable naming a missing file only adds a warning to every output
    if env.get("TF_CLI_CONFIG_FILE") and not Path(env["TF_CLI_CONFIG_FILE"]).exists():
        del env["TF_CLI_CONFIG_FILE"]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_ok(proc: subprocess.CompletedProcess, what: str) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{output}"
    return output


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """terraform/ copied without local state or settings, then initialised offline if possible."""
    tf = terraform_binary()
    work = tmp_path_factory.mktemp("tf") / "terraform"
    shutil.copytree(TF_DIR, work, ignore=shutil.ignore_patterns(
        ".terraform", ".terraform.lock.hcl", "*.tfstate*", "terraform.tfvars", "backend.tf"))
    mirror = provider_mirror()
    argv = [tf, "init", "-backend=false", "-input=false", "-no-color"]
    if mirror is not None:
        argv.append(f"-plugin-dir={mirror}")
    source = f"provider mirror {mirror}" if mirror else "the registry"
    assert_ok(run(argv, work), f"terraform init from {source}")
    return work


def test_terraform_files_are_formatted():
    proc = run([terraform_binary(), "fmt", "-check", "-recursive", "-diff", "-no-color"], TF_DIR)
    assert_ok(proc, "terraform fmt -check (run `terraform fmt -recursive terraform`)")


def test_configuration_is_valid(workdir):
    output = assert_ok(run([terraform_binary(), "validate", "-no-color"], workdir),
                       "terraform validate")
    assert "The configuration is valid" in output


def test_terraform_test_passes_with_mocked_aws(workdir):
    output = assert_ok(run([terraform_binary(), "test", "-no-color"], workdir), "terraform test")
    passed = re.search(r"Success! (\d+) passed, 0 failed", output)
    assert passed, output
    # every file under tests/ ran: a file that stopped parsing would silently shrink the count
    runs = sum(len(re.findall(r'^run "', p.read_text(), re.M))
               for p in (workdir / "tests").glob("*.tftest.hcl"))
    assert int(passed.group(1)) == runs, output


# Bad values and the message a user must see for each, as Terraform prints it.
REFUSED = {
    "world_ssh": ('admin_cidrs = ["0.0.0.0/0"]',
                  "admin_cidrs must not open SSH to the world: 0.0.0.0/0, ::/0"),
    "cpu_instance": ('instance_type = "m5.xlarge"',
                     "instance_type must be an NVIDIA GPU type on x86_64"),
    "lb_without_name": ("host_count = 3",
                        "host_count above 1 puts a load balancer in front, whose TLS certificate "
                        "needs a name"),
    "key_path": ('ssh_public_key = "~/.ssh/id_ed25519.pub"',
                 "ssh_public_key must be one OpenSSH public key line"),
    "named_host_without_zone": ('domain_name = "api.example.com"',
                                "domain_name on a single host means a Let's Encrypt certificate, "
                                "obtained by a DNS-01 challenge in Route53 with the host's role: "
                                "set route53_zone_id"),
    "gateway_port": ("metrics_ports = { gateway = 8080 }",
                     "outside 8000-8099 (the gateway on 8080 and vLLM on 8000+ are never exposed)"),
    "cache_nodes": ("cache_node_count = 7",
                    "cache_node_count must be a whole number from 1 to 6 (a primary and up to "
                    "five replicas)"),
}


def test_bad_inputs_are_refused_with_a_message_saying_what_is_allowed(workdir):
    """These runs expect no failure, so Terraform fails them and prints what users would see."""
    messages = workdir / "messages"
    messages.mkdir(exist_ok=True)
    good = {"admin_cidrs": '["203.0.113.7/32"]',
            "ssh_public_key": '"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq7eXAMPLEkEyFoRtEsTsOnLy t"'}
    for label, (assignment, _) in REFUSED.items():
        key = assignment.split("=", 1)[0].strip()
        base = "\n".join(f"    {k} = {v}" for k, v in good.items() if k != key)
        # a file each: after a failed run Terraform skips the rest of its file
        (messages / f"{label}.tftest.hcl").write_text(
            'mock_provider "aws" {\n  source = "./tests/mocks"\n}\n\n'
            f'run "{label}" {{\n  command = plan\n  variables {{\n{base}\n'
            f"    {assignment}\n  }}\n}}\n")

    proc = run([terraform_binary(), "test", "-no-color", "-test-directory=messages"], workdir)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    flat = " ".join(output.replace("│", " ").split())  # Terraform wraps long messages
    for label, (_, message) in REFUSED.items():
        assert f'run "{label}"... fail' in output, output
        assert message in flat, f"{label}: message not shown:\n{output}"


def test_checkov_finds_nothing_unjustified():
    if not CHECKOV.exists():
        pytest.fail("checkov is not installed: run `make deps-tools` (it goes into "
                    ".local/tools-venv, pinned)")
    proc = run([str(CHECKOV), "--directory", str(TF_DIR), "--framework", "terraform",
                "--skip-download", "--compact", "--quiet", "--output", "cli"], ROOT, timeout=600)
    output = assert_ok(proc, "checkov")
    assert "Failed checks: 0" in output, output


def test_every_checkov_skip_gives_its_reason():
    skips = []
    for path in TF_DIR.rglob("*.tf"):
        if ".terraform" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "checkov:skip" in line:
                skips.append((f"{path.relative_to(ROOT)}:{number}", line.strip()))
    assert skips, "expected the justified skips to be found"
    pattern = re.compile(r"^#checkov:skip=CKV2?_AWS_\d+:\S.{20,}$")
    unjustified = [where for where, line in skips if not pattern.match(line)]
    assert not unjustified, f"checkov skips without a reason: {unjustified}"
