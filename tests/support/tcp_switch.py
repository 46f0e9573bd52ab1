"""A TCP forwarder on loopback whose target can be switched: new connections go to the new
target, open ones stay where they were. That is what a client sees when a DNS name moves to
another address, as ElastiCache's primary endpoint does when it promotes a replica."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.support.procs import free_port


class TcpSwitch:
    def __init__(self, target_port: int):
        self.port = free_port()
        self.target_port = target_port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tcp-switch:{self.port}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TCP switch did not start")

    def switch(self, target_port: int) -> None:
        self.target_port = target_port

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, client_r, client_w) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))

    @staticmethod
    async def _pipe(reader, writer) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
