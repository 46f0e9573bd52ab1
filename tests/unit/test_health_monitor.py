"""The background health check's verdicts, from scripted backend answers (no network)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from app.config import GatewayConfig
from app.health import HealthMonitor
from app.metrics import Metrics


class ScriptedBackend:
    """Answers /health with the next scripted (up, detail)."""

    def __init__(self, route, answers: list[bool]):
        self.route, self.answers, self.up = route, list(answers), True

    async def health(self, timeout_s: float) -> tuple[bool, str]:
        up = self.answers.pop(0)
        return up, "health answered 200" if up else "health did not answer within 2s"


def verdicts(answers: list[bool], **ready) -> list[tuple[bool, str]]:
    """(backend.up, the gateway_backend_up sample) after the start round and each check."""
    cfg = GatewayConfig.model_validate({"keys_file": "/k", "ready": ready,
                                        "models": [{"name": "m", "backend": "http://b"}]})
    gw = SimpleNamespace(config=cfg, metrics=Metrics(), backends={})
    backend = gw.backends["m"] = ScriptedBackend(cfg.models[0], answers)
    monitor = HealthMonitor(gw)

    async def run() -> list[tuple[bool, str]]:
        out = []
        for _ in answers:
            await monitor.check("m")
            sample = gw.metrics.registry.get_sample_value("gateway_backend_up", {"model": "m"})
            out.append((backend.up, f"{sample:g}"))
        return out

    return asyncio.run(run())


def test_one_missed_check_is_not_an_outage_two_are():
    got = verdicts([True, False, True, False, False, True])
    assert [up for up, _ in got] == [True, True, True, True, False, True]
    assert got[4] == (False, "0") and got[5] == (True, "1")


def test_down_after_one_marks_down_at_the_first_failure():
    assert [up for up, _ in verdicts([True, False], down_after=1)] == [True, False]


def test_a_backend_down_at_start_counts_as_down_at_once():
    assert verdicts([False, False]) == [(False, "0"), (False, "0")]
