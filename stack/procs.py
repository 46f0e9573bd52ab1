"""Processes we started, named by PID plus start time (a PID alone can be reused), and
stopped by that identity only: never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def start_time(pid: int | None) -> int | None:
    """Clock ticks since boot when a live PID started; None when it is gone or a zombie."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        return None
    return int(fields[19])


def alive(pid: int | None, started: int | None) -> bool:
    return bool(pid) and started is not None and start_time(pid) == started


def stop(pid: int, started: int | None, timeout: float, group: bool = False) -> bool:
    """SIGTERM, wait up to `timeout`, then SIGKILL (the whole process group when `group`:
    a process started in its own session, with children such as vLLM's engine). False when
    it was already gone."""
    if not alive(pid, started):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid, started):
        time.sleep(0.2)
    if alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
        while alive(pid, started):
            time.sleep(0.1)
    return True
