"""`python -m app`: serve the gateway with uvicorn (GATEWAY_HOST, GATEWAY_PORT, GATEWAY_CONFIG)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
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
# drain (leave the load balancer's pool, keep running) and resume
_DRAIN_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

log = logging.getLogger("gateway")


class _DrainingServer(uvicorn.Server):
    """SIGTERM, in three steps a load balancer can follow:
    1. notice (drain_notice_s): /ready answers 503, everything else is served as usual;
    2. drain (drain_timeout_s): the listener closes, in-flight requests and streams finish;
    3. deadline: streams still open end with an SSE error event, then the process exits.
    A second SIGTERM, or SIGINT, skips what is left of the notice.

    SIGUSR1 drains without stopping (a rolling restart takes the host out of the pool):
    the same notice, then new API requests get 503 `gateway_draining` while those in flight
    finish; /ready's `in_flight` tells when none is left. SIGUSR2 undoes it. A SIGTERM
    during such a drain waits only for what is left of its notice. Signals, not an admin
    endpoint: only root or the service's user can send them, so there is nothing to guard.
    """

    def __init__(self, config: uvicorn.Config, gw: Gateway, drain_sigs: list[int]):
        super().__init__(config)
        self.gw = gw
        self._notice_until: float | None = None
        self._pending_sig: int | None = None
        self._drain_until: float | None = None  # the end of a SIGUSR1 drain's notice
        self._drain_sigs = drain_sigs  # SIGUSR1/2 received, oldest first

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            before = {sig: signal.signal(sig, self._drain_signal) for sig in _DRAIN_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in before.items():
                    signal.signal(sig, handler)

    def _drain_signal(self, sig, frame) -> None:
        # a signal handler: queue it only, on_tick acts on it (and may log)
        self._drain_sigs.append(sig)

    def handle_exit(self, sig, frame) -> None:
        # a signal handler: set flags only, on_tick acts on them
        self.gw.draining = True
        notice = self.gw.config.drain_notice_s
        if sig == signal.SIGTERM and self._notice_until is None and notice > 0:
            # a drain under way has given all or part of the notice already
            self._notice_until = self._drain_until or time.monotonic() + notice
            self._pending_sig = sig
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        while self._drain_sigs:
            self._drain_or_resume(self._drain_sigs.pop(0))
        now = time.monotonic()
        if self._drain_until is not None and not self.gw.refusing and now >= self._drain_until:
            self.gw.refusing = True
            log.warning("drained: new requests are refused, %d in flight", self.gw.in_flight)
        if self._pending_sig is not None and now >= self._notice_until:
            sig, self._pending_sig = self._pending_sig, None
            super().handle_exit(sig, None)
        return await super().on_tick(counter)

    def _drain_or_resume(self, sig: int) -> None:
        if self._notice_until is not None or self.should_exit:
            log.warning("signal %s ignored: the gateway is shutting down",
                        signal.Signals(sig).name)
        elif sig == signal.SIGUSR1:
            if self._drain_until is None:
                self._drain_until = time.monotonic() + self.gw.config.drain_notice_s
                self.gw.draining = True
                log.warning("draining (SIGUSR1): /ready answers 503; new requests are "
                            "refused after %gs", self.gw.config.drain_notice_s)
        elif self._drain_until is not None:
            self._drain_until = None
            self.gw.draining = self.gw.refusing = False
            log.warning("resumed (SIGUSR2): requests are accepted, /ready reports the models")

    async def shutdown(self, sockets=None) -> None:
        asyncio.get_running_loop().call_later(self.gw.config.drain_timeout_s,
                                              self.gw.end_streams)
        await super().shutdown(sockets)


def main() -> int:
    # queued from the start: the default action of SIGUSR1/2 is to end the process, and a
    # drain sent while the app loads (the unit is active from exec on) must not be lost
    drain_sigs: list[int] = []
    for sig in _DRAIN_SIGNALS:
        signal.signal(sig, lambda sig, frame: drain_sigs.append(sig))
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
    ), app.state.gw, drain_sigs)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
