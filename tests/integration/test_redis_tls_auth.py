"""The gateway's Redis client against a real redis-server with TLS and a password, as with
ElastiCache: exact budgets, refusals at start, a crash and restart mid-load, a failover behind
the same address, and the password never in a log line, an answer or a metric."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import boto3
import httpx
import pytest

from app.limits import Budget, RedisLimiter
from stack import local
from tests.conftest import models_config
from tests.integration.test_rate_limits import BODY, burst, statuses
from tests.support.gateway import GatewayHandle, redis_limits, start_gateway
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer
from tests.support.tcp_switch import TcpSwitch

SECRET = "rl-secret-7d1e0b55c2"  # the servers' password
EXACT = ["--rpm", "25", "--concurrency", "500"]
MANY = ["--rpm", "100000", "--concurrency", "500"]
REGION = "eu-west-1"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """Two unrelated CAs, each with a certificate for localhost and 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("redis-tls")
    for name in ("ca-a", "ca-b"):
        local.ensure_tls(tmp / name)
    return tmp / "ca-a", tmp / "ca-b"


@pytest.fixture
def password_file(tmp_path):
    f = tmp_path / "redis-password"
    f.write_text(SECRET + "\n")
    f.chmod(0o600)
    return f


@pytest.fixture
def secure_redis(tmp_path, tls):
    server = RedisServer(tmp_path / "redis", tls=tls[0], password=SECRET).start()
    yield server
    server.stop()


def secure_limits(server: RedisServer, password_file, **overrides) -> dict:
    return {**redis_limits(server.url), "redis_ca_file": str(server.tls / "ca.crt"),
            "redis_password_file": str(password_file), **overrides}


def refused_start(folder, backends, rate_limit: dict, env: dict | None = None) -> str:
    """Start a gateway that must refuse to start; what it said."""
    try:
        gw = start_gateway(folder, {"models": models_config(backends), "rate_limit": rate_limit},
                           {"k": []}, env=env)
    except RuntimeError as e:
        assert "exited with 2" in str(e), str(e)
        return str(e)
    gw.stop()  # started after all: stop it before failing
    pytest.fail("the gateway started")


def assert_no_secret(gw: GatewayHandle, responses=()) -> None:
    """Nowhere: the log (at debug level), any answer's body or headers, the metrics."""
    texts = {"log": gw.proc.log(), "metrics": gw.metrics()}
    for i, r in enumerate(responses):
        texts[f"response {i}"] = f"{r.headers}\n{r.text}"
    leaked = [where for where, text in texts.items() if SECRET in text]
    assert not leaked, f"the Redis password shows in: {leaked}"


def test_tls_and_a_password_admit_exactly_the_budget(backends, tmp_path, secure_redis,
                                                     password_file):
    gw = start_gateway(tmp_path / "gw", {"models": models_config(backends),
                                         "rate_limit": secure_limits(secure_redis, password_file)},
                       {"limited": EXACT}, env={"GATEWAY_LOG_LEVEL": "debug"})
    try:
        responses = asyncio.run(burst([gw.url], gw.keys["limited"]))
        assert statuses(responses) == {200: 25, 429: 175}
        # counted in that server, reached over TLS with the password
        with secure_redis.client() as admin:
            assert admin.keys("gw:rl:*")
        assert_no_secret(gw, responses)
    finally:
        gw.stop()


