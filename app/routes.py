"""The OpenAI endpoints. The hot path reads like the data path:
authenticate, read and check the body (admission.py), route, limit, relay (relay.py), account.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from time import perf_counter

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app import admission, schemas
from app.errors import ApiError, draining, error_body, unauthorized
from app.keys import KeyRecord
from app.limits import Budget, Decision, LimiterUnavailable
from app.logs import log_request
from app.relay import CLIENT_CLOSED, RelayResponse, SseRelay, read_usage
from app.state import Gateway
from app.upstream import Backend, BackendError, BackendTimeout, backend_error_body

router = APIRouter()
log = logging.getLogger("gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_STARTED = int(time.time())

# endpoint -> (path on the backend, request model)
# The gateway's request ids: the limiter's entry and vLLM's engine request id, so unique across
# every process sharing a Redis or a backend. A random per-process half and a counter: as
# unique as uuid4 for this purpose, without a system call per request.
_RID_PREFIX = secrets.token_hex(8)
_rid_counter = itertools.count()

_ENDPOINTS = {
    "completions": ("v1/completions", schemas.CompletionRequest),
    "chat": ("v1/chat/completions", schemas.ChatCompletionRequest),
    "embeddings": ("v1/embeddings", schemas.EmbeddingRequest),
}


class Exchange:
    """One request's bookkeeping, closed exactly once by `finish`.

    `rid` is the gateway's own id: the limiter files the request under it and vLLM uses it
    as its engine request id, so no client can make two requests collide. The client's
    `x-request-id`, when well formed, is only echoed and logged.
    """

    __slots__ = ("gw", "rid", "client_rid", "t0", "endpoint", "key", "budget", "model",
                 "backend", "stream", "status", "error", "prompt_tokens", "completion_tokens",
                 "prompt_estimate", "reservation", "chunks", "ttfb", "backend_wait",
                 "overhead", "reserved", "client", "finished")

    def __init__(self, gw: Gateway, request: Request, endpoint: str):
        self.gw = gw
        self.t0 = perf_counter()
        self.rid = f"{_RID_PREFIX}{next(_rid_counter):016x}"
        rid = request.headers.get("x-request-id")
        self.client_rid = rid if rid and _REQUEST_ID.match(rid) else None
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
        self.reservation = 0
        self.chunks = 0  # stream events with a body: what the backend produced so far
        self.ttfb: float | None = None
        self.backend_wait = 0.0
        self.overhead: float | None = None
        self.reserved = False
        self.finished = False
        self.client = request.headers.get("x-real-ip") or (
            request.client.host if request.client else "-")

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        if self.overhead is None:
            self.overhead = perf_counter() - self.t0 - self.backend_wait
        h = {"x-request-id": self.client_rid or self.rid,
             "x-gateway-overhead-ms": f"{self.overhead * 1000:.3f}"}
        if extra:
            h.update(extra)
        return h

    def settlement(self) -> int | None:
        """What the request costs the key: the tokens it used when the backend did work
        (a success, a client that left, a stream broken after some chunks), the whole
        reservation when a generation timed out unseen, else nothing (None refunds)."""
        if 200 <= self.status < 300 or self.status == CLIENT_CLOSED or self.chunks:
            prompt = self.prompt_estimate if self.prompt_tokens is None else self.prompt_tokens
            return prompt + (self.completion_tokens or 0)
        if self.error == "backend_timeout":
            return self.reservation
        return None

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        gw, m = self.gw, self.gw.metrics
        duration = perf_counter() - self.t0
        key_name = self.key.name if self.key else "-"
        if self.reserved:
            self.backend.leave()
            m.of(m.in_flight, self.model).dec()
            gw.limiter.finish(self.budget, self.rid, self.settlement())
        if self.endpoint != "models":
            m.of(m.requests, self.model, key_name, str(self.status)).inc()
            if self.backend is not None:
                m.of(m.duration, self.model).observe(duration)
                if self.overhead is not None:
                    m.of(m.overhead, self.model).observe(self.overhead)
                if self.ttfb is not None:
                    m.of(m.ttfb, self.model).observe(self.ttfb)
                if self.prompt_tokens:
                    m.of(m.tokens, self.model, key_name, "prompt").inc(self.prompt_tokens)
                if self.completion_tokens:
                    m.of(m.tokens, self.model, key_name, "completion").inc(
                        self.completion_tokens)
        # over the whole request: a stream's chunks may arrive in one read, so the time after
        # the first byte is no measure of the decode rate
        tps = round(self.completion_tokens / duration, 1) if self.completion_tokens else None
        log_request({
            "request_id": self.rid, "client_request_id": self.client_rid, "key": key_name,
            "model": self.model, "endpoint": self.endpoint, "stream": self.stream,
            "status": self.status, "error": self.error, "prompt_tokens": self.prompt_tokens,
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


@router.get("/v1/models", response_model=schemas.ModelList, summary="Models this key may use",
            responses={401: {"model": schemas.ErrorResponse}})
async def list_models(request: Request) -> Response:
    gw: Gateway = request.app.state.gw
    ex = Exchange(gw, request, "models")
    try:
        if gw.refusing:
            raise draining()
        ex.key = authenticate(gw, request)
    except ApiError as e:
        resp = ex.fail(e)
        ex.finish()
        return resp
    data = [{"id": m.name, "object": "model", "created": _STARTED, "owned_by": "llm-gateway"}
            for m in gw.config.models if ex.key.allows(m.name)]
    ex.status = 200
    resp = Response(orjson.dumps({"object": "list", "data": data}),
                    media_type="application/json", headers=ex.headers())
    ex.finish()
    return resp


async def proxy(request: Request, endpoint: str) -> Response:
    gw: Gateway = request.app.state.gw
    ex = Exchange(gw, request, endpoint)
    resp = None
    try:
        resp = await _proxy(gw, ex, request)
    except ApiError as e:
        resp = ex.fail(e)
    except admission.ClientGone:
        ex.status, ex.error = CLIENT_CLOSED, "client_closed"
        resp = Response(status_code=CLIENT_CLOSED)  # nobody reads it
    except BackendError as e:
        gw.metrics.backend_errors.labels(ex.model, e.kind).inc()
        resp = ex.fail(_backend_failure(ex, e))
    except Exception:
        log.exception("unexpected error serving request %s", ex.rid)
        resp = ex.fail(ApiError(500, f"internal error; quote request id {ex.rid} when reporting",
                                "api_error", "internal_error"))
    finally:
        if not isinstance(resp, RelayResponse):  # a relay does its bookkeeping at its end
            ex.finish()
    return resp


def _backend_failure(ex: Exchange, e: BackendError) -> ApiError:
    if isinstance(e, BackendTimeout):
        return ApiError(504, f"model '{ex.model}' did not answer within "
                        f"{ex.backend.route.timeout_s:g}s", "timeout_error", "backend_timeout")
    if e.kind == "protocol":
        return ApiError(502, f"model '{ex.model}' sent an answer the gateway cannot relay "
                        f"({e})", "api_error", "backend_error")
    return ApiError(503, f"model '{ex.model}' is unavailable right now; retry later",
                    "service_unavailable", "backend_unavailable", headers={"retry-after": "5"})


async def _proxy(gw: Gateway, ex: Exchange, request: Request) -> Response:
    if gw.refusing:  # drained: the cheap refusal, before any work (see also _admit)
        raise draining()
    ex.key = authenticate(gw, request)
    ex.budget = Budget(ex.key.id, ex.key.rpm, ex.key.tpm, ex.key.max_concurrency)
    path, model_cls = _ENDPOINTS[ex.endpoint]
    if not admission.small(request):
        # a large body costs real time to parse: it counts against requests/min before it
        # is read, refused or not, so one key cannot buy the event loop with invalid bodies
        _refuse_if_limited(gw, ex, await _limiter_call(gw, gw.limiter.charge(ex.budget, ex.rid)))
    body = await admission.read_body(request, gw.config.max_body_bytes)
    data = admission.parse_body(body, model_cls)

    public = data["model"]
    backend = gw.backends.get(public)
    if backend is None:
        raise ApiError(404, f"model '{public}' does not exist; GET /v1/models lists yours",
                       "invalid_request_error", "model_not_found", "model")
    ex.model, ex.backend = public, backend
    if not ex.key.allows(public):
        raise ApiError(403, f"this key may not use model '{public}'",
                       "permission_error", "model_not_allowed", "model")
    if not backend.up:  # its last health check failed: answer at once, no connection attempt
        raise ApiError(503, f"model '{public}' is unavailable right now; retry later",
                       "service_unavailable", "backend_unavailable", headers={"retry-after": "5"})
    route = backend.route
    admission.check_task(ex.endpoint, route)

    modified = False
    max_completion = 0
    if ex.endpoint != "embeddings":
        ex.stream = data.get("stream", False)
        before = data.get("max_tokens")
        max_completion = admission.apply_caps(data, route)
        modified = data["max_tokens"] != before
    ex.prompt_estimate, wanted = admission.estimate(ex.endpoint, data, max_completion)
    if wanted > ex.key.tpm:
        raise ApiError(
            400, f"this request may use {wanted} tokens, more than the key's budget of "
            f"{ex.key.tpm} tokens per minute; lower max_tokens, n or the number of prompts, "
            "or shorten the input", "invalid_request_error", "tokens_exceed_budget",
            "max_tokens")

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

    decision = await _admit(gw, ex, backend, wanted)
    out = orjson.dumps(data) if modified else body
    sent = perf_counter()
    if ex.stream:
        resp = await backend.post(path, out, True, {"x-request-id": ex.rid})
        ex.backend_wait = perf_counter() - sent
        if resp.status == 200:
            ex.status = 200
            relay = SseRelay(ex, resp, injected_usage, route.backend_name)
            return RelayResponse(relay, headers=ex.headers(
                {**decision.headers, "cache-control": "no-cache", "x-accel-buffering": "no"}))
        raw = await backend.read(resp, gw.config.max_response_bytes)
    else:
        status, raw = await _until_client_leaves(
            request, _fetch(backend, path, out, ex.rid, gw.config.max_response_bytes))
        resp = None
    ex.ttfb = ex.backend_wait = perf_counter() - sent
    return _plain_response(ex, resp.status if resp is not None else status, raw,
                           route.backend_name, decision.headers)


async def _admit(gw: Gateway, ex: Exchange, backend: Backend, wanted: int):
    """Charge the key's budget, then take a slot on the model, or refuse (429, 503).

    The key comes first so a key over its budget never holds model slots (not even during
    the Redis round trip) that other keys' requests would then be refused for.
    A request that began before a drain's notice ended but reaches this point after it is
    refused too: so once the in-flight count (requests holding a slot) is 0, it stays 0, and
    the backends may restart.
    """
    if gw.refusing:
        raise draining()
    decision = await _limiter_call(gw, gw.limiter.acquire(ex.budget, ex.rid, wanted))
    _refuse_if_limited(gw, ex, decision)
    if not backend.enter():  # checked and counted in one step: no await in between
        gw.limiter.finish(ex.budget, ex.rid, None)
        raise ApiError(503, f"model '{ex.model}' is at capacity; retry shortly",
                       "service_unavailable", "model_at_capacity", headers={"retry-after": "1"})
    ex.reserved, ex.reservation = True, wanted
    gw.metrics.of(gw.metrics.in_flight, ex.model).inc()
    return decision


async def _limiter_call(gw: Gateway, call) -> Decision:
    try:
        decision = await call
    except LimiterUnavailable:
        gw.metrics.limiter_errors.inc()
        raise ApiError(503, "rate limiting is unavailable, so requests are refused; retry later",
                       "service_unavailable", "ratelimit_unavailable",
                       headers={"retry-after": "5"}) from None
    if decision.unavailable:
        gw.metrics.limiter_errors.inc()
    return decision


def _refuse_if_limited(gw: Gateway, ex: Exchange, decision: Decision) -> None:
    if not decision.allowed:
        gw.metrics.limited.labels(ex.key.name, decision.refused_by).inc()
        raise ApiError(
            429, f"rate limit reached for key '{ex.key.name}': {_LIMIT_TEXT[decision.refused_by]}",
            "rate_limit_error", "rate_limit_exceeded",
            headers={**decision.headers, "retry-after": str(max(1, round(decision.retry_after_s)))})


async def _fetch(backend: Backend, path: str, body: bytes, rid: str,
                 limit: int) -> tuple[int, bytes]:
    resp = await backend.post(path, body, False, {"x-request-id": rid})
    return resp.status, await backend.read(resp, limit)


async def _until_client_leaves(request: Request, work):
    """Await `work`; if the client disconnects first, cancel it (closing the backend
    connection, which makes vLLM abort the generation) and raise ClientGone. The work runs
    in this task; one watcher task cancels it."""
    me = asyncio.current_task()
    left = False

    async def watch() -> None:
        nonlocal left
        await _disconnected(request)
        left = True
        me.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not left:
            raise
        me.uncancel()
        raise admission.ClientGone from None
    finally:
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    # the body is read whole by now, so the next ASGI message is the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


_LIMIT_TEXT = {
    "requests": "too many requests per minute",
    "tokens": "too many tokens per minute",
    "concurrency": "too many requests at once",
}


def _plain_response(ex: Exchange, status: int, raw: bytes, served: str,
                    limit_headers: dict[str, str]) -> Response:
    doc = None
    if status == 200:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    if not isinstance(doc, dict):
        kind = "status_4xx" if 400 <= status < 500 else "status_5xx" if status >= 500 \
            else "protocol"
        ex.gw.metrics.backend_errors.labels(ex.model, kind).inc()
        ex.error = "backend_error"
        if kind == "status_4xx":
            ex.status = status  # the backend's own verdict on the request, in OpenAI form
            body = backend_error_body(raw, status, ex.model)
        else:  # a 5xx, a redirect, a 200 that is not a JSON object: the backend failed
            ex.status = 502
            body = error_body(f"model '{ex.model}' failed to answer (backend status {status})",
                              "api_error", "backend_error")
        return Response(body, ex.status, media_type="application/json",
                        headers=ex.headers(limit_headers))
    ex.status = 200
    read_usage(ex, doc.get("usage"))
    if served != ex.model and doc.get("model") == served:
        doc["model"] = ex.model
        raw = orjson.dumps(doc)
    return Response(raw, 200, media_type="application/json", headers=ex.headers(limit_headers))


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


def fast_paths() -> dict[str, str]:
    """URL path -> endpoint name, for main.FastPath."""
    return {"/" + path: endpoint for endpoint, (path, _) in _ENDPOINTS.items()}
