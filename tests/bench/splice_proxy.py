"""The event loop's floor for `make bench-gateway`'s paced streams: a TCP splice on uvloop.

Each client connection gets one backend connection and the bytes pass both ways untouched: no
HTTP parsing, no headers, nothing per request. What a Python proxy can spend per chunk cannot
be less than this (a read, a write and two callbacks). Run:
python -m tests.bench.splice_proxy --port P --backend-port B
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop


class _Up(asyncio.Protocol):
    def __init__(self, down: asyncio.Transport):
        self.down = down

    def data_received(self, data: bytes) -> None:
        self.down.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.close()


class _Down(asyncio.Protocol):
    backend_port = 0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport, self.up, self.early = transport, None, []
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        up, _ = await asyncio.get_running_loop().create_connection(
            lambda: _Up(self.transport), "127.0.0.1", self.backend_port)
        self.up = up
        for data in self.early:
            up.write(data)

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.early.append(data)
        else:
            self.up.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()
        self.connecting.cancel()


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Down, "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backend-port", type=int, required=True)
    args = ap.parse_args()
    _Down.backend_port = args.backend_port
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
