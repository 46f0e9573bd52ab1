"""What a running gateway holds: its configuration, keys, limiter, metrics and backends."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from app.config import GatewayConfig
from app.keys import KeyStore
from app.limits import Limiter, make_limiter
from app.metrics import Metrics
from app.redis_client import check_at_start, read_password
from app.upstream import Backend

log = logging.getLogger("gateway")


class ShuttingDown(Exception):
    """Set on an open stream's backend reader when the drain deadline passes."""


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.metrics = Metrics()
        # KeyStoreError here stops the process: it must not serve with a wrong key set
        self.keys_mirror = None
        keys_file = config.keys_file
        if config.keys_s3 is not None:
            # the shared key set: fetched into its local copy now, that copy served like a
            # keys file, and kept up to date by the mirror's polls (started in start())
            from app.keys_s3 import KeysMirror

            self.keys_mirror = KeysMirror(config.keys_s3, self.metrics,
                                          on_reload=self.metrics.keys_reloaded)
            self.keys_mirror.load_at_start()
            keys_file = config.keys_s3.cache_file
        self.keys = KeyStore(keys_file, must_exist=True, on_reload=self.metrics.keys_reloaded)
        rl = config.rate_limit
        # ConfigError here stops the process too: an unusable password source, or a Redis
        # that refuses the password or whose certificate fails (an unreachable one does not)
        self._redis_password = read_password(rl)
        if rl.redis_url is not None:
            check_at_start(rl, self._redis_password)
        self.backends: dict[str, Backend] = {}
        self.limiter: Limiter | None = None
        # /ready answers 503 from SIGTERM or SIGUSR1 (a drain) on, so load balancers stop
        # sending first; once the notice is over, `refusing` turns new API requests away with
        # 503 (a drain's second step: under SIGTERM the listener closes instead)
        self.draining = False
        self.refusing = False
        # the backend responses of open streams (SseRelay adds and removes them)
        self.streams: set[aiohttp.ClientResponse] = set()
        self._keys_task: asyncio.Task | None = None
        self._mirror_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Open the pools; needs the running event loop."""
        self.backends = {m.name: Backend(m) for m in self.config.models}
        rl = self.config.rate_limit
        # a crashed gateway's concurrency slots free themselves after the longest request
        lease = max(m.timeout_s for m in self.config.models) + 30
        self.limiter = make_limiter(rl.redis_url, rl.window_s, lease, rl.on_redis_error,
                                    rl.timeout_s, password=self._redis_password,
                                    ca_file=rl.redis_ca_file)
        self._keys_task = asyncio.create_task(self._watch_keys(), name="keys-watch")
        if self.keys_mirror is not None:
            self._mirror_task = asyncio.create_task(self.keys_mirror.run(self.keys),
                                                    name="keys-s3-poll")

    async def _watch_keys(self) -> None:
        # requests re-read the file too, but a bad file must be reported when none come
        while True:
            await asyncio.sleep(self.keys.recheck_s)
            try:
                self.keys.check()
            except Exception:
                log.exception("checking the keys file failed unexpectedly")

    @property
    def in_flight(self) -> int:
        """Requests holding a model slot: every request past admission, a stream until its
        last event. Once `refusing`, no request takes a slot, so this only falls."""
        return sum(b.in_flight for b in self.backends.values())

    def end_streams(self) -> None:
        """The drain deadline: every open stream ends with an error event, not a cut."""
        for resp in list(self.streams):
            resp.content.set_exception(ShuttingDown())

    async def stop(self) -> None:
        for task in (self._keys_task, self._mirror_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for b in self.backends.values():
            await b.close()
        if self.limiter is not None:
            await self.limiter.close()
