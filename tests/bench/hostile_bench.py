"""What one hostile client costs everyone else: `make bench-hostile`.

One key sends its worst valid-looking bodies back to back (about 1 MB of token ids, or 2048
short prompts, each refused only after full parsing because it exceeds the key's tokens per
minute), from several connections at once. Large bodies count against the key's requests per
minute before they are read: each body kind runs once with a key that has budget left (every
body parsed, then refused) and once with a key whose requests/min are spent (refused unread).
Meanwhile another key measures /health and a small completion one request at a time. The
same measurement without the attacker, in the same run, is the baseline; the table shows
both and their ratio.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson

from tests.bench.gateway_bench import pct
from tests.support.gateway import start_gateway
from tests.support.procs import PYTHON, Proc, free_port

WORST = {
    "1 MB of token ids": {"model": "bench", "prompt": [123456] * 140_000, "max_tokens": 8},
    "2048 token-id prompts": {"model": "bench", "prompt": [[123456] * 64] * 2048,
                              "max_tokens": 8},
    "2048 text prompts": {"model": "bench", "prompt": ["select * from t " * 25] * 2048,
                          "max_tokens": 8},
}
SMALL = {"model": "bench", "prompt": "select 1", "max_tokens": 8}


def victim(url: str, key: str, seconds: float) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"health": [], "completion": []}
    auth = {"authorization": f"Bearer {key}"}
    with httpx.Client(timeout=30) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            c.get(url + "/health").raise_for_status()
            out["health"].append(time.perf_counter() - t)
            t = time.perf_counter()
            c.post(url + "/v1/completions", json=SMALL, headers=auth).raise_for_status()
            out["completion"].append(time.perf_counter() - t)
    return out


def attacker(url: str, key: str, body: bytes, stop: threading.Event, sent: list[int]) -> None:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            r = c.post(url + "/v1/completions", content=body, headers=headers)
            assert r.status_code in (400, 429), r.text[:200]
            sent.append(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--connections", type=int, default=4, help="attacker connections")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        backend = Proc("fake-vllm", [PYTHON, "-m", "tests.support.fake_vllm", "--host",
                                     "127.0.0.1", "--port", str(port), "--served-model-name",
                                     "bench"], Path(tmp) / "backend.log")
        backend.wait_http(f"http://127.0.0.1:{port}/health")
        gw = start_gateway(Path(tmp) / "gw", {"models": [
            {"name": "bench", "backend": f"http://127.0.0.1:{port}", "max_tokens": 64}]}, {
            "victim": ["--rpm", "1000000", "--tpm", "1000000000", "--concurrency", "100"],
            "open": ["--rpm", "100000000", "--tpm", "1000", "--concurrency", "100"],
            "spent": ["--rpm", "1", "--tpm", "1000", "--concurrency", "100"]})
        with httpx.Client() as c:  # spend the `spent` key's one request
            c.post(gw.url + "/v1/completions", json=SMALL, headers={
                "authorization": f"Bearer {gw.keys['spent']}"}).raise_for_status()
        try:
            rows = [("no attacker (baseline)", victim(gw.url, gw.keys["victim"], args.seconds),
                     0.0, 0)]
            for (name, doc), key in itertools.product(WORST.items(), ("open", "spent")):
                body = orjson.dumps(doc)
                stop, sent = threading.Event(), []
                threads = [threading.Thread(target=attacker, args=(
                    gw.url, gw.keys[key], body, stop, sent))
                    for _ in range(args.connections)]
                for t in threads:
                    t.start()
                t0 = time.monotonic()
                got = victim(gw.url, gw.keys["victim"], args.seconds)
                rate = len(sent) / (time.monotonic() - t0)
                stop.set()
                for t in threads:
                    t.join()
                what = "parsed, refused" if key == "open" else "refused unread (budget spent)"
                rows.append((f"{name} ({len(body) // 1024} KB): {what}", got, rate, len(body)))
        finally:
            gw.stop()
            backend.stop()
    base = rows[0][1]
    print(f"\nOther clients' latency while one key sends refused worst-case bodies on "
          f"{args.connections} connections, {time.strftime('%Y-%m-%d')}\n")
    print("| attacker sends | bodies/s | /health p50 / p99 ms | completion p50 / p99 ms "
          "| completion p99 vs baseline |")
    print("|---|---|---|---|---|")
    for name, got, rate, _ in rows:
        h, c = got["health"], got["completion"]
        ratio = pct(c, 99) / pct(base["completion"], 99)
        print(f"| {name} | {rate:.0f} | {1e3 * pct(h, 50):.1f} / {1e3 * pct(h, 99):.1f} | "
              f"{1e3 * pct(c, 50):.1f} / {1e3 * pct(c, 99):.1f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
