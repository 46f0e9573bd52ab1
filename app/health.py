"""/health (the process answers), /ready (every required model answers) and /metrics."""

from __future__ import annotations

import asyncio
import time

import orjson
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.state import Gateway

router = APIRouter()


class Readiness:
    """Backend checks, cached briefly so load-balancer polling never multiplies into backend
    load; the deep probe costs a real generation, so it has its own, longer interval."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self._shallow: tuple[float, dict] | None = None
        self._deep: dict[str, tuple[float, bool, str]] = {}
        self._lock = asyncio.Lock()

    async def _check(self, name: str) -> dict:
        cfg, backend = self.gw.config.ready, self.gw.backends[name]
        up, detail = await backend.health(cfg.timeout_s)
        if up and cfg.deep_probe:
            last = self._deep.get(name)
            now = time.monotonic()
            if last is None or now - last[0] >= cfg.deep_probe_interval_s or not last[1]:
                ok, probe_detail = await backend.probe(cfg.deep_probe_timeout_s)
                last = self._deep[name] = (now, ok, probe_detail)
            up, detail = last[1], last[2]
        self.gw.metrics.backend_up.labels(name).set(1 if up else 0)
        return {"status": "up" if up else "down", "required": backend.route.required,
                "detail": detail}

    async def models(self) -> dict:
        async with self._lock:
            now = time.monotonic()
            if self._shallow and now - self._shallow[0] < self.gw.config.ready.cache_s:
                return self._shallow[1]
            names = list(self.gw.backends)
            results = await asyncio.gather(*(self._check(n) for n in names))
            models = dict(zip(names, results, strict=True))
            self._shallow = (time.monotonic(), models)
            return models


def _json(data: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json",
                    headers={"cache-control": "no-store"})


@router.get("/health", summary="The gateway process answers")
async def health() -> Response:
    return _json({"status": "ok"})


@router.get("/ready", summary="Every required model's backend answers (503 otherwise)")
async def ready(request: Request) -> Response:
    gw: Gateway = request.app.state.gw
    if gw.draining:
        return _json({"status": "draining", "models": {}}, 503)
    models = await request.app.state.readiness.models()
    down = [n for n, m in models.items() if m["required"] and m["status"] != "up"]
    return _json({"status": "not_ready" if down else "ready", "down": down, "models": models},
                 503 if down else 200)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gw
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
