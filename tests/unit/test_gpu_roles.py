"""The NVIDIA driver and DCGM roles' decisions, evaluated by Ansible's own templating (its
filters, its lazy variables) from the roles' defaults and vars, with host facts and probe
results as a g5 host gives them. No GPU here: what only a GPU host can show (the modules load,
nvidia-smi answers, DCGM reads the A10G) is listed in docs/aws.md.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from tests.support.ansible_eval import role_value

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "ansible" / "roles"

# The head of `nvidia-smi -q` as the drivers print it (the rest is per-GPU detail).
SMI_Q = """
==============NVSMI LOG==============

Timestamp                                 : Wed Dec  2 17:00:00 2026
Driver Version                            : {driver}
CUDA Version                              : {cuda}

Attached GPUs                             : 1
GPU 00000000:00:1E.0
    Product Name                          : NVIDIA A10G
"""


UBUNTU_AWS = {"kernel": "6.8.0-1021-aws", "distribution_version": "24.04",
              "architecture": "x86_64"}


# --- nvidia_driver: one source, precompiled modules ------------------------------------------


def test_driver_is_the_580_branch_from_ubuntus_precompiled_signed_modules():
    modules = role_value("nvidia_driver", "{{ nvidia_driver_module_packages }}",
                         ansible_facts=UBUNTU_AWS)
    assert modules == ["linux-modules-nvidia-580-server-open-aws",
                       "linux-modules-nvidia-580-server-open-6.8.0-1021-aws"]
    userspace = role_value("nvidia_driver", "{{ nvidia_driver_packages }}",
                           ansible_facts=UBUNTU_AWS)
    assert "nvidia-utils-580-server" in userspace
    assert "nvidia-headless-no-dkms-580-server-open" in userspace
    for name in modules + userspace:
        assert "dkms" not in name.replace("no-dkms", ""), name
        assert "570" not in name, name


def test_kernel_flavour_follows_the_running_kernel():
    generic = dict(UBUNTU_AWS, kernel="6.8.0-45-generic")
    assert role_value("nvidia_driver", "{{ nvidia_driver_module_packages | first }}",
                      ansible_facts=generic) == "linux-modules-nvidia-580-server-open-generic"


def test_driver_role_no_longer_touches_nvidias_cuda_repository():
    text = "\n".join(p.read_text() for p in (ROLES / "nvidia_driver").rglob("*.yml"))
    assert "developer.download.nvidia.com" not in text
    assert "cuda-keyring" not in text
    assert "linux-headers" not in text  # nothing is compiled on the host


@pytest.mark.parametrize("probe, ours, keep_working, kept", [
    # the Deep Learning AMI: NVIDIA's driver, no Ubuntu package of ours -> kept, whatever branch
    ({"rc": 0, "stdout": "570.172.08"}, "", True, True),
    # our own 580 from an earlier run -> nothing to do
    ({"rc": 0, "stdout": "580.95.05"}, "nvidia-utils-580-server", True, True),
    # ours, but the pin moved from 570 to 580 -> install the new branch
    ({"rc": 0, "stdout": "570.172.08"}, "nvidia-utils-570-server", True, False),
    # no driver yet (plain Ubuntu image): nvidia-smi missing
    ({"rc": 2, "stdout": ""}, "", True, False),
    # a driver that does not answer (module not loaded)
    ({"rc": 9, "stdout": ""}, "nvidia-utils-580-server", True, False),
    # the switch off: always manage
    ({"rc": 0, "stdout": "570.172.08"}, "", False, False),
])
def test_a_working_driver_is_kept_unless_it_is_ours_of_another_branch(probe, ours, keep_working,
                                                                      kept):
    value = role_value("nvidia_driver", "{{ nvidia_driver_keep_existing | bool }}",
                       ansible_facts=UBUNTU_AWS, nvidia_driver_smi_probe=probe,
                       nvidia_driver_ours={"stdout": ours},
                       nvidia_driver_keep_working=keep_working)
    assert value is kept


def test_a_pending_reboot_never_keeps_the_old_driver():
    # existing.yml skips the probes then: they are registered as skipped, without rc
    skipped = {"changed": False, "skipped": True, "skip_reason": "Conditional result was False"}
    assert role_value("nvidia_driver", "{{ nvidia_driver_keep_existing | bool }}",
                      ansible_facts=UBUNTU_AWS, nvidia_driver_smi_probe=skipped,
                      nvidia_driver_ours=skipped) is False


def test_the_keep_decision_comes_before_any_install_and_ends_the_role():
    tasks = yaml.safe_load((ROLES / "nvidia_driver" / "tasks" / "main.yml").read_text())
    names = [t.get("ansible.builtin.include_tasks") for t in tasks]
    keep = next(i for i, t in enumerate(tasks)
                if t.get("when") == "nvidia_driver_keep_existing | bool")
    assert names.index("existing.yml") < keep < names.index("driver.yml")
    assert tasks[keep]["block"][-1] == {"name": "End this role",
                                        "ansible.builtin.meta": "end_role"}
    assert any(t.get("ansible.builtin.include_tasks") == "verify.yml"
               for t in tasks[keep]["block"])


# --- dcgm_exporter: the driver's CUDA major, NVIDIA's repository for DCGM only ---------------


@pytest.mark.parametrize("driver, cuda, major", [
    ("580.95.05", "13.0", "13"),
    ("570.172.08", "12.8", "12"),
])
def test_dcgm_packages_follow_the_drivers_cuda_major(driver, cuda, major):
    smi = {"rc": 0, "stdout": SMI_Q.format(driver=driver, cuda=cuda)}
    packages = role_value("dcgm_exporter", "{{ dcgm_exporter_dcgm_packages }}",
                          ansible_facts=UBUNTU_AWS, dcgm_exporter_smi=smi)
    assert packages == [f"datacenter-gpu-manager-4-cuda{major}",
                        f"datacenter-gpu-manager-4-proprietary-cuda{major}"]


def test_a_set_cuda_major_wins_over_the_driver():
    smi = {"rc": 0, "stdout": SMI_Q.format(driver="580.95.05", cuda="13.0")}
    assert role_value("dcgm_exporter", "{{ dcgm_exporter_dcgm_packages | first }}",
                      ansible_facts=UBUNTU_AWS, dcgm_exporter_smi=smi,
                      dcgm_exporter_cuda_major=12) == "datacenter-gpu-manager-4-cuda12"


def test_no_driver_means_no_cuda_major_and_the_preflight_stops():
    smi = {"rc": 2, "stdout": "", "msg": "[Errno 2] No such file or directory: b'nvidia-smi'"}
    assert role_value("dcgm_exporter", "{{ dcgm_exporter_cuda_major_used }}",
                      ansible_facts=UBUNTU_AWS, dcgm_exporter_smi=smi) == ""
    preflight = yaml.safe_load((ROLES / "dcgm_exporter" / "tasks" / "preflight.yml").read_text())
    (check,) = [t["ansible.builtin.assert"] for t in preflight if "ansible.builtin.assert" in t]
    results = [role_value("dcgm_exporter", "{{ " + cond + " }}", ansible_facts=UBUNTU_AWS,
                          dcgm_exporter_smi=smi) for cond in check["that"]]
    assert not all(results)


def parse_preferences(text: str) -> list[dict[str, str]]:
    """apt_preferences(5): stanzas separated by blank lines, comments start with #."""
    stanzas = []
    for block in re.split(r"\n\s*\n", text):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if line.strip() and not line.startswith("#"))
        if fields:
            stanzas.append(fields)
    return stanzas


