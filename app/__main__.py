"""`python -m app`: serve the gateway with uvicorn (GATEWAY_HOST, GATEWAY_PORT, GATEWAY_CONFIG)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import uvicorn

from app.config import ConfigError, config_path_from_env, load_config, settings_from_env
from app.keys import KeyStoreError
from app.logs import setup_logging
from app.main import FastPath, create_app
from app.state import Gateway

# uvicorn's own backstop after the drain deadline: streams get this long to write their
# error event before it cancels what is left
_END_STREAMS_GRACE_S = 2


class _DrainingServer(uvicorn.Server):
    """SIGTERM, in three steps a load balancer can follow:
    1. notice (drain_notice_s): /ready answers 503, everything else is served as usual;
    2. drain (drain_timeout_s): the listener closes, in-flight requests and streams finish;
    3. deadline: streams still open end with an SSE error event, then the process exits.
    A second SIGTERM, or SIGINT, skips what is left of the notice."""

    def __init__(self, config: uvicorn.Config, gw: Gateway):
        super().__init__(config)
        self.gw = gw
        self._notice_until: float | None = None
        self._pending_sig: int | None = None

    def handle_exit(self, sig, frame) -> None:
        # a signal handler: set flags only, on_tick acts on them
        self.gw.draining = True
        notice = self.gw.config.drain_notice_s
        if sig == signal.SIGTERM and self._notice_until is None and notice > 0:
            self._notice_until = time.monotonic() + notice
            self._pending_sig = sig
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._pending_sig is not None and time.monotonic() >= self._notice_until:
            sig, self._pending_sig = self._pending_sig, None
            super().handle_exit(sig, None)
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        asyncio.get_running_loop().call_later(self.gw.config.drain_timeout_s,
                                              self.gw.end_streams)
        await super().shutdown(sockets)


def main() -> int:
    try:
        settings = settings_from_env()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # before the app is made: what it says while starting (Redis checked, say) is JSON too
    setup_logging(settings.log_level)
    try:
        config = load_config(config_path_from_env())
        app = create_app(config)
    except (ConfigError, KeyStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = _DrainingServer(uvicorn.Config(
        FastPath(app), host=settings.host, port=settings.port, loop="uvloop", http="httptools",
        access_log=False, log_config=None, lifespan="on", server_header=False,
        timeout_graceful_shutdown=config.drain_timeout_s + _END_STREAMS_GRACE_S,
        timeout_keep_alive=config.keepalive_timeout_s,
    ), app.state.gw)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
