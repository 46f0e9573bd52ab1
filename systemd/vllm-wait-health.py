#!/usr/bin/python3
"""Block until this vLLM instance answers GET /health with 200, or give up.

vllm@.service runs it as ExecStartPost: the unit becomes active only once the engine is
healthy, and the next instance in the start order (After=vllm@<previous>.service, a drop-in
rendered from the model declaration) starts only then. vLLM instances sharing a GPU must start
one after another: started together they miscount each other's free memory.

    vllm-wait-health [--timeout SECONDS] [--interval SECONDS]

The address comes from $VLLM_ARGS (--host, --port), the instance's own flags from its
EnvironmentFile: one source, nothing to keep in step. Standard library only (it runs with the
system's python3). Exit 0: healthy. Exit 1: timed out (the start job fails; systemd's
Restart= and the next instance's start go on). Exit 2: no port in $VLLM_ARGS.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import sys
import time


def address(vllm_args: str) -> tuple[str, int]:
    """--host and --port of a vLLM command line (either `--port N` or `--port=N`)."""
    host, port = "127.0.0.1", None
    argv = shlex.split(vllm_args)
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name not in ("--host", "--port"):
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if name == "--host":
            host = value
        elif value.isdigit():
            port = int(value)
    if port is None:
        raise ValueError("no --port in VLLM_ARGS")
    # a wildcard listen address is reached on loopback
    return ("127.0.0.1" if host in ("", "0.0.0.0", "::") else host), port


def healthy(host: str, port: int, timeout: float) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:  # refused while the engine loads (the HTTP server starts last), reset, timeout
        return False
    finally:
        conn.close()


def wait(host: str, port: int, timeout: float, interval: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if healthy(host, port, timeout=min(10.0, max(interval, 1.0))):
            return True
        if time.monotonic() + interval > deadline:
            return False
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this (s)")
    p.add_argument("--interval", type=float, default=2.0, help="between probes (s)")
    args = p.parse_args(argv)
    try:
        host, port = address(os.environ.get("VLLM_ARGS", ""))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    if wait(host, port, args.timeout, args.interval):
        print(f"http://{host}:{port}/health answered 200 after "
              f"{time.monotonic() - started:.0f} s", flush=True)
        return 0
    print(f"error: http://{host}:{port}/health did not answer 200 within {args.timeout:.0f} s",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
