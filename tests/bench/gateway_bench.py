"""What the gateway costs, against direct calls and a bare Python proxy: `make bench-gateway`.

One run measures, side by side on this machine (backend, proxies and load generator share its
cores, as they would on one host; compare rows of one run, never figures of different runs):

1. Fixed rate (default 200 req/s, open loop), 8-token completions: latency p50/p99 and the CPU
   each proxy spends per request (from /proc, user + system).
2. Saturation: wrk with 32 connections: the highest request rate.
3. Fast streams (64 tokens, no delay): chunks per second at 32 concurrent streams, time to
   first byte alone (c=1) and under load (p99 at c=32).
4. Paced streams: a stand-in that paces tokens like an A10G (25 ms apart, 128 tokens), 256
   streams open at all times (a busy host's steady state: starts spread out, each client
   starting its next stream when one ends): p99 inter-token latency and time to first token,
   and the gateway's CPU. Then, for information, 256 streams started at the same instant:
   their admissions queue on one core, and the first-token p99 shows how long.

Rows: direct to the stand-in, a bare aiohttp proxy (tests/bench/bare_proxy.py: the Python
floor), the gateway with in-process limits, and the gateway with Redis limits; the paced
table adds a TCP splice (tests/bench/splice_proxy.py: the event loop's own floor, no HTTP at
all), so the gateway's share of a core reads against what any Python proxy spends. Every gateway
feature stays on: auth, limits, metrics, the log line, usage accounting. The targets of the
hot-path issue are printed beside the ratios; this is a report, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.support.gateway import start_gateway
from tests.support.procs import PYTHON, Proc, free_port

FAST = b'{"model":"bench","prompt":"select 1","max_tokens":8}'
TICK = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (0 for the direct row)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class Target:
    name: str
    url: str
    pid: int | None  # the proxy's process; None for direct
    results: dict[str, float] = field(default_factory=dict)


def headers(key: str) -> dict[str, str]:
    return {"content-type": "application/json", "authorization": f"Bearer {key}"}


async def fixed_rate(url: str, key: str, rate: float, seconds: float):
    """Open-loop load: request i starts at t0 + i/rate whatever happened before."""
    latencies, errors = [], 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as s:
        async def one():
            nonlocal errors
            t = time.perf_counter()
            async with s.post(url, data=FAST, headers=headers(key)) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    return
                latencies.append((time.perf_counter() - t) * 1000)

        await asyncio.gather(*(one() for _ in range(50)))  # warm the pools
        latencies.clear()
        t0 = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies, errors


async def streams(url: str, key: str, model: str, tokens: int, concurrency: int, total: int):
    """`total` streams, `concurrency` at a time: time to first byte (ms), gaps between
    events (ms), events received, wall seconds and failed streams."""
    body = (f'{{"model":"{model}","prompt":"select 1","max_tokens":{tokens},"stream":true}}'
            ).encode()
    ttfb, gaps, events, failed = [], [], 0, 0
    left = total
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def worker():
            nonlocal left, events, failed
            while left > 0:
                left -= 1
                t = time.perf_counter()
                last = None
                async with s.post(url, data=body, headers=headers(key)) as r:
                    if r.status != 200:
                        failed += 1
                        await r.read()
                        continue
                    async for line in r.content:
                        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                            continue
                        now = time.perf_counter()
                        if last is None:
                            ttfb.append((now - t) * 1000)
                        else:
                            gaps.append((now - last) * 1000)
                        last = now
                        events += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return ttfb, gaps, events, wall, failed


async def paced(url: str, key: str, pid: int | None, concurrency: int, tokens: int,
                stream_s: float, seconds: float):
    """A busy host's steady state: `concurrency` streams open at all times, their starts spread
    over one stream's length, each client starting its next stream when one ends. Measured
    over `seconds` after every client has started: first-token and inter-token times (ms) of
    the streams that start in that window, the proxy's CPU share over it, failed streams."""
    body = (f'{{"model":"paced","prompt":"select 1","max_tokens":{tokens},"stream":true}}'
            ).encode()
    ttft, gaps, failed = [], [], 0
    t0 = time.perf_counter()
    begin, end = t0 + stream_s, t0 + stream_s + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def client(i: int) -> None:
            nonlocal failed
            await asyncio.sleep(i * stream_s / concurrency)
            while (t := time.perf_counter()) < end:
                counted, last = t >= begin, None
                async with s.post(url, data=body, headers=headers(key)) as r:
                    if r.status != 200:
                        failed += 1
                        await r.read()
                        continue
                    async for line in r.content:
                        if not counted or not line.startswith(b"data: {"):
                            continue
                        now = time.perf_counter()
                        (ttft if last is None else gaps).append(
                            (now - (t if last is None else last)) * 1000)
                        last = now

        async def cpu() -> float:
            await asyncio.sleep(begin - time.perf_counter())
            c0 = cpu_s(pid)
            await asyncio.sleep(end - time.perf_counter())
            return (cpu_s(pid) - c0) / seconds

        *_, share = await asyncio.gather(*(client(i) for i in range(concurrency)), cpu())
    return ttft, gaps, share, failed


