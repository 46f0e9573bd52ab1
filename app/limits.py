"""Per-key limits: requests/min, tokens/min and concurrent requests, on sliding windows.

Each window is a log of (time, request id, amount): an entry leaves exactly `window_s` after
it was counted, so there is no fresh budget at a window edge. Check-and-count is one step
(one event-loop turn in process, one Lua script in Redis), a refused request counts nothing,
and `finish` settles the token reservation to the real usage, or refunds it entirely when
the request never produced a result, and always frees the concurrency slot.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from app.redis_client import connection_pool

log = logging.getLogger("gateway.limits")

REQUESTS, TOKENS, CONCURRENCY = "requests", "tokens", "concurrency"


@dataclass(frozen=True, slots=True)
class Budget:
    """A key's limits, as the limiter sees them."""

    key_id: str
    rpm: int
    tpm: int
    concurrency: int


@dataclass(slots=True)
class Decision:
    allowed: bool
    refused_by: str | None = None  # REQUESTS | TOKENS | CONCURRENCY
    retry_after_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    unavailable: bool = False  # the shared counter store could not be reached


class LimiterUnavailable(Exception):
    pass


class Limiter(Protocol):
    async def charge(self, budget: Budget, req_id: str) -> Decision:
        """Count a request against requests/min before its body is read (no tokens, no
        slot). A later `acquire` under the same id does not count it twice."""

    async def acquire(self, budget: Budget, req_id: str, tokens: int) -> Decision: ...

    def finish(self, budget: Budget, req_id: str, tokens: int | None) -> None:
        """Release the concurrency slot; settle the reservation to `tokens`, or refund all
        of it (request and tokens) when `tokens` is None. It never waits, so a request's
        bookkeeping cannot be cut short by its cancellation (no shield needed)."""

    async def close(self) -> None: ...


def _headers(b: Budget, used_req: int, used_tok: int, reset_req: float, reset_tok: float):
    return {
        "x-ratelimit-limit-requests": str(b.rpm),
        "x-ratelimit-remaining-requests": str(max(0, b.rpm - used_req)),
        "x-ratelimit-reset-requests": f"{max(0.0, reset_req):.3f}s",
        "x-ratelimit-limit-tokens": str(b.tpm),
        "x-ratelimit-remaining-tokens": str(max(0, b.tpm - used_tok)),
        "x-ratelimit-reset-tokens": f"{max(0.0, reset_tok):.3f}s",
    }


class _KeyWindows:
    __slots__ = ("requests", "tokens", "token_sum", "in_flight")

    def __init__(self) -> None:
        self.requests: OrderedDict[str, float] = OrderedDict()  # id -> time
        self.tokens: OrderedDict[str, list] = OrderedDict()  # id -> [time, tokens]
        self.token_sum = 0
        self.in_flight: set[str] = set()

    def evict(self, cutoff: float) -> None:
        reqs, toks = self.requests, self.tokens
        while reqs and next(iter(reqs.values())) <= cutoff:
            reqs.popitem(last=False)
        while toks and next(iter(toks.values()))[0] <= cutoff:
            self.token_sum -= toks.popitem(last=False)[1][1]


