"""The OpenAI endpoints. The hot path reads like the data path:
authenticate, read and check the body, route, limit, relay, account.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from time import perf_counter

import aiohttp
import anyio
import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response, StreamingResponse

from app import schemas
from app.errors import ApiError, bad_request, error_body, unauthorized
from app.keys import KeyRecord
from app.limits import Budget, LimiterUnavailable
from app.logs import log_request
from app.state import Gateway, ShuttingDown
from app.upstream import Backend, BackendError, BackendTimeout, backend_error_body

router = APIRouter()
log = logging.getLogger("gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CLIENT_CLOSED = 499  # nginx's code for a client that went away before the answer
_STARTED = int(time.time())

# endpoint -> (path on the backend, request model)
_ENDPOINTS = {
    "completions": ("v1/completions", schemas.CompletionRequest),
    "chat": ("v1/chat/completions", schemas.ChatCompletionRequest),
    "embeddings": ("v1/embeddings", schemas.EmbeddingRequest),
}


class Exchange:
    """One request's bookkeeping, closed exactly once by `finish`."""

    __slots__ = ("gw", "rid", "t0", "endpoint", "key", "budget", "model", "backend", "stream",
                 "status", "error", "prompt_tokens", "completion_tokens", "prompt_estimate",
                 "ttfb", "backend_wait", "overhead", "reserved", "client")

    def __init__(self, gw: Gateway, request: Request, endpoint: str):
        self.gw = gw
        self.t0 = perf_counter()
        rid = request.headers.get("x-request-id")
        self.rid = rid if rid and _REQUEST_ID.match(rid) else uuid.uuid4().hex
        self.endpoint = endpoint
        self.key: KeyRecord | None = None
        self.budget: Budget | None = None
        self.model = "unknown"
        self.backend: Backend | None = None
        self.stream = False
        self.status = 0
        self.error: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.prompt_estimate = 0
        self.ttfb: float | None = None
        self.backend_wait = 0.0
        self.overhead: float | None = None
        self.reserved = False
        self.client = request.headers.get("x-real-ip") or (
            request.client.host if request.client else "-")

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        if self.overhead is None:
            self.overhead = perf_counter() - self.t0 - self.backend_wait
        h = {"x-request-id": self.rid, "x-gateway-overhead-ms": f"{self.overhead * 1000:.3f}"}
        if extra:
            h.update(extra)
        return h

    async def finish(self) -> None:
        gw, m = self.gw, self.gw.metrics
        duration = perf_counter() - self.t0
        key_name = self.key.name if self.key else "-"
        if self.reserved:
            ok = 200 <= self.status < 300 or self.status == _CLIENT_CLOSED
            used = None
            if ok:
                used = (self.prompt_tokens or self.prompt_estimate) + (self.completion_tokens or 0)
            await gw.limiter.finish(self.budget, self.rid, used)
            self.backend.in_flight -= 1
            m.in_flight.labels(self.model).dec()
        if self.endpoint != "models":
            m.requests.labels(self.model, key_name, str(self.status)).inc()
            if self.backend is not None:
                m.duration.labels(self.model).observe(duration)
                if self.overhead is not None:
                    m.overhead.labels(self.model).observe(self.overhead)
                if self.ttfb is not None:
                    m.ttfb.labels(self.model).observe(self.ttfb)
                if self.prompt_tokens:
                    m.tokens.labels(self.model, key_name, "prompt").inc(self.prompt_tokens)
                if self.completion_tokens:
                    m.tokens.labels(self.model, key_name, "completion").inc(self.completion_tokens)
        # over the whole request: a stream's chunks may arrive in one read, so the time after
        # the first byte is no measure of the decode rate
        tps = round(self.completion_tokens / duration, 1) if self.completion_tokens else None
        log_request({
            "request_id": self.rid, "key": key_name, "model": self.model,
            "endpoint": self.endpoint, "stream": self.stream, "status": self.status,
            "error": self.error, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": round(self.ttfb * 1000, 1) if self.ttfb is not None else None,
            "duration_ms": round(duration * 1000, 1), "tokens_per_s": tps,
            "overhead_ms": round(self.overhead * 1000, 3) if self.overhead is not None else None,
            "client": self.client,
        })

    def fail(self, err: ApiError) -> Response:
        self.status, self.error = err.status, err.code or err.type
        return err.response(self.headers())