def wrk(url: str, key: str, connections: int, seconds: int, workdir: Path) -> tuple[float, int]:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{FAST.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script),
                          url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rps, int(bad.group(1)) if bad else 0


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measure(t: Target, key: str, args, work: Path) -> None:
    r = t.results
    say(f"{t.name}: fixed rate {args.rate:g} req/s for {args.seconds:g} s")
    c0 = cpu_s(t.pid)
    lat, err = asyncio.run(fixed_rate(t.url + "/v1/completions", key, args.rate, args.seconds))
    r["cpu_ms_per_req"] = (cpu_s(t.pid) - c0) * 1000 / max(len(lat), 1)
    r["p50"], r["p99"], r["errors"] = pct(lat, 50), pct(lat, 99), err
    say(f"{t.name}: saturation, wrk -c{args.connections} for {args.saturation_seconds} s")
    r["max_rps"], bad = wrk(t.url + "/v1/completions", key, args.connections,
                            args.saturation_seconds, work)
    r["errors"] += bad
    say(f"{t.name}: fast streams, 64 tokens, c=32 then c=1")
    ttfb, _, events, wall, failed = asyncio.run(
        streams(t.url + "/v1/completions", key, "bench", 64, 32, args.streams))
    r["chunks_per_s"], r["ttfb_p99_c32"] = events / wall, pct(ttfb, 99)
    ttfb1, *_, failed1 = asyncio.run(
        streams(t.url + "/v1/completions", key, "bench", 64, 1, 100))
    r["ttfb_p50_c1"] = pct(ttfb1, 50)
    r["errors"] += failed + failed1


def measure_paced(t: Target, key: str, args) -> None:
    r = t.results
    say(f"{t.name}: paced streams, {args.paced_streams} open at all times for "
        f"{args.paced_seconds:g} s, 128 tokens 25 ms apart")
    ttft, gaps, r["paced_cpu_share"], failed = asyncio.run(paced(
        t.url + "/v1/completions", key, t.pid, args.paced_streams, 128, 128 * 0.025,
        args.paced_seconds))
    r["paced_itl_p99"], r["paced_ttft_p99"] = pct(gaps, 99), pct(ttft, 99)
    say(f"{t.name}: burst, {args.paced_streams} paced streams started at the same instant")
    ttft, _, _, _, burst_failed = asyncio.run(streams(
        t.url + "/v1/completions", key, "paced", 8, args.paced_streams, args.paced_streams))
    r["burst_ttft_p99"] = pct(ttft, 99)
    r["errors"] += failed + burst_failed


