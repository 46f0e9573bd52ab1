"""The committed constraints files are what pip resolves, for each target platform.

For every target (GPU: Ubuntu 24.04's CPython 3.12, manylinux x86_64, the package index only;
CPU: Debian 12's CPython 3.11 with this machine's pip configuration, which finds the CPU torch
build) pip resolves the requirements with the committed file as constraints, and the result
must be exactly the committed pins: all of them exist as wheels for that platform, they agree
with each other and with `vllm_version`, nothing is missing and nothing is left over.

Needs the package index (no GPU) and a Python interpreter of each target's version (see
stack/vllm_lock.py: $VLLM_LOCK_PYTHON_3_12, python3.12, pyenv's). Slow: about 3 minutes here
for both targets (resolved in parallel), most of it pip fetching index pages and metadata.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from stack import vllm_lock

pytestmark = pytest.mark.index


@pytest.fixture(scope="module")
def checked() -> dict[str, list[str]]:
    """Both targets resolved at once (each is mostly waiting on the network)."""
    targets = vllm_lock.targets()
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        futures = {name: pool.submit(vllm_lock.check, t) for name, t in targets.items()}
    return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_committed_pins_are_pips_resolution(name, checked):
    target = vllm_lock.targets()[name]
    problems = checked[name]
    assert not problems, (
        f"{target.constraints.name} differs from pip's resolution under it "
        f"(regenerate: python -m stack.vllm_lock --target {name}):\n" + "\n".join(problems))
