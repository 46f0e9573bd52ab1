"""SIGUSR1 drains a running gateway without stopping it (a rolling restart takes the host out
of the pool), SIGUSR2 resumes: the notice with /ready at 503 while everything is served, then
new requests refused with 503 while those in flight finish, an in-flight count that reaches 0,
and a SIGTERM during a drain that still ends the process cleanly."""

import signal
import threading

import httpx

from tests.conftest import models_config
from tests.support.gateway import start_gateway
from tests.support.procs import wait_until


def _ready(gw) -> httpx.Response:
    return httpx.get(gw.url + "/ready", timeout=5)


def _complete(gw, prompt: str = "hi") -> httpx.Response:
    return httpx.post(gw.url + "/v1/completions", headers=gw.auth("k"), timeout=10,
                      json={"model": "text2sql", "prompt": prompt, "max_tokens": 3})


class _Stream(threading.Thread):
    """A completion stream of `tokens` events, read to its end in a thread."""

    def __init__(self, gw, tokens: int):
        super().__init__()
        self.gw, self.tokens = gw, tokens
        self.status: int | None = None
        self.events: list[str] = []
        self.started = threading.Event()

    def run(self) -> None:
        body = {"model": "text2sql", "prompt": "[[delay=0.15]]", "max_tokens": self.tokens,
                "stream": True}
        with httpx.stream("POST", self.gw.url + "/v1/completions", json=body,
                          headers=self.gw.auth("k"), timeout=30) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line)
                    self.started.set()

    def complete(self) -> bool:
        return (self.status == 200 and self.events[-1] == "data: [DONE]"
                and len([e for e in self.events if e.startswith("data: {")]) == self.tokens)


def _refusing(gw) -> dict | None:
    body = _ready(gw).json()
    return body if not body["accepting"] else None


def test_during_the_notice_ready_is_503_and_requests_are_served_then_resume(backends, tmp_path):
    # a notice far longer than the test: only the notice's behaviour is seen
    gw = start_gateway(tmp_path, {"models": models_config(backends), "drain_notice_s": 600},
                       {"k": []})
    try:
        assert _ready(gw).json() | {"models": None} == {
            "status": "ready", "accepting": True, "in_flight": 0, "down": [], "models": None}
        gw.proc.signal(signal.SIGUSR1)
        r = wait_until(lambda: (r := _ready(gw)).status_code == 503 and r,
                       what="/ready turning 503")
        # the balancer is told to stop sending; whatever it still sends is served as usual
        assert r.json()["status"] == "draining" and r.json()["accepting"] is True
        assert r.json()["down"] == []  # the models are still reported while drained
        out = _complete(gw)
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(gw.url + "/v1/models", headers=gw.auth("k")).status_code == 200
        gw.proc.signal(signal.SIGUSR2)
        r = wait_until(lambda: (r := _ready(gw)).status_code == 200 and r,
                       what="/ready turning 200 again")
        assert r.json()["status"] == "ready" and r.json()["accepting"] is True
        assert _complete(gw).status_code == 200
        assert gw.proc.popen.poll() is None  # drained and resumed, never stopped
    finally:
        gw.stop()


def test_after_the_notice_new_requests_get_503_while_a_stream_in_flight_finishes(
        backends, tmp_path):
    gw = start_gateway(tmp_path, {"models": models_config(backends), "drain_notice_s": 0.5,
                                  "drain_timeout_s": 20}, {"k": []})
    try:
        # 40 events 0.15 s apart: still running when the notice is over
        stream = _Stream(gw, 40)
        stream.start()
        assert stream.started.wait(10)
        gw.proc.signal(signal.SIGUSR1)
        body = wait_until(lambda: _refusing(gw), what="the notice ending")
        assert body["status"] == "draining"
        assert body["in_flight"] == 1  # the stream, not over yet
        # a new request: refused at once, in OpenAI's error form, with when to retry
        r = _complete(gw)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        assert r.json() == {"error": {
            "message": "this host is draining for a restart and accepts no new requests; "
                       "retry the request",
            "type": "service_unavailable", "param": None, "code": "gateway_draining"}}
        models = httpx.get(gw.url + "/v1/models", headers=gw.auth("k"))
        assert models.status_code == 503 and models.json()["error"]["code"] == "gateway_draining"
        # the stream begun before the drain ends normally, every token and the end marker
        stream.join(30)
        assert stream.complete(), stream.events[-3:]
        assert backends["sql"].stats()["cancelled"] == 0
        assert wait_until(lambda: _ready(gw).json()["in_flight"] == 0, what="in-flight 0")
        assert _ready(gw).status_code == 503  # still drained until told otherwise
        # resume: ready again and serving
        gw.proc.signal(signal.SIGUSR2)
        r = wait_until(lambda: (r := _ready(gw)).status_code == 200 and r, what="resume")
        assert r.json()["accepting"] is True and r.json()["in_flight"] == 0
        assert _complete(gw).status_code == 200
        assert "gateway_draining" in gw.proc.log()  # the refusal is logged like any request
    finally:
        gw.stop()


def test_sigterm_during_a_drain_lets_the_stream_finish_and_exits_cleanly(backends, tmp_path):
    gw = start_gateway(tmp_path, {"models": models_config(backends), "drain_notice_s": 0.5,
                                  "drain_timeout_s": 20}, {"k": []})
    try:
        stream = _Stream(gw, 30)
        stream.start()
        assert stream.started.wait(10)
        gw.proc.signal(signal.SIGUSR1)
        wait_until(lambda: _refusing(gw), what="the notice ending")
        gw.proc.signal(signal.SIGTERM)
        # a resume after SIGTERM changes nothing: the process is on its way out
        gw.proc.signal(signal.SIGUSR2)
        stream.join(30)
        assert stream.complete(), stream.events[-3:]
        # uvicorn re-raises SIGTERM after its graceful shutdown; systemd counts that as clean
        assert gw.proc.popen.wait(30) in (0, -signal.SIGTERM)
        assert backends["sql"].stats()["cancelled"] == 0
    finally:
        gw.stop()

