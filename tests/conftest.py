"""Shared fixtures: stand-in vLLM servers, a gateway in front of them, a real Redis."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest

from tests.support.gateway import GatewayHandle, start_gateway
from tests.support.procs import PYTHON, Proc, free_port
from tests.support.redis_server import RedisServer


@dataclass
class FakeBackend:
    url: str
    served_name: str
    proc: Proc

    def stats(self) -> dict:
        return httpx.get(self.url + "/_stub/stats").json()

    def reset(self) -> None:
        httpx.post(self.url + "/_stub/reset")

    def set_stuck(self, stuck: bool) -> None:
        httpx.post(self.url + "/_stub/stuck", json={"stuck": stuck}).raise_for_status()


def start_fake_backend(tmp_path, served_name: str, *args: str, port: int = 0) -> FakeBackend:
    port = port or free_port()
    proc = Proc(f"fake-vllm:{served_name}", [
        PYTHON, "-m", "tests.support.fake_vllm", "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", served_name, *args,
    ], tmp_path / f"fake-{served_name}-{port}.log")
    backend = FakeBackend(f"http://127.0.0.1:{port}", served_name, proc)
    proc.wait_http(backend.url + "/health")
    return backend


@pytest.fixture(scope="session")
def backends(tmp_path_factory):
    """Three stand-in vLLM servers: two text models and an embeddings model."""
    tmp = tmp_path_factory.mktemp("backends")
    made = {
        "sql": start_fake_backend(tmp, "tiny-sql"),
        "coder": start_fake_backend(tmp, "sql-coder"),
        "embed": start_fake_backend(tmp, "minilm", "--embedding-dim", "384"),
    }
    yield made
    for b in made.values():
        b.proc.stop()


def models_config(backends: dict[str, FakeBackend]) -> list[dict]:
    """The test model declaration: public names differ from served names on purpose."""
    return [
        {"name": "text2sql", "backend": backends["sql"].url, "served_name": "tiny-sql",
         "max_tokens": 64, "timeout_s": 5},
        {"name": "sql-coder", "backend": backends["coder"].url, "max_tokens": 64,
         "timeout_s": 1.5, "max_concurrency": 50},
        {"name": "embed", "backend": backends["embed"].url, "served_name": "minilm",
         "task": "embed"},
        # nothing listens here: a backend that is down
        {"name": "ghost", "backend": f"http://127.0.0.1:{free_port()}", "required": False},
    ]


GENEROUS = ["--rpm", "100000", "--tpm", "100000000", "--concurrency", "500"]


@pytest.fixture(scope="session")
def gateway(backends, tmp_path_factory) -> GatewayHandle:
    """One gateway for the tests that do not need limits of their own."""
    gw = start_gateway(
        tmp_path_factory.mktemp("gateway"),
        {"models": models_config(backends), "max_body_bytes": 65536},
        {"default": GENEROUS, "sql-only": ["--models", "text2sql", *GENEROUS]},
    )
    yield gw
    gw.stop()


@pytest.fixture(autouse=True)
def _reset_backends(request):
    if "backends" in request.fixturenames:
        for b in request.getfixturevalue("backends").values():
            b.reset()
            b.set_stuck(False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on loopback (plain, no password), started and stopped by PID."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """moto's AWS emulator on loopback (SNS, SQS, SSM ...), for tests that call AWS APIs."""
    tmp = tmp_path_factory.mktemp("moto")
    port = free_port()
    proc = Proc("moto", [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                tmp / "moto.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{url}/moto-api/", timeout=60)
        yield url
    finally:
        proc.stop()
