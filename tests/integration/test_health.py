"""/health, /ready (shallow and deep) and start-up refusal of a bad configuration."""

import subprocess
import sys
import time

import httpx

from tests.conftest import start_fake_backend
from tests.support.gateway import start_gateway


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


def test_ready_is_503_when_a_required_backend_goes_down_and_recovers(tmp_path):
    backend = start_fake_backend(tmp_path, "solo")
    port = int(backend.url.rsplit(":", 1)[1])
    gw = start_gateway(tmp_path / "gw", {
        "models": [{"name": "solo", "backend": backend.url}], "ready": {"cache_s": 0}}, {})
    try:
        assert httpx.get(gw.url + "/ready").status_code == 200
        backend.proc.stop()
        r = httpx.get(gw.url + "/ready")
        assert r.status_code == 503
        assert r.json()["status"] == "not_ready" and r.json()["down"] == ["solo"]
        backend = start_fake_backend(tmp_path, "solo", port=port)
        assert httpx.get(gw.url + "/ready").status_code == 200
    finally:
        gw.stop()
        backend.proc.stop()


def test_deep_probe_catches_an_engine_stuck_behind_a_live_http_server(tmp_path):
    backend = start_fake_backend(tmp_path, "stuck")
    gw = start_gateway(tmp_path / "gw", {
        "models": [{"name": "stuck", "backend": backend.url}],
        "ready": {"cache_s": 0, "deep_probe": True, "deep_probe_timeout_s": 0.5,
                  "deep_probe_interval_s": 1},
    }, {})
    try:
        assert httpx.get(gw.url + "/ready").status_code == 200
        assert backend.stats()["requests"] == 1  # one real one-token completion
        httpx.get(gw.url + "/ready")
        # a passing probe is reused for its interval: frequent polls cost no generations
        assert backend.stats()["requests"] == 1
        backend.set_stuck(True)
        assert httpx.get(backend.url + "/health").status_code == 200  # HTTP side still fine
        time.sleep(1.1)
        r = httpx.get(gw.url + "/ready")
        assert r.status_code == 503
        assert "no answer within 0.5s" in r.json()["models"]["stuck"]["detail"]
        backend.set_stuck(False)
        assert httpx.get(gw.url + "/ready").status_code == 200  # a failed probe reruns at once
    finally:
        gw.stop()
        backend.proc.stop()


def test_bad_config_stops_the_process_with_the_field_named(tmp_path):
    cfg = tmp_path / "gateway.yml"
    cfg.write_text("keys_file: k.json\nmodels:\n  - name: a\n    backend: http://x\n"
                   "    colour: red\n")
    out = subprocess.run([sys.executable, "-m", "app"], capture_output=True, text=True,
                         env={"GATEWAY_CONFIG": str(cfg)}, timeout=30)
    assert out.returncode == 2
    assert "models.0.colour: unknown field" in out.stderr and "Traceback" not in out.stderr