def authenticate(gw: Gateway, request: Request) -> KeyRecord:
    header = request.headers.get("authorization")
    if not header:
        raise unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise unauthorized("malformed Authorization header: expected 'Bearer <key>'")
    record = gw.keys.authenticate(key.strip())
    if record is None:
        raise unauthorized("the API key is invalid, revoked or expired")
    return record


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"request body is larger than the {limit}-byte limit",
                       "invalid_request_error", "request_too_large")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length is not a number")
        if int(declared) > limit:
            raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def parse_body(body: bytes, model_cls) -> dict:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    try:
        model_cls.__pydantic_validator__.validate_python(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"invalid field '{field}': {first['msg']}", param=field) from None
    return data


def _text_len(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_len(v) if not isinstance(v, int) else 4 for v in value)
    if isinstance(value, dict):
        return _text_len(value.get("text") or value.get("content") or "")
    return 0


def estimate_prompt_tokens(endpoint: str, data: dict) -> int:
    """A cheap upper-ish estimate (4 characters a token) for the up-front reservation;
    the real count from the backend replaces it when the request settles."""
    if endpoint == "chat":
        chars = sum(_text_len(m.get("content")) + 4 for m in data["messages"])
    else:
        chars = _text_len(data.get("prompt") if endpoint == "completions" else data["input"])
    return chars // 4 + 1


def apply_model_caps(ex: Exchange, data: dict) -> int:
    """Enforce the model's max_tokens cap (default it when absent); return the most
    completion tokens the request may produce."""
    if ex.endpoint == "embeddings":
        return 0
    cap = ex.backend.route.max_tokens
    field = "max_completion_tokens" if data.get("max_completion_tokens") else "max_tokens"
    asked = data.get(field)
    if asked is None:
        data["max_tokens"] = asked = cap
    elif asked > cap:
        raise bad_request(
            f"{field}={asked} is above model '{ex.model}' limit of {cap}; ask for {cap} or fewer",
            param=field, code="max_tokens_too_large")
    return asked * data.get("n", 1)


@router.get("/v1/models", response_model=schemas.ModelList, summary="Models this key may use",
            responses={401: {"model": schemas.ErrorResponse}})
async def list_models(request: Request) -> Response:
    gw: Gateway = request.app.state.gw
    ex = Exchange(gw, request, "models")
    try:
        ex.key = authenticate(gw, request)
    except ApiError as e:
        resp = ex.fail(e)
        await ex.finish()
        return resp
    data = [{"id": m.name, "object": "model", "created": _STARTED, "owned_by": "llm-gateway"}
            for m in gw.config.models if ex.key.allows(m.name)]
    ex.status = 200
    resp = Response(orjson.dumps({"object": "list", "data": data}),
                    media_type="application/json", headers=ex.headers())
    await ex.finish()
    return resp


async def proxy(request: Request, endpoint: str) -> Response:
    gw: Gateway = request.app.state.gw
    ex = Exchange(gw, request, endpoint)
    try:
        resp = await _proxy(gw, ex, request)
        if isinstance(resp, RelayResponse):
            return resp  # the relay does the bookkeeping when the stream ends
    except ApiError as e:
        resp = ex.fail(e)
    except BackendError as e:
        gw.metrics.backend_errors.labels(ex.model, e.kind).inc()
        if isinstance(e, BackendTimeout):
            resp = ex.fail(ApiError(
                504, f"model '{ex.model}' did not answer within {ex.backend.route.timeout_s:g}s",
                "timeout_error", "backend_timeout"))
        else:
            resp = ex.fail(ApiError(
                503, f"model '{ex.model}' is unavailable right now; retry later",
                "service_unavailable", "backend_unavailable", headers={"retry-after": "5"}))
    except Exception:
        log.exception("unexpected error serving request %s", ex.rid)
        resp = ex.fail(ApiError(500, f"internal error; quote request id {ex.rid} when reporting",
                                "api_error", "internal_error"))
    await ex.finish()
    return resp