class MemoryLimiter:
    """Counters in this process: right for one gateway process per budget."""

    def __init__(self, window_s: float, clock=time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._keys: dict[str, _KeyWindows] = {}

    def _windows(self, budget: Budget, now: float) -> _KeyWindows:
        w = self._keys.get(budget.key_id)
        if w is None:
            w = self._keys[budget.key_id] = _KeyWindows()
        w.evict(now - self.window_s)
        return w

    async def charge(self, budget: Budget, req_id: str) -> Decision:
        now = self.clock()
        w = self._windows(budget, now)
        if len(w.requests) >= budget.rpm:
            reset = next(iter(w.requests.values())) + self.window_s - now
            return Decision(False, REQUESTS, max(reset, 0.001))
        w.requests[req_id] = now
        return Decision(True)

    async def acquire(self, budget: Budget, req_id: str, tokens: int) -> Decision:
        now = self.clock()
        w = self._windows(budget, now)
        # a request charged before its body was read is already in the window
        n_req, n_tok = len(w.requests) - (req_id in w.requests), w.token_sum
        oldest_req = next(iter(w.requests.values()), now)
        oldest_tok = next(iter(w.tokens.values()), (now, 0))[0]
        reset_req = oldest_req + self.window_s - now
        reset_tok = oldest_tok + self.window_s - now
        refused, retry = None, 0.0
        if len(w.in_flight) >= budget.concurrency:
            refused, retry = CONCURRENCY, 1.0
        elif n_req >= budget.rpm:
            refused, retry = REQUESTS, reset_req
        elif n_tok + tokens > budget.tpm:
            refused, retry = TOKENS, self._tokens_free_at(w, n_tok + tokens - budget.tpm) - now
        if refused:
            return Decision(False, refused, max(retry, 0.001),
                            _headers(budget, n_req, n_tok, reset_req, reset_tok))
        w.requests[req_id] = now
        w.tokens[req_id] = [now, tokens]
        w.token_sum += tokens
        w.in_flight.add(req_id)
        return Decision(True, headers=_headers(budget, n_req + 1, n_tok + tokens,
                                               reset_req, reset_tok))

    def _tokens_free_at(self, w: _KeyWindows, excess: int) -> float:
        freed = 0
        for ts, n in w.tokens.values():
            freed += n
            if freed >= excess:
                return ts + self.window_s
        return self.clock() + self.window_s

    def finish(self, budget: Budget, req_id: str, tokens: int | None) -> None:
        w = self._keys.get(budget.key_id)
        if w is None:
            return
        w.in_flight.discard(req_id)
        entry = w.tokens.get(req_id)
        if tokens is None:
            w.requests.pop(req_id, None)
            if entry is not None:
                w.token_sum -= entry[1]
                del w.tokens[req_id]
        elif entry is not None:
            w.token_sum += tokens - entry[1]
            entry[1] = tokens

    async def close(self) -> None:
        pass


# KEYS: requests zset, tokens zset, tokens hash (id -> n, plus "_sum"), in-flight zset
# ARGV: window_s, rpm, tpm, concurrency, tokens, id, lease_s
# Time comes from the Redis server so gateways on several hosts share one clock.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local win, rpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local tpm, conc = tonumber(ARGV[3]), tonumber(ARGV[4])
local want, id, lease = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local cutoff = now - win
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
if #old > 0 then
  local freed = 0
  for _, m in ipairs(old) do
    freed = freed + tonumber(redis.call('HGET', KEYS[3], m) or '0')
    redis.call('HDEL', KEYS[3], m)
  end
  redis.call('HINCRBY', KEYS[3], '_sum', -freed)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local n_req = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], id) then n_req = n_req - 1 end  -- charged before its body
local n_tok = tonumber(redis.call('HGET', KEYS[3], '_sum') or '0')
local first_req = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local first_tok = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local reset_req = first_req[2] and (tonumber(first_req[2]) + win - now) or win
local reset_tok = first_tok[2] and (tonumber(first_tok[2]) + win - now) or win
local code, retry = 0, 0
if redis.call('ZCARD', KEYS[4]) >= conc then
  code, retry = 3, 1
elseif n_req >= rpm then
  code, retry = 1, reset_req
elseif n_tok + want > tpm then
  code = 2
  local excess, freed = n_tok + want - tpm, 0
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  retry = win
  for i = 1, #entries, 2 do
    freed = freed + tonumber(redis.call('HGET', KEYS[3], entries[i]) or '0')
    if freed >= excess then retry = tonumber(entries[i + 1]) + win - now; break end
  end
end
if code == 0 then
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('ZADD', KEYS[2], now, id)
  redis.call('HSET', KEYS[3], id, want)
  redis.call('HINCRBY', KEYS[3], '_sum', want)
  redis.call('ZADD', KEYS[4], now + lease, id)
  n_req, n_tok = n_req + 1, n_tok + want
