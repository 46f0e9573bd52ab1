"""Both limiter implementations obey one contract; Redis runs for real."""

import asyncio
import uuid

import pytest

from app.limits import CONCURRENCY, REQUESTS, TOKENS, Budget, MemoryLimiter, RedisLimiter


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(params=["memory", "redis"])
def make(request):
    """make(window_s) -> (limiter, advance(seconds)); Redis keeps real time, so it sleeps.
    Each test closes its limiter inside its own event loop."""
    def factory(window_s=60.0):
        if request.param == "memory":
            clock = Clock()
            lim = MemoryLimiter(window_s, clock=clock)

            async def advance(s):
                clock.now += s
        else:
            url = request.getfixturevalue("redis_server")
            lim = RedisLimiter(url, window_s, lease_s=60, fail_open=False, timeout_s=5.0)

            async def advance(s):
                await asyncio.sleep(s)
        return lim, advance

    return factory


def budget(rpm=1000, tpm=10**9, conc=1000):
    return Budget(uuid.uuid4().hex[:12], rpm, tpm, conc)


def rid():
    return uuid.uuid4().hex


def test_200_concurrent_requests_let_exactly_n_through(make):
    async def go():
        lim, _ = make()
        b = budget(rpm=37)
        results = await asyncio.gather(*(lim.acquire(b, rid(), 1) for _ in range(200)))
        await lim.close()
        return results

    results = asyncio.run(go())
    allowed = [d for d in results if d.allowed]
    assert len(allowed) == 37
    assert {d.refused_by for d in results if not d.allowed} == {REQUESTS}


def test_window_slides_so_no_double_budget_at_an_edge(make):
    async def go():
        lim, advance = make(window_s=1.0)
        b = budget(rpm=3)
        first = [await lim.acquire(b, rid(), 1) for _ in range(3)]
        await advance(0.6)
        mid = await lim.acquire(b, rid(), 1)  # a fixed window could have reset here
        await advance(0.6)
        later = await lim.acquire(b, rid(), 1)  # the first three are now over 1 s old
        await lim.close()
        return first, mid, later

    first, mid, later = asyncio.run(go())
    assert all(d.allowed for d in first)
    assert not mid.allowed and mid.refused_by == REQUESTS and 0 < mid.retry_after_s <= 0.41
    assert later.allowed


def test_refunded_request_consumes_nothing_and_settle_uses_real_tokens(make):
    async def go():
        lim, _ = make()
        b = budget(rpm=2, tpm=100)
        a1 = await lim.acquire(b, (r1 := rid()), 60)
        refused = await lim.acquire(b, rid(), 60)  # 60 + 60 > 100
        lim.finish(b, r1, 10)  # used 10, not 60
        a2 = await lim.acquire(b, (r2 := rid()), 60)
        lim.finish(b, r2, None)  # backend failed: refund
        a3 = await lim.acquire(b, rid(), 60)
        a4 = await lim.acquire(b, rid(), 1)  # requests: r1 and a3 counted, 2 of 2
        await lim.close()
        return a1, refused, a2, a3, a4

    a1, refused, a2, a3, a4 = asyncio.run(go())
    assert a1.allowed and not refused.allowed and refused.refused_by == TOKENS
    assert a2.allowed and a3.allowed
    assert not a4.allowed and a4.refused_by == REQUESTS
    assert a3.headers["x-ratelimit-remaining-tokens"] == str(100 - 10 - 60)
    assert a4.headers["x-ratelimit-limit-requests"] == "2"


def test_concurrency_slot_is_released_by_finish(make):
    async def go():
        lim, _ = make()
        b = budget(conc=2)
        r1, r2 = rid(), rid()
        held = [await lim.acquire(b, r, 1) for r in (r1, r2)]
        over = await lim.acquire(b, rid(), 1)
        lim.finish(b, r1, 1)
        again = await lim.acquire(b, rid(), 1)
        await lim.close()
        return held, over, again

    held, over, again = asyncio.run(go())
    assert all(d.allowed for d in held)
    assert not over.allowed and over.refused_by == CONCURRENCY
    assert again.allowed


