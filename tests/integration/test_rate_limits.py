"""Per-key limits through real gateway processes: exact under concurrency, shared via Redis."""

import asyncio
import subprocess
import time

import httpx
import pytest

from tests.conftest import models_config
from tests.support.gateway import create_key, redis_limits, start_gateway
from tests.support.procs import free_port

BODY = {"model": "sql-coder", "prompt": "a", "max_tokens": 1}


async def burst(urls: list[str], key: str, n: int = 200, body=BODY) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=30) as c:
        return await asyncio.gather(*(
            c.post(urls[i % len(urls)] + "/v1/completions", json=body,
                   headers={"authorization": f"Bearer {key}"})
            for i in range(n)))


def statuses(responses) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in responses:
        out[r.status_code] = out.get(r.status_code, 0) + 1
    return out


@pytest.fixture
def limited_gateway(backends, tmp_path, request):
    """A gateway whose `limited` key allows 25 requests per window; Redis when asked."""
    rate_limit = {}
    if getattr(request, "param", None) == "redis":
        rate_limit = redis_limits(request.getfixturevalue("redis_server"))
    gw = start_gateway(tmp_path, {"models": models_config(backends), "rate_limit": rate_limit},
                       {"limited": ["--rpm", "25", "--concurrency", "500"]})
    yield gw
    gw.stop()


@pytest.mark.parametrize("limited_gateway", ["memory", "redis"], indirect=True)
def test_200_concurrent_requests_let_exactly_the_budget_through(limited_gateway):
    got = statuses(asyncio.run(burst([limited_gateway.url], limited_gateway.keys["limited"])))
    assert got == {200: 25, 429: 175}


def test_two_gateway_processes_sharing_redis_share_one_budget(backends, tmp_path, redis_server):
    cfg = {"models": models_config(backends), "rate_limit": redis_limits(redis_server)}
    first = start_gateway(tmp_path / "a", cfg, {"shared": ["--rpm", "40", "--concurrency", "500"]})
    # the second process reads the same keys file
    second = start_gateway(tmp_path / "b", {**cfg, "keys_file": str(first.folder / "keys.json")},
                           {})
    try:
        got = statuses(asyncio.run(burst([first.url, second.url], first.keys["shared"])))
        assert got == {200: 40, 429: 160}
    finally:
        first.stop()
        second.stop()


def test_429_carries_retry_after_and_ratelimit_headers(limited_gateway):
    key = limited_gateway.keys["limited"]
    responses = asyncio.run(burst([limited_gateway.url], key, n=30))
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "25"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    err = refused.json()["error"]
    assert err["type"] == "rate_limit_error" and "limited" in err["message"]
    assert 'gateway_rate_limited_total{key="limited",limit="requests"} 5.0' in \
        limited_gateway.metrics()


def test_refused_requests_consume_no_quota(limited_gateway):
    key = limited_gateway.keys["limited"]
    bad = [{"model": "nope", "prompt": "a"}, {"model": "sql-coder", "prompt": 5},
           {**BODY, "model": "ghost"}, {**BODY, "prompt": "[[status=400]]"}]
    for body in bad * 10:  # 40 refusals: 404, 400, 503 and a backend 400
        r = httpx.post(limited_gateway.url + "/v1/completions", json=body,
                       headers={"authorization": f"Bearer {key}"})
        assert r.status_code in (400, 404, 503)
    got = statuses(asyncio.run(burst([limited_gateway.url], key, n=30)))
    assert got == {200: 25, 429: 5}


def test_tokens_per_minute_counts_prompt_and_completion(backends, tmp_path):
    gw = start_gateway(tmp_path, {"models": models_config(backends)},
                       {"tok": ["--tpm", "100", "--rpm", "1000"]})
    try:
        body = {"model": "sql-coder", "prompt": "a b c d", "max_tokens": 20}
        codes = [httpx.post(gw.url + "/v1/completions", json=body, headers=gw.auth("tok"))
                 .status_code for _ in range(6)]
        # each uses 4 + 20 = 24 tokens (the reservation of 2 + 20 settles to 24): 4 fit in 100
        assert codes == [200, 200, 200, 200, 429, 429]
        r = httpx.post(gw.url + "/v1/completions", headers=gw.auth("tok"),
                       json={**body, "max_tokens": 64, "prompt": "x " * 200})
        assert r.status_code == 400 and r.json()["error"]["code"] == "tokens_exceed_budget"
    finally:
        gw.stop()


def test_concurrency_limit_and_release_on_success_error_and_disconnect(backends, tmp_path):
    gw = start_gateway(tmp_path, {"models": models_config(backends)},
                       {"one": ["--concurrency", "1"]})
    url, auth = gw.url + "/v1/completions", gw.auth("one")
    try:
        slow = {"model": "text2sql", "prompt": "[[delay=0.2]]", "max_tokens": 10, "stream": True}
        with httpx.stream("POST", url, json=slow, headers=auth, timeout=10) as r:
            lines = r.iter_lines()  # keep a reference: a dropped iterator closes the stream
            next(lines)
            second = httpx.post(url, json=BODY, headers=auth)
            assert second.status_code == 429
            assert second.json()["error"]["message"].endswith("too many requests at once")
        # the stream was abandoned mid-way: its slot must be free again
        time.sleep(0.3)
        assert httpx.post(url, json=BODY, headers=auth).status_code == 200  # success frees
        assert httpx.post(url, json={**BODY, "prompt": "[[status=500]]"},
                          headers=auth).status_code == 502  # error frees
        assert httpx.post(url, json=BODY, headers=auth).status_code == 200
    finally:
        gw.stop()


@pytest.mark.parametrize("policy, expected", [("open", 200), ("closed", 503)])
def test_redis_unreachable_follows_the_configured_policy(backends, tmp_path, policy, expected):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    gw = start_gateway(tmp_path, {"models": models_config(backends),
                                  "rate_limit": {"redis_url": dead, "on_redis_error": policy}},
                       {"k": []})
    try:
        r = httpx.post(gw.url + "/v1/completions", json=BODY, headers=gw.auth("k"))
        assert r.status_code == expected
        if expected == 503:
            assert r.json()["error"]["code"] == "ratelimit_unavailable"
        assert "gateway_ratelimit_store_errors_total 1.0" in gw.metrics()
    finally:
        gw.stop()


def test_key_created_while_running_works_without_restart(gateway):
    key = create_key(gateway.folder / "keys.json", f"late-{time.time_ns()}")
    time.sleep(1.1)  # the store re-reads the file at most once a second
    r = httpx.post(gateway.url + "/v1/completions", json=BODY,
                   headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200


def test_keys_cli_as_a_user_runs_it(tmp_path):
    import sys

    env_file = tmp_path / "k.json"
    out = subprocess.run([sys.executable, "-m", "app.keys", "--file", str(env_file), "create",
                          "ops", "--models", "text2sql"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("sk-")
    listed = subprocess.run([sys.executable, "-m", "app.keys", "--file", str(env_file), "list"],
                            capture_output=True, text=True)
    assert "ops" in listed.stdout and out.stdout.strip() not in listed.stdout
