"""The local stack (`make local`), brought up once for the e2e tests or reused if already up."""

from __future__ import annotations

import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from stack import local


@dataclass
class LocalStack:
    url: str
    key: str
    ca: Path

    def client(self, key: str | None = None, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.key, max_retries=0,
                             http_client=httpx.Client(verify=self.tls(), timeout=60), **kw)

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.tls(), timeout=60)


def _stack(*verb: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stack.local", *verb], cwd=local.ROOT)


# package scope: a stack this fixture started is stopped once the e2e tests are done, so its
# engines' memory is free again for the systemd test hosts of tests/infra
@pytest.fixture(scope="package")
def local_stack() -> LocalStack:
    already_up = subprocess.run([sys.executable, "-m", "stack.local", "status"], cwd=local.ROOT,
                                capture_output=True).returncode == 0
    if not already_up:
        assert _stack("up").returncode == 0, "`python -m stack.local up` failed"
    yield LocalStack(f"https://localhost:{local.HTTPS_PORT}",
                     (local.STATE / "demo-key").read_text().strip(), local.TLS / "ca.crt")
    if not already_up:
        _stack("down")
