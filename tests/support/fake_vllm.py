"""A small, fast stand-in for vLLM's OpenAI-compatible HTTP server, for tests and benchmarks.

Wire format notes (checked against vLLM's own source, main branch of the stored snapshot:
vllm/entrypoints/openai/chat_completion/{serving,protocol}.py,
vllm/entrypoints/openai/completion/{serving,protocol}.py, the older single-file layout
vllm/entrypoints/openai/{serving_chat,serving_completion,protocol}.py,
vllm/entrypoints/openai/engine/{protocol,serving}.py, vllm/entrypoints/serve/utils/server_utils.py,
vllm/entrypoints/serve/utils/api_utils.py (should_include_usage),
vllm/entrypoints/openai/models/serving.py, vllm/entrypoints/serve/instrumentator/health.py,
vllm/v1/metrics/loggers.py). In our own words:

* Streams are Server-Sent Events: every event is the line ``data: <compact json>`` followed by a
  blank line; the stream always ends with ``data: [DONE]``. Content type is
  ``text/event-stream; charset=utf-8``; errors detected before the stream starts come back as an
  ordinary JSON error response instead.
* Chat chunks are ``{"id":"chatcmpl-…","object":"chat.completion.chunk","created":<int>,
  "model":…,"choices":[…]}``. They are serialised with "exclude unset", so a chunk has no
  ``usage`` key at all unless usage is being reported. The first chunk carries
  ``delta: {"role":"assistant","content":""}`` (plus a top-level ``"prompt_token_ids":null``);
  later chunks carry ``delta: {"content": …}`` with ``logprobs``/``finish_reason`` null and
  ``token_ids`` null. The chunk of the step that ends generation carries that step's text and the
  ``finish_reason`` (``"length"`` when max_tokens is reached) plus ``"stop_reason":null``; there is
  no separate empty finish chunk when generation stops on length.
* Completion chunks are ``{"id":"cmpl-…","object":"text_completion",…,"choices":[{"index":0,
  "text":…,"logprobs":null,"finish_reason":…,"stop_reason":null,"prompt_token_ids":null,
  "token_ids":null}]}``; on current main these also leave out the ``usage`` key (releases up
  to about 0.11 serialised them with every field, so ``"usage":null`` appeared in each chunk).
  There is no role chunk.
* Usage in streams: when ``stream_options`` is present, ``include_usage`` defaults to *true*
  (so ``"stream_options": {}`` asks for usage). Then, after the last choice chunk, one more chunk
  with ``"choices":[]`` and ``"usage":{"prompt_tokens":P,"total_tokens":P+C,
  "completion_tokens":C}`` (null fields dropped) comes right before ``[DONE]``. Without
  stream_options there is no usage anywhere in the stream. Setting stream_options while
  ``stream`` is false is a 400.
* Non-streaming bodies are the full model dump (optional fields present as null; which
  vLLM-only null fields exist varies by release, here those of the 0.10/0.11 protocol.py);
  usage is always there, with key order prompt_tokens, total_tokens, completion_tokens,
  prompt_tokens_details.
* Errors use ``{"error":{"message":…,"type":…,"param":…,"code":<int>}}`` (the old top-level
  ``"object":"error"`` form is gone). An unknown model is 404 with type ``NotFoundError``, param
  ``model`` and the message "The model `X` does not exist."; an absent/empty ``model`` means the
  served model. Bodies that fail request validation (bad JSON, missing fields) are 400 with type
  ``"Bad Request"`` and a message of the form ``"1 validation error:\\n  {pydantic error dict}"``;
  errors raised by the serving layer use type ``BadRequestError`` and friends.
* ``GET /health`` is 200 with an empty body (503 once the engine is dead). ``GET /v1/models`` is
  ``{"object":"list","data":[{"id":…,"object":"model","created":…,"owned_by":"vllm","root":…,
  "parent":null,"max_model_len":…,"permission":[{…"object":"model_permission"…}]}]}``.
* Response ids come from the ``X-Request-Id`` header when present, else a random hex uuid.
  ``system_fingerprint`` is null unless configured, so it is null here.
* Prometheus gauges are labelled ``engine`` and ``model_name``; the client library prints labels
  sorted, e.g. ``vllm:num_requests_running{engine="0",model_name="m"} 0.0``.

Test-only behaviour (not vLLM): directives in prompt text or any chat message,
``[[sleep=S]]`` (wait before the response starts), ``[[delay=S]]`` (per-token delay, overrides
``--token-delay``), ``[[status=N]]`` (answer with status N in the error format above); and the
``/_stub/stats``, ``/_stub/stuck``, ``/_stub/reset`` endpoints. Run it with
``python -m tests.support.fake_vllm --host 127.0.0.1 --port P --served-model-name NAME``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import math
import os
import re
import signal
import sys
import time
from array import array
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

DEFAULT_MAX_TOKENS = 16
_DIRECTIVE = re.compile(r"\[\[(sleep|delay|status)=(\d+(?:\.\d*)?|\.\d+)\]\]")
_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    500: "InternalServerError",
    501: "NotImplementedError",
}
_TOKENS: dict[int, tuple[list[bytes], str]] = {}


def _tokens(n: int) -> tuple[list[bytes], str]:
    """Per-token stream texts (b"tok0", b" tok1", ...) and the joined text, cached by n."""
    got = _TOKENS.get(n)
    if got is None:
        pieces = [(f"tok{i}" if i == 0 else f" tok{i}").encode() for i in range(n)]
        got = (pieces, b"".join(pieces).decode())
        if n <= 8192:
            _TOKENS[n] = got
    return got


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=_JSON)


def error_response(
    message: str, err_type: str, code: int, param: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return _json(body, status=code)


def _validation_error(err: dict, param: str) -> web.Response:
    # vLLM turns FastAPI's RequestValidationError into this shape (type is the HTTP phrase).
    return error_response(f"1 validation error:\n  {err!r}", "Bad Request", 400, param)


class _Reject(Exception):
    def __init__(self, response: web.Response):
        self.response = response


class Stats:
    __slots__ = (
        "requests",
        "completed",
        "cancelled",
        "in_flight",
        "last_request",
        "prompt_tokens",
        "generation_tokens",
        "successes",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        self.requests = self.completed = self.cancelled = 0
        self.prompt_tokens = self.generation_tokens = self.successes = 0
        self.last_request: Any = None


def _words(text: str) -> int:
    return len(text.split())


def _text_parts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, str):
                out.append(part)
        return out
    return []


def _directives(texts: list[str]) -> dict[str, float]:
    found: dict[str, float] = {}
    for t in texts:
        if "[[" in t:
            for key, value in _DIRECTIVE.findall(t):
                found[key] = float(value)
    return found


def _embedding(text: str, dim: int) -> list[float]:
    raw = array("h")
    raw.frombytes(hashlib.shake_256(text.encode()).digest(dim * 2))
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


class FakeVLLM:
    def __init__(
        self, served_model_name: str, embedding_dim: int, token_delay: float, max_model_len: int
    ) -> None:
        self.name = served_model_name
        self.name_json = orjson.dumps(served_model_name)
        self.dim = embedding_dim
        self.token_delay = token_delay
        self.max_model_len = max_model_len
        self.stats = Stats()
        self.unstuck = asyncio.Event()
        self.unstuck.set()

    # ---- plumbing -------------------------------------------------------------------------

    async def _tracked(self, request: web.Request, kind: str) -> web.StreamResponse:
        st = self.stats
        st.requests += 1
        st.in_flight += 1
        try:
            resp = await self._serve(request, kind)
        except asyncio.CancelledError:  # client disconnect (handler_cancellation=True)
            st.cancelled += 1
            raise
        except ConnectionResetError:  # client gone while we read or wrote
            st.cancelled += 1
            return web.Response(status=499)  # aiohttp drops it quietly: the socket is closed
        finally:
            st.in_flight -= 1
        if getattr(resp, "_fake_cancelled", False):
            st.cancelled += 1
        else:
            st.completed += 1
        return resp

    async def _wait_unstuck(self) -> None:
        if not self.unstuck.is_set():
            await self.unstuck.wait()

    async def _read_body(self, request: web.Request) -> dict:
        raw = await request.read()
        if not raw.strip():
            self.stats.last_request = None
            err = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
            raise _Reject(_validation_error(err, "body"))
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.stats.last_request = None
            import json  # only on the error path, for the same position/message FastAPI reports

            try:
                json.loads(raw)
                pos, msg = 0, "Invalid JSON"
            except json.JSONDecodeError as e:
                pos, msg = e.pos, e.msg
            except UnicodeDecodeError:
                pos, msg = 0, "Invalid UTF-8"
            err = {
                "type": "json_invalid",
                "loc": ("body", pos),
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": msg},
            }
            raise _Reject(_validation_error(err, f"body.{pos}")) from None
        self.stats.last_request = body
        if not isinstance(body, dict):
            err = {
                "type": "model_attributes_type",
                "loc": ("body",),
                "msg": "Input should be a valid dictionary or object to extract fields from",
                "input": body,
            }
            raise _Reject(_validation_error(err, "body"))
        return body

    @staticmethod
    def _require(body: dict, field: str) -> Any:
        if field not in body:
            err = {
                "type": "missing",
                "loc": ("body", field),
                "msg": "Field required",
                "input": body,
            }
            raise _Reject(_validation_error(err, f"body.{field}"))
        return body[field]

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model and model != self.name:
            raise _Reject(
                error_response(
                    f"The model `{model}` does not exist.", "NotFoundError", 404, "model"
                )
            )

    def _max_tokens(self, body: dict, prompt_tokens: int, chat: bool) -> int:
        n = body.get("max_completion_tokens") if chat else None
        if n is None:
            n = body.get("max_tokens")
        if n is None:
            n = DEFAULT_MAX_TOKENS
        if isinstance(n, bool) or not isinstance(n, int):
            err = {
                "type": "int_type",
                "loc": ("body", "max_tokens"),
                "msg": "Input should be a valid integer",
                "input": n,
            }
            raise _Reject(_validation_error(err, "body.max_tokens"))
        if n < 1:
            raise _Reject(
                error_response(
                    f"max_tokens must be at least 1, got {n}.", "BadRequestError", 400, "max_tokens"
                )
            )
        limit = self.max_model_len
        if prompt_tokens >= limit:
            msg = (
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {prompt_tokens} input tokens. Please reduce the length of the input messages."
            )
            raise _Reject(error_response(msg, "BadRequestError", 400, "input_tokens"))
        if prompt_tokens + n > limit:
            msg = (
                f"'max_tokens' or 'max_completion_tokens' is too large: {n}. This model's maximum "
                f"context length is {limit} tokens and your request has {prompt_tokens} input "
                f"tokens ({n} > {limit} - {prompt_tokens})."
            )
            raise _Reject(error_response(msg, "BadRequestError", 400, "max_tokens"))
        return n

    @staticmethod
    def _request_id(request: web.Request, body: dict) -> str:
        rid = request.headers.get("X-Request-Id") or body.get("request_id")
        return rid if isinstance(rid, str) and rid else os.urandom(16).hex()

    async def _apply_directives(self, d: dict[str, float]) -> None:
        if "sleep" in d:
            await asyncio.sleep(d["sleep"])
        if "status" in d:
            code = int(d["status"])
            if 400 <= code <= 599:
                try:
                    err_type = _ERROR_TYPES.get(code) or HTTPStatus(code).phrase
                except ValueError:
                    err_type = "Error"
                raise _Reject(error_response(f"stub error {code}", err_type, code))

    # ---- endpoints --------------------------------------------------------------------------

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            body = await self._read_body(request)
            if kind == "embeddings":
                return await self._embeddings(request, body)
            chat = kind == "chat"
            if chat:
                messages = self._require(body, "messages")
                if not isinstance(messages, list):
                    err = {
                        "type": "list_type",
                        "loc": ("body", "messages"),
                        "msg": "Input should be a valid list",
                        "input": messages,
                    }
                    raise _Reject(_validation_error(err, "body.messages"))
                texts = []
                for m in messages:
                    if isinstance(m, dict):
                        texts.extend(_text_parts(m.get("content")))
                prompt_tokens = sum(_words(t) for t in texts)
            else:
                prompt = body.get("prompt")
                if prompt is None or prompt == "" or prompt == []:
                    err = {
                        "type": "value_error",
                        "loc": ("body",),
                        "msg": "Value error, Either prompt or prompt_embeds must be provided "
                        "and non-empty. (parameter=prompt)",
                        "input": body,
                    }
                    raise _Reject(_validation_error(err, "prompt"))
                texts, prompt_tokens = [], 0
                for p in prompt if isinstance(prompt, list) else [prompt]:
                    if isinstance(p, str):
                        texts.append(p)
                        prompt_tokens += _words(p)
                    elif isinstance(p, list):  # token ids
                        prompt_tokens += len(p)
                    else:  # a single token id in a flat list
                        prompt_tokens += 1
            stream = bool(body.get("stream"))
            stream_options = body.get("stream_options")
            if stream_options and not stream:
                err = {
                    "type": "value_error",
                    "loc": ("body",),
                    "msg": "Value error, Stream options can only be defined when `stream=True`.",
                    "input": body,
                }
                raise _Reject(_validation_error(err, "stream_options"))
            self._check_model(body)
            n = self._max_tokens(body, prompt_tokens, chat)
            d = _directives(texts)
            await self._wait_unstuck()
            await self._apply_directives(d)
        except _Reject as r:
            return r.response

        delay = d.get("delay", self.token_delay)
        self.stats.prompt_tokens += prompt_tokens
        rid = ("chatcmpl-" if chat else "cmpl-") + self._request_id(request, body)
        created = int(time.time())
        if stream:
            include_usage = isinstance(stream_options, dict) and bool(
                stream_options.get("include_usage", True)
            )
            return await self._stream(
                request, chat, rid, created, prompt_tokens, n, delay, include_usage
            )

        if delay > 0:
            await asyncio.sleep(delay * n)
        await self._wait_unstuck()
        text = _tokens(n)[1]
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + n,
            "completion_tokens": n,
            "prompt_tokens_details": None,
        }
        if chat:
            choice = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning_content": None,
                },
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": None,
            }
            out = {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": self.name,
                "choices": [choice],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "kv_transfer_params": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
            }
            out = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.name,
                "choices": [choice],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "kv_transfer_params": None,
            }
        self.stats.generation_tokens += n
        self.stats.successes += 1
        return _json(out)

    async def _stream(
        self,
        request: web.Request,
        chat: bool,
        rid: str,
        created: int,
        prompt_tokens: int,
        n: int,
        delay: float,
        include_usage: bool,
    ) -> web.StreamResponse:
        obj = b'"chat.completion.chunk"' if chat else b'"text_completion"'
        head = (
            b'data: {"id":'
            + orjson.dumps(rid)
            + b',"object":'
            + obj
            + b',"created":'
            + str(created).encode()
            + b',"model":'
            + self.name_json
            + b',"choices":'
        )
        if chat:
            role = head + (
                b'[{"index":0,"delta":{"role":"assistant","content":""},'
                b'"logprobs":null,"finish_reason":null}],"prompt_token_ids":null}\n\n'
            )
            pre = head + b'[{"index":0,"delta":{"content":"'
            mid = b'"},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
            end = (
                b'"},"logprobs":null,"finish_reason":"length","stop_reason":null,'
                b'"token_ids":null}]}\n\n'
            )
        else:
            role = b""
            pre = head + b'[{"index":0,"text":"'
            mid = (
                b'","logprobs":null,"finish_reason":null,"stop_reason":null,'
                b'"prompt_token_ids":null,"token_ids":null}]}\n\n'
            )
            end = (
                b'","logprobs":null,"finish_reason":"length","stop_reason":null,'
                b'"prompt_token_ids":null,"token_ids":null}]}\n\n'
            )
        tail = _DONE
        if include_usage:
            usage = b'{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}' % (
                prompt_tokens,
                prompt_tokens + n,
                n,
            )
            tail = head + b'[],"usage":' + usage + b"}\n\n" + _DONE
        pieces = _tokens(n)[0]
        last = n - 1

        resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        sent = 0
        try:
            await resp.prepare(request)
            if delay <= 0:
                await self._wait_unstuck()
                buf = [role]
                for i in range(last):
                    buf += (pre, pieces[i], mid)
                buf += (pre, pieces[last], end, tail)
                await resp.write(b"".join(buf))
                sent = n
            else:
                for i in range(n):
                    await asyncio.sleep(delay)
                    await self._wait_unstuck()
                    if i == last:
                        chunk = pre + pieces[i] + end + tail
                    else:
                        chunk = pre + pieces[i] + mid
                    if i == 0 and role:
                        chunk = role + chunk
                    await resp.write(chunk)
                    sent = i + 1
            await resp.write_eof()
        except ConnectionResetError:  # client went away mid-stream (also aiohttp's variant)
            resp._fake_cancelled = True  # type: ignore[attr-defined]
            self.stats.generation_tokens += sent
            return resp
        self.stats.generation_tokens += sent
        self.stats.successes += 1
        return resp

    async def _embeddings(self, request: web.Request, body: dict) -> web.Response:
        inp = self._require(body, "input")
        self._check_model(body)
        items: list[str] = []
        prompt_tokens = 0
        if isinstance(inp, str):
            items, prompt_tokens = [inp], _words(inp)
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            items, prompt_tokens = [repr(inp)], len(inp)
        elif isinstance(inp, list) and inp:
            for x in inp:
                if isinstance(x, str):
                    items.append(x)
                    prompt_tokens += _words(x)
                elif isinstance(x, list):
                    items.append(repr(x))
                    prompt_tokens += len(x)
                else:
                    inp = None
                    break
        if not items or inp is None:
            err = {
                "type": "string_type",
                "loc": ("body", "input", "str"),
                "msg": "Input should be a valid string",
                "input": body.get("input"),
            }
            raise _Reject(_validation_error(err, "body.input"))
        if prompt_tokens > self.max_model_len:
            raise _Reject(
                error_response(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, "
                    f"you requested {prompt_tokens} tokens in the input for embedding generation. "
                    "Please reduce the length of the input.",
                    "BadRequestError",
                    400,
                    "input_tokens",
                )
            )
        await self._wait_unstuck()
        await self._apply_directives(_directives(items))
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(items):
            vec = _embedding(text, self.dim)
            emb: Any = base64.b64encode(array("f", vec).tobytes()).decode() if b64 else vec
            data.append({"index": i, "object": "embedding", "embedding": emb})
        self.stats.prompt_tokens += prompt_tokens
        out = {
            "id": "embd-" + self._request_id(request, body),
            "object": "list",
            "created": int(time.time()),
            "model": self.name,
            "data": data,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
        return _json(out)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._tracked(request, "completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._tracked(request, "chat")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._tracked(request, "embeddings")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        perm = {
            "id": "modelperm-" + os.urandom(16).hex(),
            "object": "model_permission",
            "created": now,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        card = {
            "id": self.name,
            "object": "model",
            "created": now,
            "owned_by": "vllm",
            "root": self.name,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [perm],
        }
        return _json({"object": "list", "data": [card]})

    async def metrics(self, request: web.Request) -> web.Response:
        lbl = '{engine="0",model_name=' + self.name_json.decode() + "}"
        st = self.stats
        rows = [
            (
                "vllm:num_requests_running",
                "gauge",
                "Number of requests in model execution batches.",
                lbl,
                st.in_flight,
            ),
            (
                "vllm:num_requests_waiting",
                "gauge",
                "Number of requests waiting to be processed.",
                lbl,
                0,
            ),
            (
                "vllm:kv_cache_usage_perc",
                "gauge",
                "KV-cache usage. 1 means 100 percent usage.",
                lbl,
                0,
            ),
            (
                "vllm:prompt_tokens_total",
                "counter",
                "Number of prefill tokens processed.",
                lbl,
                st.prompt_tokens,
            ),
            (
                "vllm:generation_tokens_total",
                "counter",
                "Number of generation tokens processed.",
                lbl,
                st.generation_tokens,
            ),
            (
                "vllm:request_success_total",
                "counter",
                "Count of successfully processed requests.",
                lbl[:-1].replace('{engine="0",', '{engine="0",finished_reason="length",') + "}",
                st.successes,
            ),
        ]
        out = []
        for name, kind, help_, labels, value in rows:
            out.append(
                f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name}{labels} {float(value)}\n"
            )
        return web.Response(
            body="".join(out).encode(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def not_found(self, request: web.Request) -> web.Response:
        return _json({"detail": "Not Found"}, status=404)

    # ---- test controls ----------------------------------------------------------------------

    async def stub_stats(self, request: web.Request) -> web.Response:
        st = self.stats
        return _json(
            {
                "requests": st.requests,
                "completed": st.completed,
                "cancelled": st.cancelled,
                "in_flight": st.in_flight,
                "last_request": st.last_request,
                "stuck": not self.unstuck.is_set(),
            }
        )

    async def stub_stuck(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            return error_response('body must be JSON like {"stuck": true}', "BadRequestError", 400)
        stuck = bool(body.get("stuck", True)) if isinstance(body, dict) else True
        if stuck:
            self.unstuck.clear()
        else:
            self.unstuck.set()
        return _json({"stuck": stuck})

    async def stub_reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return _json({"reset": True})


def build_app(
    served_model_name: str,
    embedding_dim: int = 384,
    token_delay: float = 0.0,
    max_model_len: int = 32768,
) -> web.Application:
    """The aiohttp application. Serve it with handler_cancellation=True (see start_server) so that
    client disconnects cancel handlers and show up as "cancelled" in /_stub/stats."""
    fake = FakeVLLM(served_model_name, embedding_dim, token_delay, max_model_len)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["fake_vllm"] = fake
    r = app.router
    r.add_get("/health", fake.health)
    r.add_get("/v1/models", fake.models)
    r.add_post("/v1/completions", fake.completions)
    r.add_post("/v1/chat/completions", fake.chat)
    r.add_post("/v1/embeddings", fake.embeddings)
    r.add_get("/metrics", fake.metrics)
    r.add_get("/_stub/stats", fake.stub_stats)
    r.add_post("/_stub/stuck", fake.stub_stuck)
    r.add_post("/_stub/reset", fake.stub_reset)
    r.add_route("*", "/{tail:.*}", fake.not_found)
    return app


async def start_server(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` in the running loop; returns (runner, port). Stop with runner.cleanup()."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, bound


async def _main(args: argparse.Namespace) -> None:
    app = build_app(
        args.served_model_name, args.embedding_dim, args.token_delay, args.max_model_len
    )
    runner, port = await start_server(app, args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake_vllm serving {args.served_model_name!r} on http://{args.host}:{port}", flush=True)
    await stop.wait()
    app["fake_vllm"].unstuck.set()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tests.support.fake_vllm",
        description="Stand-in for vLLM's OpenAI-compatible server.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--embedding-dim", type=int, default=384)
    p.add_argument(
        "--token-delay",
        type=float,
        default=0.0,
        help="seconds per generated token (streamed: between chunks)",
    )
    p.add_argument("--max-model-len", type=int, default=32768)
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(args))
    else:
        if sys.version_info >= (3, 12):
            uvloop.run(_main(args))
        else:
            uvloop.install()
            asyncio.run(_main(args))


if __name__ == "__main__":
    main()
