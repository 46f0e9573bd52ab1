"""What a running gateway holds: its configuration, keys, limiter, metrics and backends."""

from __future__ import annotations

from app.config import GatewayConfig
from app.keys import KeyStore
from app.limits import Limiter, make_limiter
from app.metrics import Metrics
from app.upstream import Backend


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.keys = KeyStore(config.keys_file)
        self.metrics = Metrics()
        self.backends: dict[str, Backend] = {}
        self.limiter: Limiter | None = None
        self.draining = False

    async def start(self) -> None:
        """Open the pools; needs the running event loop."""
        self.backends = {m.name: Backend(m) for m in self.config.models}
        rl = self.config.rate_limit
        # a crashed gateway's concurrency slots free themselves after the longest request
        lease = max(m.timeout_s for m in self.config.models) + 30
        self.limiter = make_limiter(rl.redis_url, rl.window_s, lease, rl.on_redis_error)

    async def stop(self) -> None:
        for b in self.backends.values():
            await b.close()
        if self.limiter is not None:
            await self.limiter.close()