def report(rows: list[Target], paced: list[Target]) -> None:
    d, bare, gw, redis = rows
    cols = "{:<36}" + "{:>14}" * len(rows)
    print()
    print(cols.format("", *(t.name for t in rows)))
    lines = [("latency p50 at fixed rate (ms)", "p50", ".2f"),
             ("latency p99 at fixed rate (ms)", "p99", ".2f"),
             ("proxy CPU per request (ms)", "cpu_ms_per_req", ".3f"),
             ("max rate, wrk (req/s)", "max_rps", ".0f"),
             ("stream chunks/s at c=32", "chunks_per_s", ".0f"),
             ("stream first byte p50 at c=1 (ms)", "ttfb_p50_c1", ".2f"),
             ("stream first byte p99 at c=32 (ms)", "ttfb_p99_c32", ".2f"),
             ("errors", "errors", "d")]
    for label, k, f in lines:
        print(cols.format(label, *(format(t.results[k], f) if k != "cpu_ms_per_req" or t.pid
                                   else "-" for t in rows)))
    pd, pg = paced[0], paced[-1]
    print()
    pcols = "{:<40}" + "{:>14}" * len(paced)
    print(pcols.format("paced streams (A10G-like)", *(t.name for t in paced)))
    for label, k, f in [("inter-token latency p99 (ms)", "paced_itl_p99", ".2f"),
                        ("time to first token p99 (ms)", "paced_ttft_p99", ".2f"),
                        ("proxy CPU (share of one core)", "paced_cpu_share", ".3f"),
                        ("burst of all at once: first token p99", "burst_ttft_p99", ".2f"),
                        ("errors", "errors", "d")]:
        print(pcols.format(label, *("-" if k == "paced_cpu_share" and not t.pid
                                    else format(t.results[k], f) for t in paced)))

    g, b, rd = gw.results, bare.results, redis.results
    checks = [
        ("CPU per request vs bare proxy", g["cpu_ms_per_req"] / b["cpu_ms_per_req"], "<=", 1.3),
        ("max rate vs bare proxy", g["max_rps"] / b["max_rps"], ">=", 0.8),
        ("Redis CPU per request vs in-process",
         rd["cpu_ms_per_req"] / g["cpu_ms_per_req"], "<=", 1.25),
        ("Redis max rate vs in-process (inverse)", g["max_rps"] / rd["max_rps"], "<=", 1.25),
        ("stream chunk rate vs direct", g["chunks_per_s"] / d.results["chunks_per_s"], ">=",
         0.85),
        ("first byte at c=1, added (ms)", g["ttfb_p50_c1"] - d.results["ttfb_p50_c1"], "<=",
         0.5),
        ("first byte p99 at c=32 vs direct", g["ttfb_p99_c32"] / d.results["ttfb_p99_c32"],
         "<=", 1.5),
        ("paced: inter-token p99 added (ms)",
         pg.results["paced_itl_p99"] - pd.results["paced_itl_p99"], "<=", 1.0),
        ("paced: first token p99 added (ms)",
         pg.results["paced_ttft_p99"] - pd.results["paced_ttft_p99"], "<=", 2.0),
        ("paced: gateway CPU, share of a core", pg.results["paced_cpu_share"], "<=", 0.25),
    ]
    splice_cpu, bare_cpu, gw_cpu = (t.results["paced_cpu_share"] for t in paced[1:])
    print(f"\npaced: the gateway's CPU is {gw_cpu / bare_cpu:.2f}x the bare proxy's and "
          f"{gw_cpu / splice_cpu:.2f}x the TCP splice's")
    print()
    print("{:<42}{:>10}{:>12}  {}".format("target (hot-path issue)", "measured", "target", ""))
    for label, value, op, bound in checks:
        ok = value <= bound if op == "<=" else value >= bound
        print("{:<42}{:>10.2f}{:>12}  {}".format(label, value, f"{op} {bound:g}",
                                                 "meets" if ok else "MISSES"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--saturation-seconds", type=int, default=8)
    ap.add_argument("--streams", type=int, default=640, help="fast streams per row (c=32)")
    ap.add_argument("--paced-streams", type=int, default=256)
    ap.add_argument("--paced-seconds", type=float, default=10)
    args = ap.parse_args()
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run `make deps` (Debian packages wrk, "
                             "redis-server)")

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    procs: list[Proc] = []

    def start(name: str, cmd: list[str], health: str | None) -> Proc:
        p = Proc(name, cmd, work / f"{name}.log")
        procs.append(p)
        if health:
            p.wait_http(health)
        return p

    def stand_in(name: str, model: str, *extra: str) -> str:
        port = free_port()
        start(name, [PYTHON, "-m", "tests.support.fake_vllm", "--port", str(port),
                     "--served-model-name", model, *extra], f"http://127.0.0.1:{port}/health")
        return f"http://127.0.0.1:{port}"

    gateways = []
    try:
        fast = stand_in("backend", "bench")
        paced = stand_in("paced-backend", "paced", "--token-delay", "0.025")
        bare_port = free_port()
        bare = start("bare-proxy", [PYTHON, "-m", "tests.bench.bare_proxy", "--port",
                                    str(bare_port), "--backend", fast],
                     f"http://127.0.0.1:{bare_port}/health")
        redis_port = free_port()
        start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no"], None)
        models = [{"name": "bench", "backend": fast, "max_concurrency": 10_000},
                  {"name": "paced", "backend": paced, "max_concurrency": 10_000}]
        limits = ["--rpm", "10000000", "--tpm", "1000000000", "--concurrency", "10000"]
        # the access log stays on (info), written to the gateway's log file
        gw = start_gateway(work / "gw", {"models": models}, {"bench": limits})
        gateways.append(gw)
        gw_redis = start_gateway(
            work / "gw-redis",
            {"models": models, "rate_limit": {"redis_url": f"redis://127.0.0.1:{redis_port}/0"}},
            {"bench": limits})
        gateways.append(gw_redis)

        rows = [Target("direct", fast, None),
                Target("bare proxy", f"http://127.0.0.1:{bare_port}", bare.pid),
                Target("gateway", gw.url, gw.proc.pid),
                Target("gw + Redis", gw_redis.url, gw_redis.proc.pid)]
        keys = {"gateway": gw.keys["bench"], "gw + Redis": gw_redis.keys["bench"]}
        for t in rows:
            measure(t, keys.get(t.name, "unused"), args, work)
        paced_port = paced.rsplit(":", 1)[1]
        bare_paced_port, splice_port = free_port(), free_port()
        bare_paced = start("bare-proxy-paced", [
            PYTHON, "-m", "tests.bench.bare_proxy", "--port", str(bare_paced_port),
            "--backend", paced], f"http://127.0.0.1:{bare_paced_port}/health")
        splice = start("splice", [PYTHON, "-m", "tests.bench.splice_proxy", "--port",
                                  str(splice_port), "--backend-port", paced_port],
                       f"http://127.0.0.1:{splice_port}/health")
        paced_rows = [Target("direct", paced, None),
                      Target("TCP splice", f"http://127.0.0.1:{splice_port}", splice.pid),
                      Target("bare proxy", f"http://127.0.0.1:{bare_paced_port}", bare_paced.pid),
                      Target("gateway", gw.url, gw.proc.pid)]
        for t in paced_rows:
            t.results["errors"] = 0
            measure_paced(t, keys.get(t.name, "unused"), args)
    finally:
        for g in gateways:
            g.stop()
        for p in reversed(procs):
            p.stop()
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; compare within this run")
    report(rows, paced_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
