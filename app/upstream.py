"""Backends: one pooled keep-alive client per vLLM server, and the SSE relay.

A request to a backend either returns an open aiohttp response or raises one of the
Backend* errors below, which routes.py turns into 503/504/502 for the client. Nothing a
backend sends (a redirect, a malformed status line, an encoding nobody asked for, a body
too large to hold) is followed, trusted or relayed raw.
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


class BackendProtocolError(BackendError):
    """The backend answered, but not with HTTP we can relay."""

    kind = "protocol"


_JSON = {"content-type": "application/json"}


class Backend:
    def __init__(self, route: ModelRoute):
        self.route = route
        self.in_flight = 0
        self.up = True  # the health monitor's latest verdict (app/health.py)
        # The gateway refuses above max_concurrency itself, so the pool needs no cap of its own.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=300)
        # no Accept-Encoding: bodies are relayed as they come, so they must come plain
        self.session = aiohttp.ClientSession(
            base_url=route.base_url + "/", connector=connector, auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    def enter(self) -> bool:
        """Take an in-flight slot if the model has one free (check and count in one step)."""
        if self.in_flight >= self.route.max_concurrency:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

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
            resp = await self.session.post(path, data=body, headers={**_JSON, **headers},
                                           timeout=timeout, allow_redirects=False)
        except TimeoutError:
            raise BackendTimeout() from None
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise BackendUnavailable(str(e)) from None
        except aiohttp.ClientError as e:  # a malformed status line or headers
            raise BackendProtocolError(type(e).__name__) from None
        if resp.headers.get("content-encoding", "identity") != "identity":
            resp.close()
            raise BackendProtocolError("content-encoding")
        return resp

    @staticmethod
    async def read(resp: aiohttp.ClientResponse, limit: int) -> bytes:
        """The whole body, refused when it would hold more than `limit` bytes."""
        try:
            declared = resp.content_length
            if declared is not None:
                if declared > limit:
                    raise BackendProtocolError("response too large")
                return await resp.read()
            body = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > limit:
                    raise BackendProtocolError("response too large")
            return bytes(body)
        except TimeoutError:
            raise BackendTimeout() from None
        except aiohttp.ClientError as e:
            raise BackendProtocolError(type(e).__name__) from None
        finally:
            resp.release()  # back to the pool when read whole; closed (vLLM aborts) if not

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


def backend_error_body(raw: bytes, status: int, model: str) -> bytes:
    """A backend's 4xx verdict as a short OpenAI error. Only a JSON error's own fields are
    kept, shortened: an HTML page or plain text could carry a path, a traceback or a secret."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    # vLLM has used two shapes over its versions: {"error": {...}} and a flat object
    err = data.get("error", data) if isinstance(data, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        err = {"message": f"model '{model}' refused the request (backend status {status})"}
    kind, param, code = err.get("type"), err.get("param"), err.get("code")
    return orjson.dumps({"error": {
        "message": err["message"][:_MAX_MESSAGE],
        "type": kind[:64] if isinstance(kind, str) and kind else "invalid_request_error",
        "param": param[:64] if isinstance(param, str) else None,
        # vLLM sends its code as the HTTP status number; OpenAI's is a string or null
        "code": str(code)[:64] if isinstance(code, str | int) else None,
    }})


_MAX_MESSAGE = 500
