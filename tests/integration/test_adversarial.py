"""The gateway as a hostile client and a failing backend would try it.

Every case checks the exact status and, afterwards, the bookkeeping: no request stays in
flight, and the key's budget is what it should be.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import GENEROUS, models_config
from tests.integration.test_errors import assert_openai_error
from tests.support.gateway import redis_limits, start_gateway
from tests.support.procs import PYTHON, Proc, free_port


@pytest.fixture(scope="module")
def bad_backend(tmp_path_factory):
    port = free_port()
    proc = Proc("bad-backend", [PYTHON, "-m", "tests.support.bad_backend", "--port", str(port)],
                tmp_path_factory.mktemp("bad") / "bad.log")
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health")
    yield url
    proc.stop()


def bad_log(url: str) -> dict:
    return httpx.get(url + "/_bad/log").json()


KEYS = {
    "default": GENEROUS,
    # small budgets, each key for one kind of test so the counts stay exact
    "rpm5": ["--rpm", "5", "--concurrency", "100", "--tpm", "1000000"],
    "conc2": ["--rpm", "1000", "--concurrency", "2", "--tpm", "1000000"],
    "tpm1000": ["--rpm", "1000", "--concurrency", "100", "--tpm", "1000"],
    "paid": ["--rpm", "1000", "--concurrency", "100", "--tpm", "100000"],
    "large3": ["--rpm", "3", "--concurrency", "100", "--tpm", "1000"],
    # one key per settlement test: no entry of another test leaves its window midway
    **{f"paid-{n}": ["--rpm", "1000", "--concurrency", "100", "--tpm", "100000"]
       for n in ("cut", "timeout", "refused")},
}


def gateway_config(backends, bad_url: str) -> dict:
    models = [m for m in models_config(backends) if m["name"] != "ghost"]
    models.append({"name": "bad", "backend": bad_url, "max_tokens": 64, "timeout_s": 2,
                   "stream_max_s": 2})
    models.append({"name": "capped", "backend": backends["coder"].url, "served_name": "sql-coder",
                   "max_tokens": 64, "max_concurrency": 4})
    return {"models": models, "max_body_bytes": 1_048_576, "max_response_bytes": 1_048_576}


@pytest.fixture(scope="module", params=["memory", "redis"])
def hostile_gw(request, backends, bad_backend, tmp_path_factory):
    """The gateway under attack, with counters in process and in Redis."""
    cfg = gateway_config(backends, bad_backend)
    if request.param == "redis":
        cfg["rate_limit"] = redis_limits(request.getfixturevalue("redis_server"))
        # a fresh key set: the Redis counters of the memory round must not carry over
    gw = start_gateway(tmp_path_factory.mktemp(f"hostile-{request.param}"), cfg, KEYS)
    yield gw
    gw.stop()


def in_flight(gw) -> dict[str, float]:
    return {m: float(v) for m, v in re.findall(
        r'^gateway_in_flight_requests\{model="([^"]+)"\} (\S+)$', gw.metrics(), re.M)}


@pytest.fixture(autouse=True)
def nothing_stuck(request):
    """After every case: no request left in flight, on any model."""
    yield
    if "hostile_gw" not in request.fixturenames:
        return
    gw = request.getfixturevalue("hostile_gw")
    deadline = time.monotonic() + 10
    while any(in_flight(gw).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(in_flight(gw).values()), in_flight(gw)
    assert "Traceback" not in gw.proc.log()


def post(gw, body, path="/v1/completions", key="default", **kw):
    return httpx.post(gw.url + path, json=body, headers={**gw.auth(key), **kw.pop("headers", {})},
                      timeout=kw.pop("timeout", 15), **kw)


def remaining(r) -> tuple[int, int]:
    return (int(r.headers["x-ratelimit-remaining-requests"]),
            int(r.headers["x-ratelimit-remaining-tokens"]))


def stream_events(gw, body, path="/v1/completions", key="default") -> list[str]:
    with httpx.stream("POST", gw.url + path, json={**body, "stream": True}, headers=gw.auth(key),
                      timeout=15) as r:
        assert r.status_code == 200, r.read()
        return [ln for ln in r.iter_lines() if ln]


BODY = {"model": "text2sql", "prompt": "hello", "max_tokens": 2}


# ---- budgets that cannot be dodged


def test_a_reused_request_id_does_not_dodge_requests_per_minute(hostile_gw, backends):
    same = {"x-request-id": "same-id"}
    got = [post(hostile_gw, BODY, key="rpm5", headers=same) for _ in range(8)]
    assert [r.status_code for r in got] == [200] * 5 + [429] * 3
    # the client's id is echoed, but the backend saw the gateway's own, distinct ids
    assert {r.headers["x-request-id"] for r in got} == {"same-id"}
    ids = {r.json()["id"] for r in got[:5]}
    assert len(ids) == 5 and not any("same-id" in i for i in ids)


def test_a_reused_request_id_does_not_dodge_concurrency(hostile_gw):
    async def burst():
        async with httpx.AsyncClient(timeout=15) as c:
            return await asyncio.gather(*(c.post(
                hostile_gw.url + "/v1/completions",
                json={**BODY, "prompt": "[[sleep=3]]"},
                headers={**hostile_gw.auth("conc2"), "x-request-id": "same-id"})
                for _ in range(6)))

    codes = sorted(r.status_code for r in asyncio.run(burst()))
    assert codes == [200, 200, 429, 429, 429, 429]


@pytest.mark.parametrize("extra, param", [
    ({"max_completion_tokens": 1, "max_tokens": 2000}, "max_tokens"),
    ({"max_completion_tokens": 2000}, "max_completion_tokens"),
    ({"max_completion_tokens": -5}, "max_completion_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": "9"}, "max_completion_tokens"),
    ({"max_completion_tokens": [1]}, "max_completion_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_every_token_field_is_validated_and_capped(hostile_gw, extra, param, path):
    body = {"model": "text2sql", **extra}
    body.update({"prompt": "x"} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": "x"}]})
    err = assert_openai_error(post(hostile_gw, body, path), 400)
    assert err["param"] == param or err["param"].startswith(param)


def test_max_completion_tokens_alone_is_what_the_backend_generates(hostile_gw):
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = post(hostile_gw, {"model": "text2sql", "max_completion_tokens": 3, **body}, path)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_no_request_credits_a_key(hostile_gw):
    r = post(hostile_gw, BODY, key="paid")
    reqs, toks = remaining(r)
    assert toks <= 100_000 and reqs <= 1000


def test_model_concurrency_cap_holds_under_a_burst(hostile_gw, backends):
    async def burst():
        async with httpx.AsyncClient(timeout=15) as c:
            return await asyncio.gather(*(c.post(
                hostile_gw.url + "/v1/completions",
                json={"model": "capped", "prompt": "[[sleep=3]]", "max_tokens": 1},
                headers=hostile_gw.auth()) for _ in range(20)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 4 + [503] * 16
    refused = next(r for r in responses if r.status_code == 503)
    assert_openai_error(refused, 503, "model_at_capacity")
    assert refused.headers["retry-after"] == "1"


@pytest.mark.parametrize("path, body", [
    # 10 prompts x n=2 x 64 tokens = 1280 tokens of generation alone
    ("/v1/completions", {"prompt": ["p"] * 10, "n": 2, "max_tokens": 64}),
    ("/v1/completions", {"prompt": [[1, 2, 3]] * 20, "max_tokens": 64}),
    ("/v1/completions", {"prompt": "x", "n": 16, "max_tokens": 64}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                              "tools": [{"type": "function", "function": {
                                  "name": "f", "description": "d" * 5000}}]}),
    ("/v1/chat/completions", {"max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
    ("/v1/embeddings", {"model": "embed", "input": ["word " * 20] * 200}),
])
def test_the_reservation_covers_everything_the_request_can_cost(hostile_gw, path, body):
    body = {"model": "text2sql", **body}
    err = assert_openai_error(post(hostile_gw, body, path, key="tpm1000"), 400,
                              "tokens_exceed_budget")
    assert "1000" in err["message"]
    # a single prompt of the same kind fits
    assert post(hostile_gw, {**BODY, "max_tokens": 64}, key="tpm1000").status_code == 200


@pytest.mark.parametrize("path, field, body", [
    ("/v1/completions", "prompt", {"model": "text2sql", "prompt": ["p"] * 2049}),
    ("/v1/embeddings", "input", {"model": "embed", "input": ["p"] * 2049}),
    ("/v1/chat/completions", "messages",
     {"model": "text2sql", "messages": [{"role": "user", "content": "x"}] * 2049}),
])
def test_list_lengths_are_bounded(hostile_gw, path, field, body):
    err = assert_openai_error(post(hostile_gw, body, path), 400)
    assert err["param"].startswith(field)


def _next_remaining(gw, key):
    """(remaining requests, remaining tokens) right after a known, tiny request."""
    r = post(gw, {**BODY, "max_tokens": 1, "prompt": "abc"}, key=key)  # reserves 1 + 1 tokens
    assert r.status_code == 200
    return remaining(r)


def test_a_stream_cut_midway_is_paid_for(hostile_gw):
    before = _next_remaining(hostile_gw, "paid-cut")
    events = stream_events(hostile_gw, {"model": "bad", "prompt": "bad:stream_cut"},
                           key="paid-cut")
    assert events[-1].startswith("data: {\"error\"") and "backend_stream_broken" in events[-1]
    after = _next_remaining(hostile_gw, "paid-cut")
    # the cut stream still counts as a request, and its tokens as used: the 14-character
    # prompt's estimate (14 // 4 + 1 = 4) plus 3 chunks; the probes themselves use 1 + 1 each
    assert before[0] - after[0] == 2
    assert before[1] - after[1] == (4 + 3) + 2


def test_a_non_streaming_timeout_is_charged_its_reservation(hostile_gw):
    before = _next_remaining(hostile_gw, "paid-timeout")
    r = post(hostile_gw, {"model": "bad", "prompt": "bad:hang", "max_tokens": 50},
             key="paid-timeout")
    assert_openai_error(r, 504, "backend_timeout")
    after = _next_remaining(hostile_gw, "paid-timeout")
    assert before[0] - after[0] == 2
    assert before[1] - after[1] == (8 // 4 + 1 + 50) + 2


def test_a_refused_request_costs_nothing(hostile_gw):
    before = _next_remaining(hostile_gw, "paid-refused")
    r = post(hostile_gw, {**BODY, "prompt": "[[status=400]]"}, key="paid-refused")
    assert r.status_code == 400
    after = _next_remaining(hostile_gw, "paid-refused")
    assert before[0] - after[0] == 1 and before[1] - after[1] == 2


def test_large_bodies_count_against_requests_per_minute_even_when_refused(hostile_gw):
    big = {"model": "text2sql", "prompt": [7] * 40_000, "max_tokens": 64}  # over 64 KB
    got = [post(hostile_gw, big, key="large3") for _ in range(5)]
    assert [r.status_code for r in got] == [400, 400, 400, 429, 429]
    assert_openai_error(got[0], 400, "tokens_exceed_budget")
    assert_openai_error(got[3], 429, "rate_limit_exceeded")
    # and the key's budget is spent for small requests too
    assert post(hostile_gw, BODY, key="large3").status_code == 429


# ---- no 5xx from a client


def nested(depth: int) -> str:
    """An object `depth` levels deep, as JSON text (Python's own encoder stops at ~1000)."""
    return '{"x":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("path, raw", [
    ("/v1/completions",
     '{"model": "text2sql", "prompt": "x", "stream": true, "extra": ' + nested(300) + "}"),
    ("/v1/chat/completions", '{"model": "text2sql", "messages": [{"role": "user", '
     '"content": [' + nested(1000) + "]}]}"),
    ("/v1/completions", '{"model": "text2sql", "prompt": "x", "logit_bias": ' + nested(64) + "}"),
])
def test_deeply_nested_bodies_are_400(hostile_gw, path, raw):
    r = httpx.post(hostile_gw.url + path, content=raw, headers=hostile_gw.auth(), timeout=15)
    err = assert_openai_error(r, 400)
    assert "deeper" in err["message"]


