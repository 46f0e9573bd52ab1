"""SIGTERM: stop accepting, let in-flight streams finish within the drain timeout, exit."""

import signal
import threading
import time

import httpx

from tests.conftest import models_config
from tests.support.gateway import start_gateway


def test_sigterm_lets_an_in_flight_stream_finish_then_exits(backends, tmp_path):
    gw = start_gateway(tmp_path, {"models": models_config(backends), "drain_timeout_s": 20},
                       {"k": []})
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
    time.sleep(0.3)
    # no new connections once draining
    try:
        httpx.get(gw.url + "/health", timeout=2)
        refused = False
    except httpx.TransportError:
        refused = True
    t.join(30)
    assert refused
    # uvicorn re-raises SIGTERM after its graceful shutdown; systemd counts that as clean
    assert gw.proc.popen.wait(30) in (0, -signal.SIGTERM)
    # all 12 tokens and the end marker arrived although SIGTERM came after the first
    assert len([x for x in received if x.startswith("data: {")]) == 12
    assert received[-1] == "data: [DONE]"
    assert backends["sql"].stats()["cancelled"] == 0
    gw.stop()
