"""The Python floor for `make bench-gateway`: a bare aiohttp reverse proxy, no auth, no limits.

It forwards every request to one backend over one keep-alive client session and relays the
answer as it arrives (streams chunk by chunk). Whatever the gateway costs above this is the
gateway's own work. Run: python -m tests.bench.bare_proxy --port P --backend http://127.0.0.1:B
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def make_app(backend: str) -> web.Application:
    app = web.Application()

    async def session(app: web.Application):
        app["client"] = aiohttp.ClientSession(
            backend, connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        yield
        await app["client"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with request.app["client"].request(request.method, request.rel_url, data=body,
                                                 headers=headers) as up:
            out = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backend", required=True)
    args = ap.parse_args()
    # uvloop, like the gateway: the floor must not be slower for a reason the gateway avoids
    web.run_app(make_app(args.backend), host="127.0.0.1", port=args.port, print=None,
                access_log=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
