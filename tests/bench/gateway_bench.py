"""What the gateway adds over calling the backend directly: `make bench-gateway`.

1. Fixed rate (default 200 req/s, open loop): latency p50/p99 direct and through the gateway;
   the difference is what the gateway adds. The gateway's own x-gateway-overhead-ms header is
   summarised too.
2. Saturation: wrk with N connections for a few seconds, direct and through the gateway.

The backend is the vLLM stand-in from tests/support (8-token completions, no delay), so the
numbers are the proxy's cost, not a model's. Everything runs on this machine's cores:
backend, gateway and load generator compete for them, as they would on one host.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.support.gateway import start_gateway
from tests.support.procs import PYTHON, Proc, free_port

BODY = b'{"model":"bench","prompt":"select 1","max_tokens":8}'


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def fixed_rate(url: str, key: str, rate: float, seconds: float):
    """Open-loop load: request i starts at t0 + i/rate whatever happened before."""
    latencies, overheads, errors = [], [], 0
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    conn = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def one():
            nonlocal errors
            t = time.perf_counter()
            async with s.post(url, data=BODY, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    return
                latencies.append((time.perf_counter() - t) * 1000)
                if "x-gateway-overhead-ms" in r.headers:
                    overheads.append(float(r.headers["x-gateway-overhead-ms"]))

        # warm the pools
        await asyncio.gather(*(one() for _ in range(50)))
        latencies.clear(), overheads.clear()
        n = int(rate * seconds)
        t0 = time.perf_counter()
        tasks = []
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies, overheads, errors


def wrk(url: str, key: str, connections: int, seconds: int, workdir: Path) -> tuple[float, int]:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{BODY.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script),
                          url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rps, int(bad.group(1)) if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--saturation-seconds", type=int, default=8)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: run `make deps` (Debian package wrk)")

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    port = free_port()
    backend = Proc("backend", [PYTHON, "-m", "tests.support.fake_vllm", "--host", "127.0.0.1",
                               "--port", str(port), "--served-model-name", "bench"],
                   work / "backend.log")
    direct = f"http://127.0.0.1:{port}"
    backend.wait_http(direct + "/health")
    gw = start_gateway(work / "gw", {"models": [{"name": "bench", "backend": direct,
                                                 "max_concurrency": 10_000}]},
                       {"bench": ["--rpm", "10000000", "--tpm", "1000000000",
                                  "--concurrency", "10000"]},
                       env={"GATEWAY_LOG_LEVEL": "warning"})
    key = gw.keys["bench"]
    try:
        print(f"fixed rate: {args.rate:g} req/s for {args.seconds:g} s, 8-token completions")
        d_lat, _, d_err = asyncio.run(fixed_rate(direct + "/v1/completions", key, args.rate,
                                                 args.seconds))
        g_lat, g_over, g_err = asyncio.run(fixed_rate(gw.url + "/v1/completions", key,
                                                      args.rate, args.seconds))
        print(f"saturation: wrk, {args.connections} connections, "
              f"{args.saturation_seconds} s each")
        d_rps, d_bad = wrk(direct + "/v1/completions", key, args.connections,
                           args.saturation_seconds, work)
        g_rps, g_bad = wrk(gw.url + "/v1/completions", key, args.connections,
                           args.saturation_seconds, work)
    finally:
        gw.stop()
        backend.stop()

    rows = [
        ("latency p50 (ms)", pct(d_lat, 50), pct(g_lat, 50), pct(g_lat, 50) - pct(d_lat, 50)),
        ("latency p99 (ms)", pct(d_lat, 99), pct(g_lat, 99), pct(g_lat, 99) - pct(d_lat, 99)),
        ("latency mean (ms)", statistics.fmean(d_lat), statistics.fmean(g_lat),
         statistics.fmean(g_lat) - statistics.fmean(d_lat)),
        ("self-reported overhead p50 (ms)", None, pct(g_over, 50), None),
        ("self-reported overhead p99 (ms)", None, pct(g_over, 99), None),
        ("max rate (req/s)", d_rps, g_rps, None),
        ("errors (fixed rate + saturation)", d_err + d_bad, g_err + g_bad, None),
    ]
    fmt = "{:<34}{:>12}{:>16}{:>12}"
    print()
    print(fmt.format("", "direct", "via gateway", "added"))
    for name, a, b, c in rows:
        print(fmt.format(name, *("-" if v is None else f"{v:.2f}" if isinstance(v, float)
                                 else str(v) for v in (a, b, c))))
    print()
    print("targets on a 2-core machine: added p50 <= 1.5 ms and p99 <= 5 ms at 200 req/s; "
          ">= 1000 req/s through one gateway process")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
