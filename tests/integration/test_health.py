"""/health, /ready (shallow and deep) and start-up refusal of a bad configuration."""

import json
import subprocess
import sys

import httpx
import pytest

from tests.conftest import start_fake_backend
from tests.support.gateway import start_gateway
from tests.support.procs import wait_until


def test_health_is_just_the_process(gateway):
    r = httpx.get(gateway.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_ready_reports_each_model_and_ignores_optional_ones(gateway):
    r = httpx.get(gateway.url + "/ready")
    body = r.json()
    # "ghost" is down, but it is declared required: false
    assert r.status_code == 200 and body["status"] == "ready"
    assert body["models"]["text2sql"]["status"] == "up"
    assert body["models"]["ghost"] == {"status": "down", "required": False,
                                       "detail": "connection refused or reset"}
    assert 'gateway_backend_up{model="ghost"} 0.0' in gateway.metrics()


@pytest.fixture
def stand_ins(tmp_path):
    """Start stand-in backends; each is stopped at the end, whatever happened."""
    started = []

    def start(name: str, **kw):
        b = start_fake_backend(tmp_path, name, **kw)
        started.append(b)
        return b

    yield start
    for b in started:
        b.proc.stop()


def _up_metric(gw, model: str) -> str | None:
    for line in gw.metrics().splitlines():
        if line.startswith(f'gateway_backend_up{{model="{model}"}}'):
            return line.rsplit(" ", 1)[1]
    return None


def _ready(gw) -> httpx.Response:
    return httpx.get(gw.url + "/ready")


def test_a_stopped_backend_is_marked_down_by_itself_and_its_requests_get_503(
        tmp_path, stand_ins):
    backend = stand_ins("solo")
    port = int(backend.url.rsplit(":", 1)[1])
    gw = start_gateway(tmp_path / "gw", {
        "models": [{"name": "solo", "backend": backend.url}], "ready": {"interval_s": 0.2}},
        {"k": []})
    try:
        assert _ready(gw).status_code == 200 and _up_metric(gw, "solo") == "1.0"
        backend.proc.stop()
        # nobody calls /ready: the background check alone turns the metric to 0
        wait_until(lambda: _up_metric(gw, "solo") == "0.0", what="backend_up turning 0")
        r = httpx.post(gw.url + "/v1/completions", headers=gw.auth("k"),
                       json={"model": "solo", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "backend_unavailable"
        r = _ready(gw)
        assert r.status_code == 503
        assert r.json()["status"] == "not_ready" and r.json()["down"] == ["solo"]
        stand_ins("solo", port=port)
        wait_until(lambda: _ready(gw).status_code == 200, what="/ready recovering")
        assert _up_metric(gw, "solo") == "1.0"
    finally:
        gw.stop()


def test_deep_probe_catches_an_engine_stuck_behind_a_live_http_server(
        tmp_path, stand_ins):
    backend = stand_ins("stuck")
    gw = start_gateway(tmp_path / "gw", {
        "models": [{"name": "stuck", "backend": backend.url}],
        "ready": {"interval_s": 0.2, "deep_probe": True, "deep_probe_timeout_s": 0.5,
                  "deep_probe_interval_s": 1},
    }, {"k": []})
    try:
        assert _ready(gw).status_code == 200
        backend.set_stuck(True)
        assert httpx.get(backend.url + "/health").status_code == 200  # HTTP side still fine
        # nobody calls /ready: the background probe alone turns the metric to 0
        wait_until(lambda: _up_metric(gw, "stuck") == "0.0", what="backend_up turning 0")
        r = httpx.post(gw.url + "/v1/completions", headers={**gw.auth("k"), "x-request-id": "r1"},
                       json={"model": "stuck", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
        # answered by the gateway itself: sent to the stuck engine it would have hung for the
        # model's timeout_s (120 s), and the access line would carry a time to first byte
        line = next(json.loads(x) for x in gw.log_lines() if '"client_request_id":"r1"' in x)
        assert line["error"] == "backend_unavailable" and line["ttft_ms"] is None
        r = _ready(gw)
        assert r.status_code == 503
        assert "no answer within 0.5s" in r.json()["models"]["stuck"]["detail"]
        backend.set_stuck(False)
        wait_until(lambda: _ready(gw).status_code == 200, what="/ready recovering")
    finally:
        gw.stop()


def test_deep_probes_cost_one_generation_per_interval_however_often_ready_is_asked(
        tmp_path, stand_ins):
    backend = stand_ins("calm")
    gw = start_gateway(tmp_path / "gw", {
        "models": [{"name": "calm", "backend": backend.url}],
        "ready": {"interval_s": 0.1, "deep_probe": True, "deep_probe_interval_s": 3600},
    }, {})
    try:
        for _ in range(5):
            assert _ready(gw).status_code == 200
        assert backend.stats()["requests"] == 1  # the probe at start, reused since
    finally:
        gw.stop()


def test_bad_config_stops_the_process_with_the_field_named(tmp_path):
    cfg = tmp_path / "gateway.yml"
    cfg.write_text("keys_file: k.json\nmodels:\n  - name: a\n    backend: http://x\n"
                   "    colour: red\n")
    out = subprocess.run([sys.executable, "-m", "app"], capture_output=True, text=True,
                         env={"GATEWAY_CONFIG": str(cfg)}, timeout=30)
    assert out.returncode == 2
    assert "models.0.colour: unknown field" in out.stderr and "Traceback" not in out.stderr
