"""Fixtures for the infra suite: real systemd test hosts (see tests/infra/hosts.py).

`test_hosts` boots the hosts once per session and stops, at the end, only those it booted
itself (a host already up, e.g. from `python -m tests.infra.hosts up gpu1`, is reused and left
running). Set TESTHOSTS_KEEP=1 to leave the session's hosts up for debugging.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.infra import hosts as testhosts

# Two GPU hosts: the simulated deploy uses the first, the fleet tests both.
TEST_HOST_NAMES = ["gpu1", "gpu2"]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "systemd test hosts need root (network namespaces, systemd-nspawn)"
    if not shutil.which("apt-get") and not shutil.which("systemd-nspawn"):
        return "systemd test hosts need a Debian controller (apt) or systemd-nspawn"
    return None


@pytest.fixture(scope="session")
def test_hosts() -> Iterator[list[testhosts.TestHost]]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    with testhosts.session_lock():
        hosts = testhosts.start_hosts(TEST_HOST_NAMES)
        try:
            yield hosts
        finally:
            mine = [h for h in hosts if h.started]
            if mine and not os.environ.get("TESTHOSTS_KEEP"):
                testhosts.stop_hosts(mine)


@pytest.fixture(scope="session")
def test_inventory(test_hosts, tmp_path_factory):
    """Path of an Ansible YAML inventory naming the session's test hosts."""
    path = tmp_path_factory.mktemp("inventory") / "hosts.yml"
    return testhosts.ansible_inventory(test_hosts, path)
