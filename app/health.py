"""/health (the process answers), /ready (every required model answers) and /metrics."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.state import Gateway

router = APIRouter()
log = logging.getLogger("gateway.health")


class HealthMonitor:
    """Checks every backend on its own timer, whether or not anyone asks: /ready, the
    `gateway_backend_up` metric and each Backend's `up` (the request path's fast 503) read
    the latest result. Load-balancer polling therefore never multiplies into backend load.
    The deep probe costs a real generation, so it has its own, longer interval; a failed
    probe is repeated on the next round so recovery shows quickly."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.results: dict[str, dict] = {}
        self._deep: dict[str, tuple[float, bool, str]] = {}
        self._fails: dict[str, int] = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        # one round before serving, so the first /ready already tells the truth
        await asyncio.gather(*(self.check(n) for n in self.gw.backends))
        self._tasks = [asyncio.create_task(self._loop(n), name=f"health:{n}")
                       for n in self.gw.backends]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _loop(self, name: str) -> None:
        # one loop per backend: a slow probe of one model never delays another's check
        while True:
            await asyncio.sleep(self.gw.config.ready.interval_s)
            try:
                await self.check(name)
            except Exception:
                log.exception("health check of %s failed unexpectedly", name)

    async def check(self, name: str) -> None:
        cfg, backend = self.gw.config.ready, self.gw.backends[name]
        up, detail = await backend.health(cfg.timeout_s)
        if up and cfg.deep_probe:
            last = self._deep.get(name)
            now = time.monotonic()
            if last is None or now - last[0] >= cfg.deep_probe_interval_s or not last[1]:
                ok, probe_detail = await backend.probe(cfg.deep_probe_timeout_s)
                last = self._deep[name] = (now, ok, probe_detail)
            up, detail = last[1], last[2]
        fails = self._fails[name] = 0 if up else self._fails.get(name, 0) + 1
        # A busy engine can miss one deadline; calling it down would turn away every request
        # for an interval. With no earlier result (at start) the first one counts.
        if not up and fails < cfg.down_after and name in self.results:
            return
        if up != backend.up:
            log.log(logging.INFO if up else logging.WARNING, "model %s is %s: %s", name,
                    "up" if up else "down", detail)
        backend.up = up
        self.gw.metrics.backend_up.labels(name).set(1 if up else 0)
        self.results[name] = {"status": "up" if up else "down",
                              "required": backend.route.required, "detail": detail}


def _json(data: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json",
                    headers={"cache-control": "no-store"})


@router.get("/health", summary="The gateway process answers")
async def health() -> Response:
    return _json({"status": "ok"})


@router.get("/ready", summary="Every required model's backend answers (503 otherwise)")
async def ready(request: Request) -> Response:
    """503 while draining too. `in_flight` (requests holding a model slot) and `accepting`
    (false once a drain refuses new requests) let a rolling restart wait for an idle host;
    `down` still tells whether the backends are up while the host is drained."""
    gw: Gateway = request.app.state.gw
    models = request.app.state.health.results
    down = [n for n, m in models.items() if m["required"] and m["status"] != "up"]
    status = "draining" if gw.draining else "not_ready" if down else "ready"
    return _json({"status": status, "accepting": not gw.refusing, "in_flight": gw.in_flight,
                  "down": down, "models": models}, 200 if status == "ready" else 503)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gw
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