def test_the_password_from_an_ssm_securestring_is_used(backends, tmp_path, secure_redis,
                                                       moto_server):
    name = f"/llm-stack/redis-auth-{uuid.uuid4().hex[:8]}"
    ssm = boto3.client("ssm", endpoint_url=moto_server, region_name=REGION,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    ssm.put_parameter(Name=name, Value=SECRET, Type="SecureString")
    env = {**FAKE_AWS, "AWS_ENDPOINT_URL_SSM": moto_server, "GATEWAY_LOG_LEVEL": "debug"}
    rate_limit = {**redis_limits(secure_redis.url),
                  "redis_ca_file": str(secure_redis.tls / "ca.crt"),
                  "redis_password_ssm_parameter": name}
    gw = start_gateway(tmp_path / "gw", {"models": models_config(backends),
                                         "rate_limit": rate_limit}, {"limited": EXACT}, env=env)
    try:
        responses = asyncio.run(burst([gw.url], gw.keys["limited"], n=40))
        assert statuses(responses) == {200: 25, 429: 15}
        assert_no_secret(gw, responses)
    finally:
        gw.stop()
    # a parameter stored in clear is refused, by name
    ssm.put_parameter(Name=name + "-plain", Value=SECRET, Type="String")
    said = refused_start(tmp_path / "plain", backends,
                         {**rate_limit, "redis_password_ssm_parameter": name + "-plain"}, env=env)
    assert f"{name}-plain is a String, not a SecureString" in said and SECRET not in said


@pytest.mark.parametrize("password", ["wrong", "none"])
def test_a_refused_password_stops_the_gateway_at_start_saying_why(
        backends, tmp_path, secure_redis, password_file, password):
    rate_limit = secure_limits(secure_redis, password_file)
    if password == "wrong":
        password_file.write_text("wrong-password-0\n")
        said = refused_start(tmp_path / "gw", backends, rate_limit)
        assert (f"Redis at rediss://127.0.0.1:{secure_redis.port} refused the password from "
                f"rate_limit.redis_password_file {password_file}") in said
        assert "wrong-password-0" not in said
    else:
        del rate_limit["redis_password_file"]
        said = refused_start(tmp_path / "gw", backends, rate_limit)
        assert f"Redis at rediss://127.0.0.1:{secure_redis.port} wants a password" in said
    assert SECRET not in said


@pytest.mark.parametrize("case", ["another CA", "another host name", "the system CA store"])
def test_a_certificate_that_does_not_verify_stops_the_gateway_at_start(
        backends, tmp_path, tls, password_file, case):
    ca_a, ca_b = tls
    # OpenSSL's words for a chain that ends at a CA it does not trust (they vary by version)
    unknown_ca = r"self[- ]signed certificate|unable to get local issuer certificate"
    server_tls, ca_file, host, reason = {
        # a server certificate the configured CA never signed
        "another CA": (ca_b, ca_a / "ca.crt", "127.0.0.1", unknown_ca),
        # the right CA, but the certificate names localhost and 127.0.0.1, not 127.0.0.2
        "another host name": (ca_a, ca_a / "ca.crt", "127.0.0.2", r"IP address mismatch"),
        # no redis_ca_file: the system store, which never signed a throwaway CA
        "the system CA store": (ca_a, None, "127.0.0.1", unknown_ca),
    }[case]
    server = RedisServer(tmp_path / "redis", tls=server_tls, password=SECRET, host=host,
                         binds=("127.0.0.1", "127.0.0.2")).start()
    try:
        rate_limit = {**redis_limits(server.url), "redis_password_file": str(password_file)}
        if ca_file is not None:
            rate_limit["redis_ca_file"] = str(ca_file)
        said = refused_start(tmp_path / "gw", backends, rate_limit)
        assert f"Redis at rediss://{host}:{server.port}: its TLS certificate was refused" in said
        assert re.search(reason, said)
        assert str(ca_file or "the system's CA store") in said
        # the password was never sent to a server that could not prove who it is
        assert server.clients() == 0
    finally:
        server.stop()


def _counted(r: httpx.Response) -> bool:
    return "x-ratelimit-remaining-requests" in r.headers


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_redis_killed_and_restarted_mid_load_follows_the_policy_then_counts_again(
        backends, tmp_path, secure_redis, password_file, policy):
    # the tests' generous wait (redis_limits): a loaded machine must not pass for an outage
    rate_limit = secure_limits(secure_redis, password_file, on_redis_error=policy)
    gw = start_gateway(tmp_path / "gw", {"models": models_config(backends),
                                         "rate_limit": rate_limit},
                       {"load": MANY, "exact": EXACT}, env={"GATEWAY_LOG_LEVEL": "debug"})
    url, auth = gw.url + "/v1/completions", gw.auth("load")
    # (sent, answered, response) of every request of the load
    seen: list[tuple[float, float, httpx.Response]] = []
    marks: dict[str, float] = {}

    async def scenario():
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=30) as c:
            async def worker():
                while not stop.is_set():
                    sent = time.monotonic()
                    r = await c.post(url, json=BODY, headers=auth)
                    seen.append((sent, time.monotonic(), r))

            workers = [asyncio.create_task(worker()) for _ in range(8)]
            await asyncio.sleep(1.0)
            secure_redis.kill()  # mid-load: requests in flight lose their connection
            marks["killed"] = time.monotonic()
            await asyncio.sleep(1.5)
            marks["restarting"] = time.monotonic()
            await asyncio.to_thread(secure_redis.start)  # same port, same TLS and password
            marks["restarted"] = time.monotonic()
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*workers)

    try:
        asyncio.run(scenario())
        before = [r for s, d, r in seen if d < marks["killed"]]
        outage = [r for s, d, r in seen if s > marks["killed"] and d < marks["restarting"]]
        assert before and all(r.status_code == 200 and _counted(r) for r in before)
        assert len(outage) >= 5
        if policy == "open":  # served, uncounted
            assert all(r.status_code == 200 and not _counted(r) for r in outage)
        else:  # refused, with when to come back
            assert {r.status_code for r in outage} == {503}
            assert all(r.json()["error"]["code"] == "ratelimit_unavailable"
                       and r.headers["retry-after"] for r in outage)
        # never anything else, at any moment of the load
        for _, _, r in seen:
            assert r.status_code == 200 or (
                r.status_code == 503 and policy == "closed"
                and r.json()["error"]["code"] == "ratelimit_unavailable"), r.text
        # by itself, without a restart of the gateway, it counts again ...
        after = [r for s, d, r in seen if s > marks["restarted"]]
        assert after and _counted(after[-1])
        # ... exactly (the restarted Redis kept nothing: a fresh budget)
        got = statuses(asyncio.run(burst([gw.url], gw.keys["exact"])))
        warnings = [line for line in gw.log_lines() if '"level":"warning"' in line]
        assert got == {200: 25, 429: 175}, warnings[-5:]
        assert "gateway_ratelimit_store_errors_total" in gw.metrics()
        assert_no_secret(gw, [r for _, _, r in seen])
    finally:
        gw.stop()


