"""The OpenAI endpoints through a real gateway process, with the official client."""

import asyncio
import json
import time

import httpx
import openai
import pytest


def test_models_lists_only_what_the_key_may_use(gateway):
    all_ids = [m.id for m in gateway.client().models.list()]
    assert all_ids == ["text2sql", "sql-coder", "embed", "ghost"]
    assert [m.id for m in gateway.client("sql-only").models.list()] == ["text2sql"]


def test_completion_routes_by_model_and_renames_the_served_model(gateway, backends):
    r = gateway.client().completions.create(model="text2sql", prompt="list all users",
                                            max_tokens=5)
    assert r.model == "text2sql"  # the public name, though the backend serves "tiny-sql"
    assert r.choices[0].text.split() == ["tok0", "tok1", "tok2", "tok3", "tok4"]
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 5
    sent = backends["sql"].stats()["last_request"]
    assert sent["model"] == "tiny-sql" and sent["max_tokens"] == 5
    assert backends["coder"].stats()["requests"] == 0


def test_chat_without_max_tokens_gets_the_model_cap(gateway, backends):
    r = gateway.client().chat.completions.create(
        model="sql-coder", messages=[{"role": "user", "content": "count orders"}])
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 64  # max_tokens of sql-coder in the declaration
    assert backends["coder"].stats()["last_request"]["max_tokens"] == 64


def test_chat_stream_arrives_chunk_by_chunk_with_usage_when_asked(gateway):
    stream = gateway.client().chat.completions.create(
        model="text2sql", messages=[{"role": "user", "content": "one two"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and
               c.choices[0].delta.content]
    assert len(content) == 6
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.model == "text2sql" for c in chunks)


def test_stream_without_usage_is_billed_but_the_client_sees_no_usage(gateway, backends):
    before = _tokens(gateway, "text2sql", "completion")
    stream = gateway.client().completions.create(model="text2sql", prompt="a b c",
                                                 max_tokens=7, stream=True)
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # no usage-only chunk leaked to the client
    # the gateway asked the backend for usage on the client's behalf
    assert backends["sql"].stats()["last_request"]["stream_options"] == {"include_usage": True}
    assert _tokens(gateway, "text2sql", "completion") - before == 7


def test_stream_first_byte_leaves_before_the_backend_finishes(gateway):
    # 5 tokens 0.4 s apart: the first chunk must reach us long before the last is made
    with httpx.stream("POST", gateway.url + "/v1/completions", headers=gateway.auth(),
                      json={"model": "text2sql", "prompt": "x [[delay=0.4]]", "max_tokens": 5,
                            "stream": True}, timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        arrivals = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 5
    # chunk arrival times spread out with the backend's pace instead of arriving together
    assert arrivals[-1] - arrivals[0] > 1.0


def test_async_client_streams_and_embeds(gateway):
    async def go():
        client = gateway.async_client()
        stream = await client.chat.completions.create(
            model="sql-coder", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            stream=True)
        parts = [c.choices[0].delta.content async for c in stream
                 if c.choices and c.choices[0].delta.content]
        emb = await client.embeddings.create(model="embed", input=["select", "from where"])
        await client.close()
        return parts, emb

    parts, emb = asyncio.run(go())
    assert len(parts) == 3
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384
    assert emb.usage.prompt_tokens == 3 and emb.model == "embed"


def test_response_carries_request_id_and_gateway_overhead(gateway):
    r = httpx.post(gateway.url + "/v1/completions", headers={**gateway.auth(),
                   "x-request-id": "trace-123"},
                   json={"model": "text2sql", "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-123"
    assert float(r.headers["x-gateway-overhead-ms"]) >= 0
    assert int(r.headers["x-ratelimit-remaining-requests"]) > 0
    r2 = httpx.post(gateway.url + "/v1/completions", headers=gateway.auth(),
                    json={"model": "text2sql", "prompt": "hi", "max_tokens": 1})
    assert len(r2.headers["x-request-id"]) == 32  # made up when the client sent none


def test_one_json_log_line_per_request_without_the_key(gateway):
    key = gateway.keys["default"]
    httpx.post(gateway.url + "/v1/chat/completions",
               headers={**gateway.auth(), "x-request-id": "log-probe-1"},
               json={"model": "text2sql", "messages": [{"role": "user", "content": "a b"}],
                     "max_tokens": 4})
    time.sleep(0.2)
    lines = [json.loads(x) for x in gateway.log_lines() if "log-probe-1" in x]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["key"] == "default" and entry["model"] == "text2sql"
    assert entry["status"] == 200 and entry["prompt_tokens"] == 2
    assert entry["completion_tokens"] == 4
    assert {"ttft_ms", "duration_ms", "tokens_per_s", "overhead_ms"} <= entry.keys()
    assert key not in "\n".join(gateway.log_lines())


def _tokens(gateway, model, kind):
    for line in gateway.metrics().splitlines():
        if (line.startswith("gateway_tokens_total{") and f'model="{model}"' in line
                and f'kind="{kind}"' in line and 'key="default"' in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_tokens_and_latency(gateway):
    gateway.client().completions.create(model="sql-coder", prompt="p q", max_tokens=2)
    text = gateway.metrics()
    assert 'gateway_requests_total{key="default",model="sql-coder",status="200"}' in text
    assert 'gateway_request_duration_seconds_bucket{le="+Inf",model="sql-coder"}' in text
    assert 'gateway_time_to_first_byte_seconds_count{model="sql-coder"}' in text
    assert 'gateway_overhead_seconds_count{model="sql-coder"}' in text
    assert _tokens(gateway, "sql-coder", "prompt") >= 2
    assert 'gateway_in_flight_requests{model="sql-coder"} 0.0' in text


@pytest.mark.parametrize("use_async", [False, True])
def test_client_errors_surface_as_openai_exceptions(gateway, use_async):
    async def call():
        c = gateway.async_client()
        try:
            await c.completions.create(model="nope", prompt="x")
        finally:
            await c.close()

    with pytest.raises(openai.NotFoundError) as e:
        if use_async:
            asyncio.run(call())
        else:
            gateway.client().completions.create(model="nope", prompt="x")
    assert e.value.code == "model_not_found"
