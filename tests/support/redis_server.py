"""A real redis-server for tests: loopback only, optionally with TLS and a password, started,
killed and restarted by the PID we started (never by name)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.support.procs import Proc, free_port

ADMIN = "test-admin"


@dataclass
class RedisServer:
    """`tls` is a folder laid out as stack.local.ensure_tls makes it (server.crt, server.key,
    ca.crt); clients connect to `host`, which the certificate must name."""

    folder: Path
    tls: Path | None = None
    password: str | None = field(default=None, repr=False)  # never in a failure's text
    host: str = "127.0.0.1"
    binds: tuple[str, ...] = ("127.0.0.1",)
    port: int = field(default_factory=free_port)
    proc: Proc | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        """An admin connection of the test's own (named `test-admin`), verified against the
        server's own CA at the first address it listens on."""
        tls = {"ssl_ca_certs": str(self.tls / "ca.crt")} if self.tls else {}
        url = f"{'rediss' if self.tls else 'redis'}://{self.binds[0]}:{self.port}/0"
        return redis.Redis.from_url(url, password=self.password, socket_timeout=5,
                                    client_name=ADMIN, **tls)

    def clients(self) -> int:
        """Connections open to the server, the test's own admin connections not counted."""
        with self.client() as c:
            return sum(1 for e in c.client_list() if e.get("name") != ADMIN)

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is missing: run `make deps` (Debian package redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        # a config file, not arguments: the password stays out of the process list
        lines = [f"bind {' '.join(self.binds)}", 'save ""', "appendonly no",
                 f"dir {self.folder}"]
        if self.tls:
            lines += ["port 0", f"tls-port {self.port}",
                      f"tls-cert-file {self.tls / 'server.crt'}",
                      f"tls-key-file {self.tls / 'server.key'}",
                      f"tls-ca-cert-file {self.tls / 'ca.crt'}", "tls-auth-clients no"]
        else:
            lines += [f"port {self.port}"]
        if self.password:
            lines += [f"requirepass {self.password}"]
        conf = self.folder / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)
        self.starts += 1
        self.proc = Proc(f"redis:{self.port}", [binary, str(conf)],
                         self.folder / f"redis-{self.starts}.log")
        client = self.client()
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{self.proc.log()}") from None
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        """A crash: SIGKILL to the PID we started, nothing flushed, every connection cut."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.popen.wait(10)
        self.proc.stop()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