def test_pooled_connections_a_restart_killed_are_reopened_before_use(tmp_path, tls):
    """No request needs to fail after Redis is back: the pool checks each idle connection
    before handing it out and reopens the dead ones (redis-py 8 skips that check unless its
    maintenance notifications are off)."""
    server = RedisServer(tmp_path / "redis", tls=tls[0], password=SECRET).start()

    async def go():
        lim = RedisLimiter(server.url, 60, 60, fail_open=False, timeout_s=5.0,
                           password=SECRET, ca_file=tls[0] / "ca.crt")
        try:
            # three idle connections, as a burst leaves them
            held = [await lim.pool.get_connection() for _ in range(3)]
            for c in held:
                await lim.pool.release(c)
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)  # and no request while it was away
            answers = []
            held = [await lim.pool.get_connection() for _ in range(3)]  # all three at once
            for c in held:
                await c.send_command("PING")
                answers.append(await c.read_response())
            for c in held:
                await lim.pool.release(c)
            return answers, await lim.acquire(Budget("k", 10, 1000, 10), "r1", 1)
        finally:
            await lim.close()

    try:
        answers, decision = asyncio.run(go())
        assert answers == [b"PONG"] * 3
        assert decision.allowed and not decision.unavailable
    finally:
        server.stop()


def test_a_failover_behind_the_same_address_is_followed_without_a_restart(
        backends, tmp_path, tls, password_file):
    """ElastiCache promotes a replica and moves its primary endpoint's name to it; connections
    opened before still reach the old primary, now a replica answering writes with READONLY."""
    old = RedisServer(tmp_path / "old", tls=tls[0], password=SECRET).start()
    new = RedisServer(tmp_path / "new", tls=tls[0], password=SECRET).start()
    endpoint = TcpSwitch(old.port)
    rate_limit = {**secure_limits(old, password_file),
                  "redis_url": f"rediss://127.0.0.1:{endpoint.port}/0"}
    gw = start_gateway(tmp_path / "gw", {"models": models_config(backends),
                                         "rate_limit": rate_limit},
                       {"load": MANY}, env={"GATEWAY_LOG_LEVEL": "debug"})
    url, auth = gw.url + "/v1/completions", gw.auth("load")
    try:
        # The gateway's pool holds several connections to the old primary: two waves of
        # requests while the server holds its answers, so the second needs a connection of
        # its own (the first is busy waiting).
        async def two_waves():
            with old.client() as admin:
                admin.client_pause(1000)
            first = asyncio.create_task(burst([gw.url], gw.keys["load"], n=20))
            await asyncio.sleep(0.3)
            return [*await burst([gw.url], gw.keys["load"], n=20), *await first]

        assert statuses(asyncio.run(two_waves())) == {200: 40}
        assert old.clients() >= 2

        endpoint.switch(new.port)
        with old.client() as admin:
            admin.replicaof("127.0.0.1", new.port)  # demoted: a read-only replica now
        after = [httpx.post(url, json=BODY, headers=auth) for _ in range(10)]

        # one request meets READONLY and follows on_redis_error (closed here: a 503, no 500);
        # every pooled connection to the old primary is dropped with it, so the next request
        # reconnects through the endpoint, reaches the new primary and is counted there
        assert [r.status_code for r in after] == [503] + [200] * 9, [r.text for r in after]
        assert after[0].json()["error"]["code"] == "ratelimit_unavailable"
        assert all(_counted(r) for r in after[1:])
        with new.client() as admin:
            assert admin.keys("gw:rl:*")
        wait_until(lambda: old.clients() == 0, 5, "the old primary's connections closing")
        assert_no_secret(gw, after)
    finally:
        gw.stop()
        endpoint.close()
        old.stop()
        new.stop()


