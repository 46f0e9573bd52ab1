"""Proof that the systemd test-host harness gives Ansible what real hosts give it.

Boots `gpu1` (conftest) with systemd-nspawn in its own network namespace and checks it over
real SSH: systemd as PID 1, packages through the proxy only, pip from the controller's local
wheel indexes, no route anywhere but the controller, and a warm start from the rootfs cache.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from tests.infra import hosts as testhosts

pytestmark = pytest.mark.infra

ANSIBLE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "ansible"


@pytest.fixture(scope="module")
def gpu1(test_hosts) -> testhosts.TestHost:
    return next(h for h in test_hosts if h.name == "gpu1")


def test_systemd_is_pid1_and_the_system_is_running(gpu1):
    assert gpu1.ssh("cat /proc/1/comm", check=True).stdout.strip() == "systemd"
    state = gpu1.ssh("systemctl is-system-running --wait", check=True).stdout.strip()
    assert state == "running", gpu1.ssh("systemctl --failed").stdout
    assert gpu1.ssh("hostname", check=True).stdout.strip() == "gpu1"
    # Units get cgroups of their own, so KillMode=control-group and restarts behave as on a VM.
    cg = gpu1.ssh("cat /proc/$(systemctl show -p MainPID --value ssh)/cgroup", check=True)
    assert "/system.slice/ssh.service" in cg.stdout


def test_ssh_takes_the_controller_key_and_nothing_else(gpu1):
    assert stat.S_IMODE(os.stat(gpu1.ssh_key).st_mode) == 0o600
    assert gpu1.ssh("id -un", check=True).stdout.strip() == gpu1.ssh_user == "root"
    no_key = subprocess.run(
        ["ssh", *testhosts.SSH_OPTIONS, "-o", "PubkeyAuthentication=no",
         "-o", "PasswordAuthentication=no", f"root@{gpu1.address}", "true"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30,
    )
    assert no_key.returncode == 255
    assert "Permission denied" in no_key.stderr


def test_apt_installs_packages_through_the_proxy(gpu1):
    conf = gpu1.ssh("apt-config dump Acquire::http::Proxy Acquire::https::Proxy").stdout
    assert conf.count(gpu1.proxy_url) == 2
    gpu1.ssh("apt-get update -q", check=True)
    gpu1.ssh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends jq",
             check=True)
    out = gpu1.ssh("echo '{\"a\": [1, 2]}' | jq -c .a", check=True).stdout.strip()
    assert out == "[1,2]"


def _local_index_package() -> tuple[str, str, str]:
    """(index dir, name, version) of `six` (or any package) on the controller's local index."""
    pip = testhosts.pip_settings()
    for url in pip.extra_index_urls + ([pip.index_url] if pip.index_url else []):
        path = testhosts._local_path(url)
        if not path or not Path(path).is_dir():
            continue
        candidates = ["six", *sorted(p.name for p in Path(path).iterdir())[:50]]
        for name in candidates:
            page = Path(path, name, "index.html")
            if not page.is_file():
                continue
            m = re.search(r">([A-Za-z0-9_.]+)-([0-9][^-]*)-py[23][^<]*none-any\.whl<",
                          page.read_text())
            if m:
                return path, name, m.group(2)
    pytest.skip("the controller's pip configuration names no local file:// index")


def test_pip_installs_from_the_bind_mounted_local_index(gpu1):
    index_dir, name, version = _local_index_package()
    assert gpu1.ssh(f"test -d {shlex.quote(index_dir)}").returncode == 0
    conf = gpu1.ssh("python3 -m pip --version >/dev/null 2>&1; cat /etc/pip.conf").stdout
    assert f"proxy = {gpu1.proxy_url}" in conf
    assert f"file://{index_dir}" in conf
    venv = "/root/harness-venv"
    gpu1.ssh(f"rm -rf {venv} && python3 -m venv {venv}", check=True)
    out = gpu1.ssh(f"{venv}/bin/pip install --no-cache-dir {name}=={version}", check=True).stdout
    # The wheel came from the read-only bind mount, not through the proxy.
    assert re.search(rf"Processing {re.escape(str(Path(index_dir).parent))}/\S+\.whl", out), out
    shown = gpu1.ssh(f"{venv}/bin/pip show {name}", check=True).stdout
    assert f"Version: {version}" in shown
    assert gpu1.ssh(f"touch {shlex.quote(index_dir)}/x").returncode != 0  # read-only