end
local ttl = math.ceil((win + lease) * 1000)
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end
return {code, tostring(retry), n_req, n_tok, tostring(reset_req), tostring(reset_tok)}
"""

# ARGV: id, tokens (-1 = refund request and tokens)
_FINISH = """
local id, tokens = ARGV[1], tonumber(ARGV[2])
redis.call('ZREM', KEYS[4], id)
local held = redis.call('HGET', KEYS[3], id)
if tokens < 0 then
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if held then
    redis.call('HDEL', KEYS[3], id)
    redis.call('HINCRBY', KEYS[3], '_sum', -tonumber(held))
  end
elseif held then
  redis.call('HSET', KEYS[3], id, tokens)
  redis.call('HINCRBY', KEYS[3], '_sum', tokens - tonumber(held))
end
return 1
"""

# KEYS: requests zset; ARGV: window_s, rpm, id, lease_s
_CHARGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local win, rpm, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - win)
if redis.call('ZCARD', KEYS[1]) >= rpm then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {1, tostring(tonumber(first[2]) + win - now)}
end
redis.call('ZADD', KEYS[1], now, id)
redis.call('PEXPIRE', KEYS[1], math.ceil((win + tonumber(ARGV[4])) * 1000))
return {0, '0'}
"""

_REFUSED_BY = {1: REQUESTS, 2: TOKENS, 3: CONCURRENCY}


class _Batcher:
    """Script calls made in the same event-loop turn go to Redis as one pipeline: one
    connection, one write and one read for all of them instead of a round trip each (under
    load, many requests start and end in the same turn; alone, a call waits for nothing).
    Each call is still one atomic script; only the transport is shared.

    Settlements nobody waits for (`later`) ride with the next pipeline, ahead of its calls,
    or go on their own after SETTLE_S: a request then costs one round trip, not two, and its
    answer never waits for its settlement. Going first keeps one gateway's order: a client's
    next request is admitted after its previous one released its slot. Other gateways see a
    release at most SETTLE_S late."""

    SETTLE_S = 0.01

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis
        self.pending: list[tuple[str, list, list, asyncio.Future | None]] = []
        self.settling: list[tuple[str, list, list, None]] = []
        self.timer: asyncio.TimerHandle | None = None

    def call(self, script: str, keys: list, args: list) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.pending:
            loop.call_soon(self._flush)
        self.pending.append((script, keys, args, fut))
        return fut

    def later(self, script: str, keys: list, args: list) -> None:
        self.settling.append((script, keys, args, None))
        if self.timer is None and not self.pending:
            self.timer = asyncio.get_running_loop().call_later(self.SETTLE_S, self._flush)

    def _flush(self) -> asyncio.Task | None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.settling, self.pending = self.settling + self.pending, [], []
        if not batch:
            return None
        task = asyncio.ensure_future(self._send(batch))
        _background.add(task)
        task.add_done_callback(_background.discard)
        return task

    async def drain(self) -> None:
        """Send what is still waiting (at shutdown)."""
        task = self._flush()
        if task is not None:
            await task

    async def _send(self, batch) -> None:
        try:
            results = await self._pipeline(batch)
            if any(isinstance(r, NoScriptError) for r in results):  # new or restarted Redis
                for script in {script for script, *_ in batch}:
                    await self.redis.script_load(script)
                results = await self._pipeline(batch)
        except (RedisError, OSError) as e:
            results = [e] * len(batch)
        except BaseException as e:
            # not an outage (a bug, or this task cancelled): no caller may wait forever
            for *_, fut in batch:
                if fut is not None and not fut.done():
                    if isinstance(e, Exception):
                        fut.set_exception(e)
                    else:
                        fut.cancel()
            raise
        for (*_, fut), r in zip(batch, results, strict=True):
            if fut is None:  # a settlement: nobody to tell
                if isinstance(r, BaseException):
                    log.warning("rate-limit store unreachable on finish: %s", type(r).__name__)
            elif fut.done():  # its caller gave up
                continue
            elif isinstance(r, BaseException):
                fut.set_exception(r)
            else:
                fut.set_result(r)

    async def _pipeline(self, batch) -> list:
        """One write and its replies on a pooled connection: what redis-py's Pipeline does,
        without the layers around it that cost most of a call (profiled). A script's own
        error (NOSCRIPT) is its result; a broken link fails the whole batch."""
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(conn.pack_commands(
                [("EVALSHA", _sha(script), len(keys), *keys, *args)
                 for script, keys, args, _ in batch]), check_health=False)
            results = []
            for _ in batch:
                try:
                    results.append(await conn.read_response())
                except ResponseError as e:
                    results.append(e)
            return results
        except BaseException:
            await conn.disconnect()  # replies half read: the connection is of no more use
            raise
        finally:
            await pool.release(conn)