def test_the_password_never_shows_even_when_redis_turns_it_down_at_runtime(
        backends, tmp_path, secure_redis, password_file):
    """The token rotated away behind the gateway's back: every new connection is refused
    (AuthenticationError in redis-py's hands, which holds the password) until it is back."""
    gw = start_gateway(tmp_path / "gw", {"models": models_config(backends),
                                         "rate_limit": secure_limits(secure_redis, password_file)},
                       {"load": MANY}, env={"GATEWAY_LOG_LEVEL": "debug"})
    url, auth = gw.url + "/v1/completions", gw.auth("load")
    try:
        first = httpx.post(url, json=BODY, headers=auth)
        assert first.status_code == 200 and _counted(first)
        # one admin connection throughout: it stays authenticated across the rotation
        admin = secure_redis.client()
        admin.config_set("requirepass", "rotated-" + uuid.uuid4().hex)
        admin.client_kill_filter(_type="normal", skipme=True)
        refused = [httpx.post(url, json=BODY, headers=auth) for _ in range(3)]
        assert {r.status_code for r in refused} == {503}
        admin.config_set("requirepass", SECRET)
        admin.close()
        back = wait_until(lambda: _counted(r := httpx.post(url, json=BODY, headers=auth)) and r,
                          10, "counting again once the password is back")
        assert back.status_code == 200
        log = gw.proc.log()
        assert "AuthenticationError" in log
        assert_no_secret(gw, [first, *refused, back])
    finally:
        gw.stop()
