"""DCGM version pins (dcgm_exporter role): the apt package list the role asks for, templated by
Ansible's own Templar, and checked against how dpkg compares versions."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.ansible_eval import render, trusted

ROLE = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "dcgm_exporter"
# What NVIDIA's repository calls a DCGM 4 release: epoch 1 (e.g. datacenter-gpu-manager-4-core
# 1:4.4.0-1, datacenter-gpu-manager-4-cuda12 1:4.4.1-1)
REPO_VERSION = "1:4.5.3-1"




def apt_names(**overrides) -> list[str]:
    """The `name:` list of the role's apt task, as Ansible renders it."""
    values = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    values.update(yaml.safe_load((ROLE / "vars" / "main.yml").read_text()))
    # the CUDA major the driver reports (driver 580: 13), which preflight reads from nvidia-smi
    values.update(gpu_enabled=True, dcgm_exporter_cuda_major=13, **overrides)
    tasks = yaml.safe_load((ROLE / "tasks" / "install.yml").read_text())
    apt = next(t["ansible.builtin.apt"] for t in tasks if "ansible.builtin.apt" in t)
    return render(apt["name"], trusted(values))


def pins(names: list[str]) -> dict[str, str]:
    return dict(n.split("=", 1) for n in names if "=" in n)


@pytest.mark.parametrize("given", ["4.5.3-1", "1:4.5.3-1"])
def test_a_dcgm_pin_names_the_version_apt_has(given):
    got = pins(apt_names(dcgm_exporter_dcgm_version=given))
    assert got == {"datacenter-gpu-manager-4-cuda13": REPO_VERSION,
                   "datacenter-gpu-manager-4-proprietary-cuda13": REPO_VERSION}


def test_the_pinned_version_equals_the_repository_version_for_dpkg():
    if shutil.which("dpkg") is None:
        pytest.fail("dpkg is missing: these tests compare versions the way apt does")
    pinned = pins(apt_names(dcgm_exporter_dcgm_version="4.5.3-1"))
    for version in pinned.values():
        same = subprocess.run(["dpkg", "--compare-versions", version, "eq", REPO_VERSION])
        assert same.returncode == 0, version
    # without the epoch dpkg sees another version: apt would find nothing to install
    assert subprocess.run(["dpkg", "--compare-versions", "4.5.3-1", "eq",
                           REPO_VERSION]).returncode != 0


def test_a_wildcard_pin_matches_the_repository_version():
    # Ansible's apt module matches "pkg=VERSION*" with fnmatch against apt's version strings
    for pattern in pins(apt_names(dcgm_exporter_dcgm_version="4.5.3*")).values():
        assert fnmatch.fnmatch(REPO_VERSION, pattern), pattern


def test_no_pin_installs_the_newest():
    assert apt_names() == ["datacenter-gpu-manager-4-cuda13",
                           "datacenter-gpu-manager-4-proprietary-cuda13",
                           "datacenter-gpu-manager-exporter"]


def test_the_exporter_pin_is_passed_as_given():
    # the exporter package's own versioning is not assumed to carry an epoch
    names = apt_names(dcgm_exporter_version="4.5.2-1")
    assert "datacenter-gpu-manager-exporter=4.5.2-1" in names
