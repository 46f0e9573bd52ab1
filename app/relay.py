"""The stream relay: vLLM's Server-Sent Events to the client as they arrive, reading the
usage on the way, and ending with an error event (never a silent cut) when the backend
breaks, stalls, exceeds the stream deadline or sends what is not an event stream.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import TYPE_CHECKING

import aiohttp
import orjson

from app.errors import error_body
from app.state import ShuttingDown

if TYPE_CHECKING:
    from app.routes import Exchange

CLIENT_CLOSED = 499  # nginx's code for a client that went away before the answer
# one event larger than this is not vLLM talking (its largest are a chunk with logprobs)
MAX_EVENT_BYTES = 1 << 20


def token_count(value) -> int | None:
    """A usage number as the backend should send it, or None for anything else."""
    return value if type(value) is int and value >= 0 else None


def read_usage(ex: Exchange, usage) -> None:
    if isinstance(usage, dict):
        ex.prompt_tokens = token_count(usage.get("prompt_tokens"))
        ex.completion_tokens = token_count(usage.get("completion_tokens"))


class RelayResponse:
    """The relayed stream as an ASGI response, sent event by event.

    uvicorn drops writes to a closed connection silently, so one watcher task waits for the
    client's disconnect and cancels the relay, which closes the backend connection (vLLM then
    aborts the generation). The relay is closed however the response ends (client gone,
    server shutting down), so the bookkeeping happens at once rather than at GC time.
    A plain ASGI loop, not the framework's streaming response: its task group and cancel
    scopes cost more per stream than the relay itself.
    """

    def __init__(self, relay: SseRelay, headers: dict[str, str]):
        self.relay = relay
        self.headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                        *((k.encode("latin-1"), v.encode("latin-1"))
                          for k, v in headers.items())]

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.current_task()
        state = {"gone": False, "sent": False}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not state["sent"]:  # after the last event, receive() says disconnect too
                state["gone"] = True
                streaming.cancel()

        watcher = asyncio.ensure_future(watch())
        events = self.relay.events()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for chunk in events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            state["sent"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            streaming.uncancel()  # the client left: the request is over, not the server
        finally:
            state["sent"] = True
            watcher.cancel()
            await events.aclose()  # neither suspends: a second cancel cannot cut them short
            self.relay.close()


class _Broken(Exception):
    def __init__(self, status: int, code: str, message: str, backend_fault: bool = True):
        self.status, self.code, self.message = status, code, message
        self.backend_fault = backend_fault


class SseRelay:
    def __init__(self, ex: Exchange, resp: aiohttp.ClientResponse, hide_usage: bool,
                 served: str):
        self.ex = ex
        self.resp = resp
        self.hide_usage = hide_usage
        self.rename = (f'"model":"{served}"'.encode(), f'"model":"{ex.model}"'.encode()) \
            if served != ex.model else None
        self.deadline = ex.t0 + ex.backend.route.stream_max_s
        self.done = False
        self.closed = False
        ex.gw.streams.add(resp)  # so the drain deadline can end it with an error event

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.ex.gw.streams.discard(self.resp)
        # closing (not releasing) the connection is what makes vLLM abort the generation
        if not self.resp.closed:
            self.resp.close()
        if self.ex.completion_tokens is None:
            self.ex.completion_tokens = self.ex.chunks  # vLLM streams about a token a chunk
        self.ex.finish()

    def _event(self, event: bytes) -> bytes | None:
        """One event, without its blank line: returned as is (the same object) when it passes
        unchanged, as new bytes when changed, None when dropped."""
        if event.startswith(b"data: [DONE]"):
            self.done = True
            return event
        if not event.startswith(b"data: {"):
            return event
        self.ex.chunks += 1
        if b'"usage"' in event:
            try:
                doc = orjson.loads(event[6:])
            except orjson.JSONDecodeError:
                doc = {}
            usage = doc.get("usage") if isinstance(doc, dict) else None
            read_usage(self.ex, usage)
            if self.hide_usage and usage is not None:
                if not doc.get("choices"):
                    self.ex.chunks -= 1
                    return None  # the usage-only chunk the client did not ask for
                del doc["usage"]
                event = b"data: " + orjson.dumps(doc)
        if self.rename:
            event = event.replace(*self.rename)
        return event

    def _split(self, buf: bytes) -> tuple[bytes, bytes]:
        """The complete events in `buf` to send on (kept ones only), and the unfinished rest.
        Events that pass unchanged, the usual case, go on as the bytes that came in."""
        if b"\r" in buf:  # the SSE spec allows CRLF and CR line ends; keep a CR that may
            tail = b"\r" if buf.endswith(b"\r") else b""  # pair with the next read's LF
            buf = buf[: len(buf) - len(tail)].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            buf += tail
        out, end = b"", buf.rfind(b"\n\n")
        if end >= 0:
            out = buf[: end + 2]
            if self.rename is None and b'"usage"' not in out:
                # the usual read passes whole: count its events without splitting it (an
                # event starts the read or follows a blank line; JSON holds no raw newline)
                self.ex.chunks += out.startswith(b"data: {") + out.count(b"\n\ndata: {")
                self.done = self.done or out.startswith(b"data: [DONE]") or \
                    b"\n\ndata: [DONE]" in out
            else:
                events = buf[:end].split(b"\n\n")
                kept = [self._event(e) for e in events]
                if not all(k is e for k, e in zip(kept, events, strict=True)):
                    out = b"".join(k + b"\n\n" for k in kept if k is not None)
            buf = buf[end + 2:]
        if len(buf) > MAX_EVENT_BYTES:
            raise _Broken(502, "backend_stream_broken",
                          f"model '{self.ex.model}' sent an event over {MAX_EVENT_BYTES} bytes")
        return out, buf

    async def events(self):
        ex, buf, first = self.ex, b"", True
        try:
            try:
                async for chunk in self.resp.content.iter_any():
                    if first:
                        ex.ttfb, first = perf_counter() - ex.t0, False
                    out, buf = self._split(buf + chunk)
                    if out:
                        yield out
                    if perf_counter() > self.deadline:
                        raise _Broken(504, "stream_deadline", f"model '{ex.model}' streamed "
                                      f"longer than {ex.backend.route.stream_max_s:g}s")
                if not self.done:
                    raise _Broken(502, "backend_stream_broken",
                                  f"model '{ex.model}' ended the stream before it was complete")
            except ShuttingDown:
                raise _Broken(503, "gateway_shutting_down", "the gateway is shutting down; "
                              "retry the request", backend_fault=False) from None
            except TimeoutError:
                raise _Broken(504, "backend_timeout",
                              f"model '{ex.model}' stopped answering mid-stream") from None
            except aiohttp.ClientError:
                raise _Broken(502, "backend_stream_broken",
                              f"model '{ex.model}' broke the stream") from None
        except _Broken as e:
            if e.backend_fault:
                ex.gw.metrics.backend_errors.labels(ex.model, e.code).inc()
            ex.status, ex.error = e.status, e.code
            kind = "api_error" if e.backend_fault else "service_unavailable"
            yield b"data: " + error_body(e.message, kind, e.code) + b"\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            ex.status, ex.error = CLIENT_CLOSED, "client_closed"
            raise
        finally:
            self.close()
