"""The real data path: HTTPS (nginx) -> gateway -> real vLLM on the CPU, with the openai client."""

import os
import signal
import socket
import ssl
import time
import warnings
from pathlib import Path

import httpx
import openai
import pytest

from stack import declaration, local
from tests.support.gateway import create_key

pytestmark = pytest.mark.e2e

MODELS = declaration.load()
TEXT = [m.name for m in MODELS if m.task == "generate"]
EMBED = [m.name for m in MODELS if m.task == "embed"]


def test_models_listed_are_the_declared_ones(local_stack):
    assert [m.id for m in local_stack.client().models.list()] == [m.name for m in MODELS]


def test_completion_through_the_front_door(local_stack):
    r = local_stack.client().completions.create(model=TEXT[0], prompt="SELECT", max_tokens=8)
    assert r.model == TEXT[0] and r.choices[0].text
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0


def test_chat_stream_yields_chunks_and_a_final_usage(local_stack):
    stream = local_stack.client().chat.completions.create(
        model=TEXT[-1], messages=[{"role": "user", "content": "list all customers"}],
        max_tokens=24, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 5
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_embeddings_have_the_models_real_dimension(local_stack):
    r = local_stack.client().embeddings.create(model=EMBED[0], input=["orders by customer"])
    assert len(r.data[0].embedding) == 384  # all-MiniLM-L6-v2
    assert r.usage.prompt_tokens > 0


def test_wrong_key_is_401(local_stack):
    with pytest.raises(openai.AuthenticationError):
        local_stack.client(key="sk-000000000000-not-a-key").models.list()


def test_exceeding_a_keys_limit_is_429(local_stack):
    key = create_key(local.RUN / "gateway" / "keys.json", f"e2e-{time.time_ns()}",
                     "--rpm", "2")
    time.sleep(1.2)  # the gateway re-reads the keys file within a second
    client = local_stack.client(key=key)
    for _ in range(2):
        client.completions.create(model=TEXT[0], prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=TEXT[0], prompt="x", max_tokens=1)
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_edge_serves_only_the_api(local_stack):
    with local_stack.http() as c:
        for path in ("/metrics", "/openapi.json", "/", "/admin"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = c.get("/health")
        assert r.status_code == 200
        assert r.headers["strict-transport-security"].startswith("max-age=")
        assert r.headers.get("server", "") == "nginx"  # no version


def test_tls_is_modern_and_speaks_http2(local_stack):
    host, port = "localhost", local.HTTPS_PORT
    ctx = ssl.create_default_context(cafile=str(local_stack.ca))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((host, port)) as s, ctx.wrap_socket(s, server_hostname=host) as t:
        assert t.version() in ("TLSv1.2", "TLSv1.3")
        assert t.selected_alpn_protocol() == "h2"
    old = ssl.create_default_context(cafile=str(local_stack.ca))
    with warnings.catch_warnings():  # asking for TLS 1.1 on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError), socket.create_connection((host, port)) as s:
        old.wrap_socket(s, server_hostname=host)


def test_a_dead_engine_is_reported_and_refused_fast_while_others_answer(local_stack):
    victim = next(c for c in local.components(MODELS, None) if c.name == f"vllm-{TEXT[-1]}")
    pid = victim.pid()
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    try:
        with local_stack.http() as c:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                ready = c.get("/ready")
                if ready.status_code == 503:
                    break
                time.sleep(0.2)
            assert ready.status_code == 503
            assert ready.json()["models"][TEXT[-1]]["status"] == "down"
            assert ready.json()["down"] == [TEXT[-1]]
            t = time.monotonic()
            r = c.post("/v1/completions", headers={"authorization": f"Bearer {local_stack.key}"},
                       json={"model": TEXT[-1], "prompt": "x", "max_tokens": 1})
            assert r.status_code == 503 and TEXT[-1] in r.json()["error"]["message"]
            assert time.monotonic() - t < 1.0
        other = local_stack.client().completions.create(model=TEXT[0], prompt="x", max_tokens=1)
        assert other.choices
    finally:
        # `up` restarts only what is down
        assert local.main(["up"]) == 0
    with local_stack.http() as c:
        # the gateway's background check sees the engine back within ready.interval_s
        deadline = time.monotonic() + 10
        while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.get("/ready").status_code == 200


def test_planner_kv_arithmetic_matches_what_real_vllm_reports(local_stack):
    """The GPU planner's KV-cache tokens for a budget agree with the engine's own count."""
    import json
    import re

    from stack import gpu_planner
    from stack.render import parse_env_file

    model = next(m for m in MODELS if m.task == "generate")
    env = parse_env_file((local.RUN / "vllm" / f"{model.name}.env").read_text())
    budget = float(env["VLLM_CPU_KVCACHE_SPACE"]) * gpu_planner.GIB
    path = re.search(r"--model (\S+)", env["VLLM_ARGS"]).group(1)
    cfg = json.loads((Path(path) / "config.json").read_text())
    cfg["torch_dtype"] = re.search(r"--dtype (\S+)", env["VLLM_ARGS"]).group(1)
    planned = gpu_planner.kv_tokens(gpu_planner.Architecture.from_config(cfg), budget)
    metrics = httpx.get(f"http://127.0.0.1:{model.port}/metrics").text
    reported = int(re.search(r'vllm:cache_config_info\{[^}]*kv_cache_size_tokens="(\d+)"',
                             metrics).group(1))
    assert abs(planned - reported) / reported <= 0.10, (planned, reported)