@pytest.mark.parametrize("url, host", [
    ("https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2404/x86_64",
     "developer.download.nvidia.com"),
    ("http://mirror.example.internal/nvidia/ubuntu2404/x86_64", "mirror.example.internal"),
])
def test_nvidias_repository_may_serve_dcgm_and_nothing_else(url, host):
    template = (ROLES / "dcgm_exporter" / "templates" / "nvidia-cuda-repo.pref.j2").read_text()
    text = role_value("dcgm_exporter", template, ansible_facts=UBUNTU_AWS,
                      dcgm_exporter_cuda_repo_url=url)
    stanzas = parse_preferences(text)
    assert all(s["Pin"] == f"origin {host}" for s in stanzas)
    allowed = [s["Package"] for s in stanzas if int(s["Pin-Priority"]) > 0]
    assert allowed == ["datacenter-gpu-manager*", "cuda-keyring"]
    # everything else from that origin: never installed
    assert stanzas[-1] == {"Package": "*", "Pin": f"origin {host}", "Pin-Priority": "-1"}
    exporter = role_value("dcgm_exporter", "{{ dcgm_exporter_package }}")
    assert any(re.fullmatch(p.replace("*", ".*"), exporter) for p in allowed)


def test_the_pin_is_in_place_before_the_repository_is_added():
    tasks = yaml.safe_load((ROLES / "dcgm_exporter" / "tasks" / "repository.yml").read_text())
    kinds = [next(k for k in t if k.startswith("ansible.builtin.")) for t in tasks]
    assert kinds.index("ansible.builtin.template") < kinds.index("ansible.builtin.apt")
    main = yaml.safe_load((ROLES / "dcgm_exporter" / "tasks" / "main.yml").read_text())
    order = [t.get("ansible.builtin.include_tasks") for t in main]
    assert order.index("preflight.yml") < order.index("repository.yml") < order.index(
        "install.yml")