async def _proxy(gw: Gateway, ex: Exchange, request: Request) -> Response:
    ex.key = authenticate(gw, request)
    path, model_cls = _ENDPOINTS[ex.endpoint]
    body = await read_body(request, gw.config.max_body_bytes)
    data = parse_body(body, model_cls)

    public = data["model"]
    backend = gw.backends.get(public)
    if backend is None:
        raise ApiError(404, f"model '{public}' does not exist; GET /v1/models lists yours",
                       "invalid_request_error", "model_not_found", "model")
    ex.model, ex.backend = public, backend
    if not backend.up:
        raise ApiError(503, f"model '{public}' is unavailable right now; retry later",
                       "service_unavailable", "backend_unavailable", headers={"retry-after": "5"})
    if not ex.key.allows(public):
        raise ApiError(403, f"this key may not use model '{public}'",
                       "permission_error", "model_not_allowed", "model")
    route = backend.route

    modified = False
    if ex.endpoint != "embeddings":
        ex.stream = data.get("stream", False)
        before = data.get("max_tokens")
        max_completion = apply_model_caps(ex, data)
        modified = data.get("max_tokens") != before
    else:
        max_completion = 0
    ex.prompt_estimate = estimate_prompt_tokens(ex.endpoint, data)
    wanted = ex.prompt_estimate + max_completion
    if wanted > ex.key.tpm:
        raise bad_request(
            f"this request may use {wanted} tokens, more than the key's budget of {ex.key.tpm} "
            "tokens per minute; lower max_tokens or shorten the prompt", param="max_tokens",
            code="tokens_exceed_budget")
    if backend.in_flight >= route.max_concurrency:
        raise ApiError(503, f"model '{public}' is at capacity; retry shortly",
                       "service_unavailable", "model_at_capacity", headers={"retry-after": "1"})

    injected_usage = False
    if ex.stream:
        opts = data.get("stream_options") or {}
        if not opts.get("include_usage"):
            # ask vLLM for usage so the stream is billed; the client never sees the extra chunk
            data["stream_options"] = {**opts, "include_usage": True}
            injected_usage = modified = True
    if route.backend_name != public:
        data["model"] = route.backend_name
        modified = True

    ex.budget = Budget(ex.key.id, ex.key.rpm, ex.key.tpm, ex.key.max_concurrency)
    try:
        decision = await gw.limiter.acquire(ex.budget, ex.rid, wanted)
    except LimiterUnavailable:
        gw.metrics.limiter_errors.inc()
        raise ApiError(503, "rate limiting is unavailable, so requests are refused; retry later",
                       "service_unavailable", "ratelimit_unavailable",
                       headers={"retry-after": "5"}) from None
    if decision.unavailable:
        gw.metrics.limiter_errors.inc()
    if not decision.allowed:
        gw.metrics.limited.labels(ex.key.name, decision.refused_by).inc()
        raise ApiError(
            429, f"rate limit reached for key '{ex.key.name}': {_LIMIT_TEXT[decision.refused_by]}",
            "rate_limit_error", "rate_limit_exceeded",
            headers={**decision.headers, "retry-after": str(max(1, round(decision.retry_after_s)))})
    ex.reserved = True
    backend.in_flight += 1
    gw.metrics.in_flight.labels(public).inc()

    out = orjson.dumps(data) if modified else body
    sent = perf_counter()
    resp = await backend.post(path, out, ex.stream, {"x-request-id": ex.rid})
    ex.ttfb = perf_counter() - ex.t0
    ex.backend_wait = perf_counter() - sent

    if resp.status != 200 or not ex.stream:
        try:
            raw = await resp.read()
        except TimeoutError:
            raise BackendTimeout() from None
        except aiohttp.ClientError as e:
            raise BackendError(str(e)) from None
        finally:
            resp.release()
        ex.backend_wait = perf_counter() - sent
        return _plain_response(ex, resp.status, raw, route.backend_name, decision.headers)

    ex.status = 200
    relay = SseRelay(ex, resp, injected_usage, route.backend_name)
    return RelayResponse(relay, headers=ex.headers(
        {**decision.headers, "cache-control": "no-cache", "x-accel-buffering": "no"}))


_LIMIT_TEXT = {
    "requests": "too many requests per minute",
    "tokens": "too many tokens per minute",
    "concurrency": "too many requests at once",
}


def _plain_response(ex: Exchange, status: int, raw: bytes, served: str,
                    limit_headers: dict[str, str]) -> Response:
    if status != 200:
        kind = "status_5xx" if status >= 500 else "status_4xx"
        ex.gw.metrics.backend_errors.labels(ex.model, kind).inc()
        ex.error = "backend_error"
        if status >= 500:
            ex.status = 502
            body = error_body(f"model '{ex.model}' failed to answer (backend status {status})",
                              "api_error", "backend_error")
        else:
            ex.status = status  # the backend's own verdict on the request, in OpenAI form
            body = backend_error_body(raw, status)
        return Response(body, ex.status, media_type="application/json",
                        headers=ex.headers(limit_headers))
    ex.status = 200
    try:
        doc = orjson.loads(raw)
        usage = doc.get("usage") or {}
        ex.prompt_tokens = usage.get("prompt_tokens")
        ex.completion_tokens = usage.get("completion_tokens") or 0
        if served != ex.model and doc.get("model") == served:
            doc["model"] = ex.model
            raw = orjson.dumps(doc)
    except (orjson.JSONDecodeError, AttributeError):
        ex.error = "backend_sent_non_json"
    return Response(raw, 200, media_type="application/json", headers=ex.headers(limit_headers))