def test_the_host_reaches_nothing_but_the_controller(gpu1):
    routes = gpu1.ssh("ip -4 route show", check=True).stdout.strip().splitlines()
    assert routes and all(" dev eth0 " in r and "default" not in r for r in routes), routes
    probe = (
        "import socket, sys\n"
        "def connect(addr, port):\n"
        "    try:\n"
        "        socket.create_connection((addr, port), timeout=5).close()\n"
        "        return 'connected'\n"
        "    except OSError as e:\n"
        "        return str(e.errno)\n"
        "print(connect(sys.argv[1], 443), connect(sys.argv[2], sys.argv[3]))\n"
    )
    # No route: connect() fails inside the kernel with ENETUNREACH (101) and sends nothing.
    out = gpu1.ssh(
        f"python3 -c {shlex.quote(probe)} 1.1.1.1 {testhosts.CONTROLLER_ADDR} "
        f"{testhosts.PROXY_PORT}", check=True).stdout.split()
    assert out == ["101", "connected"]
    assert gpu1.ssh("getent hosts controller", check=True).stdout.split()[0] == (
        testhosts.CONTROLLER_ADDR)


@pytest.mark.skipif(not ANSIBLE.exists(), reason="ansible is not installed in .venv")
def test_ansible_reaches_the_host_with_the_inventory(test_inventory, gpu1):
    out = subprocess.run(
        [str(ANSIBLE), "all", "-i", str(test_inventory), "-m", "ansible.builtin.setup",
         "-a", "filter=ansible_service_mgr"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "False"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"ansible_service_mgr": "systemd"' in out.stdout
    var = subprocess.run(
        [str(ANSIBLE), "gpu1", "-i", str(test_inventory), "-m", "ansible.builtin.debug",
         "-a", "var=test_proxy_url"], capture_output=True, text=True, timeout=300,
    )
    assert gpu1.proxy_url in var.stdout, var.stdout + var.stderr


def test_a_running_host_is_reused_not_restarted(gpu1):
    (again,) = testhosts.start_hosts(["gpu1"])
    assert (again.address, again.started) == (gpu1.address, False)
    assert again.ssh("systemctl is-system-running", check=True).stdout.strip() == "running"


def test_one_more_host_starts_from_the_cache(gpu1):
    """A host beyond the session's (gpu1, gpu2): booted and stopped here."""
    assert testhosts.rootfs_is_cached()
    ready = testhosts.CACHE_DIR / testhosts.rootfs_key() / "READY"
    built = ready.stat().st_mtime
    (extra,) = testhosts.start_hosts(["gpu3"])
    try:
        assert ready.stat().st_mtime == built  # no second debootstrap
        assert extra.started and extra.address != gpu1.address
        assert extra.ssh("systemctl is-system-running --wait", check=True).stdout.strip() == (
            "running")
        # Test hosts share the test network (a monitoring host can scrape a GPU host) ...
        reach = extra.ssh("timeout 5 bash -c '</dev/tcp/gpu1/22' && echo open").stdout
        assert reach.strip() == "open"
        # ... and each one starts from a fresh copy of the pristine tree.
        assert extra.ssh("command -v jq").returncode != 0
    finally:
        if extra.started:
            testhosts.stop_hosts([extra])
    assert not Path("/run/netns", testhosts._netns("gpu3")).exists()

