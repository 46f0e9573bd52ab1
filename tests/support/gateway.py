"""A real gateway process for tests: config and keys written to a folder, `python -m app`."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import yaml

from app import keys as keys_cli
from tests.support.procs import PYTHON, Proc, free_port


def redis_limits(url: str) -> dict:
    """`rate_limit` settings for tests that count exactly with Redis.

    They fail closed with a generous wait: on a loaded 2-core CI machine the production
    0.5 s wait can pass and fail open, over-admitting; a closed failure shows as a 503 instead.
    """
    return {"redis_url": url, "on_redis_error": "closed", "timeout_s": 5.0}


def create_key(keys_file: Path, name: str, *flags: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = keys_cli.main(["--file", str(keys_file), "create", name, *flags])
    assert rc == 0, f"key {name} not created"
    return out.getvalue().strip()


@dataclass
class GatewayHandle:
    url: str
    proc: Proc
    folder: Path
    keys: dict[str, str] = field(default_factory=dict)

    def client(self, key: str = "default", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.keys[key], max_retries=0,
                             **kw)

    def async_client(self, key: str = "default", **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.keys[key],
                                  max_retries=0, **kw)

    def auth(self, key: str = "default") -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[key]}"}

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text

    def log_lines(self) -> list[str]:
        return self.proc.log().splitlines()

    def stop(self) -> int | None:
        return self.proc.stop()


def start_gateway(folder: Path, config: dict, keys: dict[str, list[str]],
                  env: dict | None = None) -> GatewayHandle:
    """`keys` maps a key name to `python -m app.keys create` flags."""
    folder.mkdir(parents=True, exist_ok=True)
    keys_file = folder / "keys.json"
    made = {name: create_key(keys_file, name, *flags) for name, flags in keys.items()}
    keys_file.touch()  # the installer's empty file when no key was made (missing stops it)
    cfg_path = folder / "gateway.yml"
    # no drain notice unless a test asks: stopping a test gateway need not wait for it;
    # a config with keys_s3 (the shared key set) has no keys file
    where = {} if "keys_s3" in config else {"keys_file": str(keys_file)}
    cfg_path.write_text(yaml.safe_dump({**where, "drain_notice_s": 0, **config}))
    port = free_port()
    proc = Proc(f"gateway:{port}", [PYTHON, "-m", "app"], folder / f"gateway-{port}.log", env={
        "GATEWAY_CONFIG": str(cfg_path), "GATEWAY_PORT": str(port), **(env or {}),
    })
    handle = GatewayHandle(f"http://127.0.0.1:{port}", proc, folder, made)
    proc.wait_http(handle.url + "/health")
    return handle