class RelayResponse(StreamingResponse):
    """Close the relay however the response ends (client gone, server shutting down), so the
    backend request is cancelled and the bookkeeping done at once rather than at GC time."""

    def __init__(self, relay: SseRelay, headers: dict[str, str]):
        super().__init__(relay.events(), media_type="text/event-stream", headers=headers)
        self.relay = relay

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.relay.close()


class SseRelay:
    """Relays vLLM's Server-Sent Events as they arrive, one backend read at a time, and
    reads the usage on the way."""

    def __init__(self, ex: Exchange, resp: aiohttp.ClientResponse, hide_usage: bool,
                 served: str):
        self.ex = ex
        self.resp = resp
        self.hide_usage = hide_usage
        self.rename = (f'"model":"{served}"'.encode(), f'"model":"{ex.model}"'.encode()) \
            if served != ex.model else None
        self.chunks = 0
        self.closed = False
        ex.gw.streams.add(resp)  # so the drain deadline can end it with an error event

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.ex.gw.streams.discard(self.resp)
        # closing (not releasing) the connection is what makes vLLM abort the generation
        if not self.resp.closed:
            self.resp.close()
        if self.ex.completion_tokens is None:
            self.ex.completion_tokens = self.chunks  # vLLM streams about one token per chunk
        await self.ex.finish()

    def _event(self, event: bytes) -> bytes | None:
        if not event.startswith(b"data: {"):
            return event
        self.chunks += 1
        if b'"usage"' in event:
            try:
                doc = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                doc = {}
            usage = doc.get("usage")
            if usage:
                self.ex.prompt_tokens = usage.get("prompt_tokens")
                self.ex.completion_tokens = usage.get("completion_tokens")
            if self.hide_usage:
                if usage and not doc.get("choices"):
                    self.chunks -= 1
                    return None  # the usage-only chunk the client did not ask for
                if "usage" in doc:
                    del doc["usage"]
                    event = b"data: " + orjson.dumps(doc) + b"\n\n"
        if self.rename:
            event = event.replace(*self.rename)
        return event

    async def events(self):
        ex, buf, first = self.ex, b"", True
        try:
            async for chunk in self.resp.content.iter_any():
                if first:
                    ex.ttfb, first = perf_counter() - ex.t0, False
                buf += chunk
                out = []
                while (end := buf.find(b"\n\n")) >= 0:
                    event, buf = buf[: end + 2], buf[end + 2 :]
                    if (kept := self._event(event)) is not None:
                        out.append(kept)
                if out:
                    yield b"".join(out)
            if buf:
                yield buf
        except ShuttingDown:
            ex.status, ex.error = 503, "gateway_shutting_down"
            yield b"data: " + error_body("the gateway is shutting down; retry the request",
                                         "service_unavailable", ex.error) + b"\n\n"
        except (TimeoutError, aiohttp.ClientError) as e:
            kind = "timeout" if isinstance(e, TimeoutError) else "stream"
            ex.gw.metrics.backend_errors.labels(ex.model, kind).inc()
            ex.status, ex.error = (504, "backend_timeout") if kind == "timeout" else \
                (502, "backend_stream_broken")
            yield b"data: " + error_body(
                f"model '{ex.model}' stopped answering mid-stream", "api_error", ex.error) + b"\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            ex.status, ex.error = _CLIENT_CLOSED, "client_closed"
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()


def _route(endpoint: str, model_cls, response_model, summary: str):
    async def handler(request: Request) -> Response:
        return await proxy(request, endpoint)

    errors = {s: {"model": schemas.ErrorResponse} for s in (400, 401, 403, 404, 413, 429, 502,
                                                            503, 504)}
    router.add_api_route(
        "/" + _ENDPOINTS[endpoint][0], handler, methods=["POST"], summary=summary,
        response_model=response_model,
        responses={200: {"content": {"text/event-stream": {}}}, **errors},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model_cls.__name__}"}}}}},
    )


_route("completions", schemas.CompletionRequest, schemas.CompletionResponse, "Text completion")
_route("chat", schemas.ChatCompletionRequest, schemas.ChatCompletionResponse, "Chat completion")
_route("embeddings", schemas.EmbeddingRequest, schemas.EmbeddingResponse, "Embeddings")
REQUEST_MODELS = [cls for _, cls in _ENDPOINTS.values()]