def test_redis_unreachable_fails_open_or_closed_as_configured():
    from app.limits import LimiterUnavailable

    async def go(fail_open):
        lim = RedisLimiter("redis://127.0.0.1:1/0", 60, 60, fail_open=fail_open, timeout_s=0.5)
        try:
            return await lim.acquire(budget(), rid(), 1)
        finally:
            await lim.close()

    assert asyncio.run(go(True)).unavailable
    with pytest.raises(LimiterUnavailable):
        asyncio.run(go(False))


def test_retry_after_for_tokens_points_at_when_enough_tokens_leave(make):
    async def go():
        lim, advance = make(window_s=2.0)
        b = budget(tpm=100)
        await lim.acquire(b, rid(), 50)
        await advance(0.5)
        await lim.acquire(b, rid(), 50)
        decision = await lim.acquire(b, rid(), 40)
        await lim.close()
        return decision

    d = asyncio.run(go())
    # 40 more needs the first 50 gone: about 1.5 s from now, not the second one's 2 s
    assert not d.allowed and 1.2 < d.retry_after_s <= 1.5


def test_a_charged_request_is_counted_once_and_refused_past_the_budget(make):
    async def go():
        lim, _ = make()
        b = budget(rpm=3)
        first = rid()
        assert (await lim.charge(b, first)).allowed
        # its acquire does not count it again: two more requests fit, not one
        assert (await lim.acquire(b, first, 5)).allowed
        assert (await lim.charge(b, rid())).allowed
        assert (await lim.acquire(b, rid(), 5)).allowed
        refused = await lim.charge(b, rid())
        after = await lim.acquire(b, rid(), 5)
        await lim.close()
        return refused, after

    refused, after = asyncio.run(go())
    assert not refused.allowed and refused.refused_by == REQUESTS
    assert refused.retry_after_s > 0
    assert not after.allowed and after.refused_by == REQUESTS


def test_redis_that_lost_its_scripts_is_served_after_one_reload(redis_server):
    """A restarted or failed-over Redis has no scripts: the calls that find NOSCRIPT load them
    again and are answered, not failed open."""
    import redis

    async def go():
        lim = RedisLimiter(redis_server, 60, 60, fail_open=False, timeout_s=5.0)
        b = budget(rpm=5)
        first = await lim.acquire(b, rid(), 1)
        redis.Redis.from_url(redis_server).script_flush()
        batch = await asyncio.gather(*(lim.acquire(b, rid(), 1) for _ in range(6)))
        await lim.close()
        return first, batch

    first, batch = asyncio.run(go())
    assert first.allowed and not first.unavailable
    assert [d.allowed for d in batch].count(True) == 4  # the budget still counts, exactly
    assert not any(d.unavailable for d in batch)


def test_a_settlement_reaches_redis_by_itself_and_at_close(redis_server):
    """finish() does not wait for Redis: its call rides with the next pipeline or goes alone
    shortly after. With no other traffic it must still arrive, and close() must send what waits."""
    import redis

    store = redis.Redis.from_url(redis_server)

    async def go():
        lim = RedisLimiter(redis_server, 60, 60, fail_open=False, timeout_s=5.0)
        b = budget()
        inflight = RedisLimiter._keys(b.key_id)[3]
        r1, r2 = rid(), rid()
        await lim.acquire(b, r1, 1)
        await lim.acquire(b, r2, 1)
        lim.finish(b, r1, 1)
        for _ in range(500):  # alone: sent within the settle delay, waited for up to 5 s
            if store.zscore(inflight, r1) is None:
                break
            await asyncio.sleep(0.01)
        alone = store.zscore(inflight, r1)
        lim.finish(b, r2, 1)
        await lim.close()
        return alone, store.zscore(inflight, r2)

    alone, at_close = asyncio.run(go())
    assert alone is None, "a settlement with no traffic after it never reached Redis"
    assert at_close is None, "close() dropped a settlement that was waiting to be sent"


def test_a_failure_that_is_not_an_outage_answers_the_caller_instead_of_hanging(redis_server):
    """Whatever breaks inside a pipeline call, the requests waiting on it get an answer."""
    async def go():
        lim = RedisLimiter(redis_server, 60, 60, fail_open=True, timeout_s=5.0)

        async def broken(batch):
            raise ValueError("a reply the client library could not parse")

        lim._batch._pipeline = broken
        try:
            await asyncio.wait_for(lim.acquire(budget(), rid(), 1), 5)
        finally:
            await lim.close()

    with pytest.raises(ValueError, match="could not parse"):
        asyncio.run(go())