@functools.cache
def _sha(script: str) -> str:
    """What EVALSHA names a script by: its SHA-1, known without asking Redis, so concurrent
    pipelines share no state that one reloading the scripts could pull from under another."""
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


# tasks that must not be garbage-collected while they run
_background: set[asyncio.Task] = set()


class RedisLimiter:
    """Counters in Redis: every gateway process and host sharing the URL shares one budget."""

    def __init__(self, url: str, window_s: float, lease_s: float, fail_open: bool,
                 timeout_s: float, *, password: str | None = None, ca_file: Path | None = None):
        self.window_s = window_s
        # a concurrency slot of a gateway that died mid-request frees itself after lease_s
        self.lease_s = lease_s
        self.fail_open = fail_open
        # TLS, AUTH and failover handling live with the pool (app/redis_client.py)
        pool = connection_pool(url, timeout_s, password, ca_file)
        self.pool = pool
        self.redis = aioredis.Redis(connection_pool=pool)
        self._batch = _Batcher(self.redis)

    @staticmethod
    def _keys(key_id: str) -> list[str]:
        base = f"gw:rl:{{{key_id}}}"  # one hash slot per key, should Redis be a cluster
        return [f"{base}:req", f"{base}:tok", f"{base}:tokn", f"{base}:inflight"]

    def _unreachable(self, e: Exception) -> Decision:
        log.warning("rate-limit store unreachable: %s", type(e).__name__)
        if self.fail_open:
            return Decision(True, unavailable=True)
        raise LimiterUnavailable from None

    async def charge(self, budget: Budget, req_id: str) -> Decision:
        try:
            code, retry = await self._batch.call(
                _CHARGE, self._keys(budget.key_id)[:1],
                [self.window_s, budget.rpm, req_id, self.lease_s])
        except (RedisError, OSError) as e:
            return self._unreachable(e)
        return Decision(False, REQUESTS, max(float(retry), 0.001)) if code else Decision(True)

    async def acquire(self, budget: Budget, req_id: str, tokens: int) -> Decision:
        try:
            code, retry, n_req, n_tok, reset_req, reset_tok = await self._batch.call(
                _ACQUIRE, self._keys(budget.key_id),
                [self.window_s, budget.rpm, budget.tpm, budget.concurrency, tokens, req_id,
                 self.lease_s])
        except (RedisError, OSError) as e:
            return self._unreachable(e)
        headers = _headers(budget, int(n_req), int(n_tok), float(reset_req), float(reset_tok))
        if code:
            return Decision(False, _REFUSED_BY[code], max(float(retry), 0.001), headers)
        return Decision(True, headers=headers)

    def finish(self, budget: Budget, req_id: str, tokens: int | None) -> None:
        self._batch.later(_FINISH, self._keys(budget.key_id),
                          [req_id, -1 if tokens is None else tokens])

    async def close(self) -> None:
        await self._batch.drain()
        await self.redis.aclose()
        await self.pool.disconnect()


def make_limiter(redis_url: str | None, window_s: float, lease_s: float,
                 on_redis_error: str, timeout_s: float, *, password: str | None = None,
                 ca_file: Path | None = None) -> Limiter:
    if redis_url:
        return RedisLimiter(redis_url, window_s, lease_s, fail_open=on_redis_error == "open",
                            timeout_s=timeout_s, password=password, ca_file=ca_file)
    return MemoryLimiter(window_s)
