"""A deliberately misbehaving vLLM stand-in for the gateway's adversarial tests.

It speaks raw HTTP/1.1 over asyncio streams (no framework), so it can send what no
well-behaved server would: a malformed status line, a redirect, gzip nobody asked for,
usage numbers that are strings, CRLF event separators, an event that never ends, a stream
that stops without `[DONE]`, a hang mid-stream, a huge body, an HTML error page.

The behaviour is chosen by the request's prompt (completions) or first message content
(chat): `bad:<mode>`. Every request is recorded (path and headers) and the count of
connections that ended before the answer was complete is kept, both readable through
`GET /_bad/log`. Run it with `python -m tests.support.bad_backend --port P`.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import signal

import orjson

_LOG: list[dict] = []
_STATS = {"aborted": 0, "redirect_followed": 0}


def _chunk(text: str, usage=None, model: str = "bad-model") -> bytes:
    doc = {"id": "cmpl-bad", "object": "text_completion", "created": 1, "model": model,
           "choices": [{"index": 0, "text": text, "finish_reason": None}]}
    if usage is not None:
        doc = {**doc, "choices": [], "usage": usage}
    return b"data: " + orjson.dumps(doc)


def _completion(usage) -> bytes:
    return orjson.dumps({"id": "cmpl-bad", "object": "text_completion", "created": 1,
                         "model": "bad-model",
                         "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                         "usage": usage})


def _head(status: str, ctype: str, extra: str = "", length: int | None = None) -> bytes:
    h = f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\n{extra}"
    h += f"content-length: {length}\r\n" if length is not None else "connection: close\r\n"
    return (h + "\r\n").encode()


def _plain(status: str, body: bytes, ctype: str = "application/json", extra: str = "") -> bytes:
    return _head(status, ctype, extra, len(body)) + body


SSE = "text/event-stream; charset=utf-8"
GOOD_USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


async def _until_closed(r: asyncio.StreamReader) -> None:
    """Hang until the peer hangs up, and count it: the gateway must let go of a stuck
    backend."""
    await r.read()
    _STATS["aborted"] += 1


async def _respond(mode: str, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                   port: int) -> None:
    """Write the answer for `mode`; streams end by closing the connection."""
    if mode == "status_line":
        w.write(b"HTTP/1.1 abc what\r\n\r\n")
    elif mode == "redirect":
        w.write(_plain("307 Temporary Redirect", b"",
                       extra=f"location: http://127.0.0.1:{port}/_bad/followed\r\n"))
    elif mode in ("usage_str", "usage_neg", "usage_list"):
        bad = {"usage_str": "12", "usage_neg": -50, "usage_list": [1]}[mode]
        w.write(_plain("200 OK", _completion({"prompt_tokens": bad, "completion_tokens": bad,
                                              "total_tokens": 1})))
    elif mode == "usage_not_object":
        w.write(_plain("200 OK", _completion("lots")))
    elif mode == "gzip":
        w.write(_plain("200 OK", gzip.compress(_completion(GOOD_USAGE)),
                       extra="content-encoding: gzip\r\n"))
    elif mode == "html_500":
        w.write(_plain("500 Internal Server Error", b"<html><body>Traceback (most recent call "
                       b"last): File /srv/secret/app.py token=sk-leak</body></html>", "text/html"))
    elif mode == "html_400":
        w.write(_plain("400 Bad Request", b"<html>/srv/secret/app.py sk-leak</html>",
                       "text/html"))
    elif mode == "huge":
        w.write(_head("200 OK", "application/json"))
        w.write(b'{"data": "' + b"x" * (8 << 20) + b'"}')
    elif mode == "hang":
        await _until_closed(r)
    elif mode.startswith("stream_"):
        await _stream(mode.removeprefix("stream_"), r, w)
    else:
        w.write(_plain("200 OK", _completion(GOOD_USAGE)))


async def _stream(mode: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(_head("200 OK", SSE))
    sep = b"\r\n\r\n" if mode == "crlf" else b"\n\n"
    for i in range(3):
        w.write(_chunk(f"t{i}") + sep)
        await w.drain()
    if mode == "cut":
        return  # three tokens, then the connection drops
    if mode == "hang":
        return await _until_closed(r)
    if mode == "trickle":  # a chunk every 0.3 s, forever: only an overall deadline ends it
        while True:
            w.write(_chunk("t") + b"\n\n")
            await w.drain()
            await asyncio.sleep(0.3)
    if mode == "endless_event":  # one event that never ends
        w.write(b'data: {"x": "')
        while True:
            w.write(b"y" * 65536)
            await w.drain()
            await asyncio.sleep(0)
    usage = {"usage_str": {"prompt_tokens": "3", "completion_tokens": "9"},
             "usage_neg": {"prompt_tokens": -3, "completion_tokens": -9},
             "usage_not_object": "many"}.get(mode, GOOD_USAGE)
    w.write(_chunk("", usage=usage) + sep)
    if mode != "no_done":
        w.write(b"data: [DONE]" + sep)


def _mode(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
        text = doc.get("prompt") or doc["messages"][0]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return "ok"
    text = text if isinstance(text, str) else ""
    return text.removeprefix("bad:") if text.startswith("bad:") else "ok"


async def _handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int) -> None:
    try:
        head = await r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await r.readexactly(int(headers.get("content-length", 0)))
        if path == "/_bad/log":
            w.write(_plain("200 OK", orjson.dumps({"requests": _LOG, **_STATS})))
        elif path == "/_bad/reset":
            _LOG.clear()
            _STATS.update(aborted=0, redirect_followed=0)
            w.write(_plain("200 OK", b"{}"))
        elif path == "/_bad/followed":
            _STATS["redirect_followed"] += 1
            w.write(_plain("200 OK", _completion(GOOD_USAGE)))
        elif path == "/health":
            w.write(_plain("200 OK", b""))
        else:
            mode = _mode(body)
            _LOG.append({"method": method, "path": path, "mode": mode, "headers": headers})
            await _respond(mode, r, w, port)
        await w.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        _STATS["aborted"] += 1
    except asyncio.CancelledError:
        _STATS["aborted"] += 1
        raise
    finally:
        w.close()


async def _main(port: int) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(r, w, port), "127.0.0.1", port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    asyncio.run(_main(p.parse_args().port))
