"""Backends: one pooled keep-alive client per vLLM server, and the SSE relay.

A request to a backend either returns an open aiohttp response or raises one of the
Backend* errors below, which routes.py turns into 503/504/502 for the client.
"""

from __future__ import annotations

import logging
import time

import aiohttp
import orjson

from app.config import ModelRoute

log = logging.getLogger("gateway.upstream")


class BackendError(Exception):
    kind = "error"


class BackendUnavailable(BackendError):
    kind = "connect"


class BackendTimeout(BackendError):
    kind = "timeout"


_JSON = {"content-type": "application/json"}


class Backend:
    def __init__(self, route: ModelRoute):
        self.route = route
        self.in_flight = 0
        self.up = True  # the health monitor's latest verdict (app/health.py)
        # The gateway refuses above max_concurrency itself, so the pool needs no cap of its own.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            base_url=route.base_url + "/", connector=connector, auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        await self.session.close()

    async def post(self, path: str, body: bytes, stream: bool,
                   headers: dict[str, str]) -> aiohttp.ClientResponse:
        """Send and wait for the response headers. For streams the deadline bounds the wait
        for each chunk; otherwise it bounds the whole exchange."""
        t = self.route.timeout_s
        timeout = (aiohttp.ClientTimeout(total=None, sock_connect=min(t, 5), sock_read=t)
                   if stream else aiohttp.ClientTimeout(total=t, sock_connect=min(t, 5)))
        try:
            return await self.session.post(path, data=body, headers={**_JSON, **headers},
                                           timeout=timeout)
        except TimeoutError:
            raise BackendTimeout() from None
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise BackendUnavailable(str(e)) from None

    async def health(self, timeout_s: float) -> tuple[bool, str]:
        """(up, detail) from the vLLM server's /health."""
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self.session.get("health", timeout=timeout) as r:
                await r.read()
                return r.status == 200, f"health answered {r.status}"
        except TimeoutError:
            return False, f"health did not answer within {timeout_s:g}s"
        except (aiohttp.ClientError, OSError):
            return False, "connection refused or reset"

    async def probe(self, timeout_s: float) -> tuple[bool, str]:
        """A one-token generation (or a one-word embedding) within a deadline: catches an
        engine that is stuck while its HTTP server still answers /health."""
        if self.route.task == "embed":
            path, body = "v1/embeddings", {"model": self.route.backend_name, "input": "ping"}
        else:
            path = "v1/completions"
            body = {"model": self.route.backend_name, "prompt": "ping", "max_tokens": 1}
        start = time.monotonic()
        try:
            async with self.session.post(
                path, data=orjson.dumps(body), headers=_JSON,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as r:
                await r.read()
                if r.status != 200:
                    return False, f"probe answered {r.status}"
        except TimeoutError:
            return False, f"probe got no answer within {timeout_s:g}s"
        except (aiohttp.ClientError, OSError):
            return False, "probe: connection refused or reset"
        return True, f"probe answered in {1000 * (time.monotonic() - start):.0f} ms"


def backend_error_body(raw: bytes, status: int) -> bytes:
    """A backend's error body in OpenAI form (vLLM has used two shapes over its versions)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
    elif isinstance(data, dict) and "message" in data:
        err = data
    else:
        err = {"message": raw[:500].decode(errors="replace") or f"backend answered {status}"}
    return orjson.dumps({"error": {
        "message": str(err.get("message", "")),
        "type": err.get("type") or "invalid_request_error",
        "param": err.get("param"),
        # vLLM sends its code as the HTTP status number; OpenAI's is a string or null
        "code": None if err.get("code") is None else str(err["code"]),
    }})