def test_a_body_shorter_than_its_length_from_a_client_that_left_is_499(hostile_gw):
    host, port = hostile_gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n"
                  b"authorization: " + hostile_gw.auth()["authorization"].encode() +
                  b"\r\ncontent-type: application/json\r\n\r\n{\"model\": \"text2sql\"")
    deadline = time.monotonic() + 10
    while '"status":499' not in hostile_gw.proc.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert '"status":499' in hostile_gw.proc.log()


def test_a_client_that_leaves_a_non_streaming_request_cancels_it(hostile_gw, backends):
    sql = backends["sql"]
    with pytest.raises(httpx.ReadTimeout):
        post(hostile_gw, {**BODY, "prompt": "[[delay=0.2]]", "max_tokens": 30}, timeout=0.8)
    deadline = time.monotonic() + 10
    while sql.stats()["cancelled"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sql.stats()["cancelled"] == 1 and sql.stats()["completed"] == 0


def test_a_trailing_slash_is_a_404_not_a_redirect(hostile_gw):
    r = post(hostile_gw, BODY, "/v1/completions/", follow_redirects=False)
    err = assert_openai_error(r, 404)
    assert "location" not in r.headers and "/v1/completions" in err["message"]


@pytest.mark.parametrize("path, body, hint", [
    ("/v1/completions", {"model": "embed", "prompt": "x"}, "/v1/embeddings"),
    ("/v1/chat/completions", {"model": "embed", "messages": [{"role": "user", "content": "x"}]},
     "/v1/embeddings"),
    ("/v1/embeddings", {"model": "text2sql", "input": "x"}, "/v1/completions"),
])
def test_the_wrong_endpoint_for_a_model_is_400_naming_the_right_one(hostile_gw, path, body,
                                                                      hint):
    err = assert_openai_error(post(hostile_gw, body, path), 400, "wrong_endpoint_for_model")
    assert hint in err["message"]


# ---- no 500 from a backend


@pytest.mark.parametrize("mode", ["status_line", "redirect", "gzip", "html_500", "huge"])
def test_backend_faults_are_502(hostile_gw, bad_backend, mode):
    err = assert_openai_error(post(hostile_gw, {"model": "bad", "prompt": f"bad:{mode}"}), 502,
                              "backend_error")
    assert "secret" not in err["message"] and "sk-leak" not in err["message"]
    log = bad_log(bad_backend)
    assert log["redirect_followed"] == 0
    assert all("accept-encoding" not in r["headers"] for r in log["requests"])


def test_a_backend_4xx_in_html_reaches_the_client_as_a_clean_error(hostile_gw):
    err = assert_openai_error(post(hostile_gw, {"model": "bad", "prompt": "bad:html_400"}), 400)
    assert "backend status 400" in err["message"]
    assert not re.search(r"<html|secret|sk-leak", str(err))


@pytest.mark.parametrize("mode", ["usage_str", "usage_neg", "usage_list", "usage_not_object"])
def test_bad_usage_numbers_are_ignored_not_a_500_and_not_a_credit(hostile_gw, mode):
    r = post(hostile_gw, {"model": "bad", "prompt": f"bad:{mode}"}, key="paid")
    assert r.status_code == 200
    reqs, toks = remaining(r)
    assert toks <= 100_000 and reqs < 1000


@pytest.mark.parametrize("mode", ["usage_str", "usage_neg", "usage_not_object", "crlf"])
def test_streams_with_odd_usage_or_crlf_end_cleanly(hostile_gw, mode):
    events = stream_events(hostile_gw, {"model": "bad", "prompt": f"bad:stream_{mode}"})
    assert events[-1] == "data: [DONE]"
    assert sum(e.startswith("data: {") for e in events) == 3  # the hidden usage chunk is gone
    assert not any('"error"' in e for e in events)


@pytest.mark.parametrize("mode, code", [
    ("no_done", "backend_stream_broken"),
    ("endless_event", "backend_stream_broken"),
    ("hang", "backend_timeout"),
    ("trickle", "stream_deadline"),
])
def test_broken_streams_end_with_an_error_event(hostile_gw, mode, code):
    events = stream_events(hostile_gw, {"model": "bad", "prompt": f"bad:stream_{mode}"})
    assert events[-1].startswith('data: {"error"') and code in events[-1]


# ---- random bodies


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20)
fields = st.sampled_from(["model", "prompt", "messages", "input", "max_tokens",
                          "max_completion_tokens", "n", "stream", "stream_options",
                          "tools", "temperature", "stop"])
bodies = st.dictionaries(fields, json_values | st.sampled_from(["text2sql", "embed", 1, 64, -1]),
                         max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions",
                                          "/v1/embeddings"]))
def test_random_bodies_never_get_a_5xx_or_credit_the_key(hostile_gw, body, path):
    if "messages" not in body and path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "x"}]
    r = post(hostile_gw, body, path, key="paid")
    assert r.status_code < 500, r.text
    if "x-ratelimit-remaining-tokens" in r.headers:
        reqs, toks = remaining(r)
        assert toks <= 100_000 and reqs <= 1000
