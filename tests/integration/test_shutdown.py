"""SIGTERM: /ready turns 503 for the notice period while requests are still served; then stop
accepting, let in-flight streams finish within the drain timeout, end the rest with an error
event, exit."""

import json
import signal
import threading

import httpx

from tests.conftest import models_config
from tests.support.gateway import start_gateway
from tests.support.procs import wait_until


def _refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.TransportError:
        return True
    return False


def _exited_cleanly(gw) -> bool:
    # uvicorn re-raises SIGTERM after its graceful shutdown; systemd counts that as clean
    return gw.proc.popen.wait(30) in (0, -signal.SIGTERM)


def test_sigterm_lets_an_in_flight_stream_finish_then_exits(backends, tmp_path):
    gw = start_gateway(tmp_path, {"models": models_config(backends), "drain_timeout_s": 20,
                                  "drain_notice_s": 0}, {"k": []})
    received: list[str] = []
    started = threading.Event()

    def stream():
        body = {"model": "text2sql", "prompt": "[[delay=0.15]]", "max_tokens": 12,
                "stream": True}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=gw.auth("k"),
                          timeout=30) as r:
            for line in r.iter_lines():
                started.set()
                if line.startswith("data: "):
                    received.append(line)

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(10)
    gw.proc.signal(signal.SIGTERM)
    # no notice period: new connections are refused while the stream still runs
    wait_until(lambda: _refused(gw.url + "/health"), what="the listener closing")
    t.join(30)
    assert _exited_cleanly(gw)
    # all 12 tokens and the end marker arrived although SIGTERM came after the first
    assert len([x for x in received if x.startswith("data: {")]) == 12
    assert received[-1] == "data: [DONE]"
    assert backends["sql"].stats()["cancelled"] == 0
    gw.stop()


def test_ready_is_503_during_the_notice_while_requests_are_still_served(backends, tmp_path):
    # a notice far longer than the test: the second SIGTERM is what ends it
    gw = start_gateway(tmp_path, {"models": models_config(backends), "drain_notice_s": 600},
                       {"k": []})
    try:
        assert httpx.get(gw.url + "/ready").status_code == 200
        gw.proc.signal(signal.SIGTERM)
        r = wait_until(lambda: (r := httpx.get(gw.url + "/ready")).status_code == 503 and r,
                       what="/ready turning 503")
        assert r.json()["status"] == "draining"
        # the listener is still open and serves new requests as usual
        assert httpx.get(gw.url + "/health").status_code == 200
        out = gw.client("k").completions.create(model="text2sql", prompt="hi", max_tokens=3)
        assert out.usage.completion_tokens == 3
        # a second SIGTERM skips what is left of the notice
        gw.proc.signal(signal.SIGTERM)
        assert _exited_cleanly(gw)
    finally:
        gw.stop()


def test_a_stream_still_open_at_the_drain_deadline_ends_with_an_error_event(backends, tmp_path):
    gw = start_gateway(tmp_path, {"models": models_config(backends), "drain_notice_s": 0,
                                  "drain_timeout_s": 1}, {"k": []})
    body = {"model": "text2sql", "prompt": "[[delay=1]]", "max_tokens": 60, "stream": True}
    events: list[str] = []
    try:
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=gw.auth("k"),
                          timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if not events:
                    gw.proc.signal(signal.SIGTERM)
                events.append(line)
        assert _exited_cleanly(gw)
    finally:
        gw.stop()
    # not a silent cut: the last event says why the stream ended, in OpenAI's error form
    last = json.loads(events[-1].removeprefix("data: "))
    assert last == {"error": {"message": "the gateway is shutting down; retry the request",
                              "type": "service_unavailable", "param": None,
                              "code": "gateway_shutting_down"}}
    assert "data: [DONE]" not in events and len(events) < 60
    # the backend request was closed, so vLLM stops generating
    wait_until(lambda: backends["sql"].stats()["cancelled"] == 1, what="the backend abort")