# --- the pin, read by apt itself -------------------------------------------------------------

NVIDIA_REPO_PACKAGES = {
    # what NVIDIA's repository offers: DCGM, its exporter, the keyring, and a driver newer
    # than Ubuntu's that must never be taken from there
    "datacenter-gpu-manager-4-core": "1:4.5.0-1",
    "datacenter-gpu-manager-4-cuda13": "1:4.5.0-1",
    "datacenter-gpu-manager-exporter": "4.5.0-1",
    "cuda-keyring": "1.1-1",
    "nvidia-utils-580-server": "580.999.99-0ubuntu1",
    "libnvidia-compute-580": "580.999.99-0ubuntu1",
}


@pytest.fixture
def nvidia_like_repo(tmp_path):
    """A flat apt repository of empty packages with those names, served over HTTP on
    127.0.0.1 (so its origin is 127.0.0.1, as NVIDIA's is its host name)."""
    tools = [shutil.which(t) for t in ("dpkg-deb", "dpkg-scanpackages", "apt-get", "apt-cache")]
    if None in tools:
        pytest.skip("needs dpkg-deb, dpkg-scanpackages (dpkg-dev), apt-get and apt-cache")
    repo = tmp_path / "repo"
    repo.mkdir()
    for name, version in NVIDIA_REPO_PACKAGES.items():
        control = tmp_path / "build" / name / "DEBIAN"
        control.mkdir(parents=True)
        (control / "control").write_text(
            f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
            "Maintainer: test <test@example.com>\nDescription: stand-in\n")
        subprocess.run(["dpkg-deb", "--build", str(control.parent), str(repo)], check=True,
                       capture_output=True)
    packages = subprocess.run(["dpkg-scanpackages", ".", "/dev/null"], cwd=repo, check=True,
                              capture_output=True, text=True).stdout
    (repo / "Packages").write_text(packages)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(repo))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def apt_candidates(root: Path, url: str, preferences: str | None) -> dict[str, str]:
    """{package: candidate version or '(none)'} as apt sees them on a host with that source
    and those preferences (a private apt root: the machine's own apt is not touched)."""
    for d in ("etc/apt/preferences.d", "etc/apt/apt.conf.d", "etc/apt/sources.list.d",
              "var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "var/lib/dpkg"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").touch()
    (root / "apt.conf").touch()
    (root / "etc/apt/sources.list").write_text(f"deb [trusted=yes] {url} ./\n")
    if preferences is not None:
        (root / "etc/apt/preferences.d/llm-nvidia-cuda-repo.pref").write_text(preferences)
    opts = ["-o", f"Dir={root}", "-o", f"Dir::State::status={root}/var/lib/dpkg/status",
            "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"]
    env = {"PATH": "/usr/bin:/bin", "APT_CONFIG": str(root / "apt.conf"), "LC_ALL": "C"}
    subprocess.run(["apt-get", *opts, "update"], check=True, capture_output=True, env=env,
                   timeout=60)
    out = subprocess.run(["apt-cache", *opts, "policy", *NVIDIA_REPO_PACKAGES], check=True,
                         capture_output=True, text=True, env=env, timeout=60).stdout
    return dict(re.findall(r"^(\S+):\n\s+Installed: .*\n\s+Candidate: (\S+)", out, re.M))


def test_apt_takes_dcgm_from_nvidias_repository_and_never_a_driver(nvidia_like_repo, tmp_path):
    template = (ROLES / "dcgm_exporter" / "templates" / "nvidia-cuda-repo.pref.j2").read_text()
    preferences = role_value("dcgm_exporter", template, ansible_facts=UBUNTU_AWS,
                             dcgm_exporter_cuda_repo_url=nvidia_like_repo)

    unpinned = apt_candidates(tmp_path / "unpinned", nvidia_like_repo, None)
    pinned = apt_candidates(tmp_path / "pinned", nvidia_like_repo, preferences)

    # without the pin apt would take the repository's driver: the pin is what stops it
    assert unpinned["nvidia-utils-580-server"] == NVIDIA_REPO_PACKAGES["nvidia-utils-580-server"]
    assert pinned["nvidia-utils-580-server"] == "(none)"
    assert pinned["libnvidia-compute-580"] == "(none)"
    for name in ("datacenter-gpu-manager-4-core", "datacenter-gpu-manager-4-cuda13",
                 "datacenter-gpu-manager-exporter", "cuda-keyring"):
        assert pinned[name] == NVIDIA_REPO_PACKAGES[name], name
