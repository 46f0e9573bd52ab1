"""The pure parts of the request path: bounds, caps, the reservation estimate, SSE splitting,
backend error translation."""

from types import SimpleNamespace

import orjson
import pytest

from app import admission, schemas
from app.config import ModelRoute
from app.errors import ApiError
from app.relay import SseRelay, token_count
from app.upstream import backend_error_body

ROUTE = ModelRoute(name="m", backend="http://127.0.0.1:1", max_tokens=100)
EMBED = ModelRoute(name="e", backend="http://127.0.0.1:1", task="embed")


def nested(depth: int):
    doc = 1
    for _ in range(depth):
        doc = [doc]
    return {"x": doc}


def test_nesting_is_refused_one_level_past_the_limit():
    assert not admission.too_deep(nested(admission.MAX_DEPTH - 1))
    assert admission.too_deep(nested(admission.MAX_DEPTH))
    assert not admission.too_deep({"prompt": [1] * 100_000})


@pytest.mark.parametrize("body, asked, sent", [
    ({}, 100, 100),                                   # absent: the cap, sent as max_tokens
    ({"max_tokens": 7}, 7, 7),
    ({"max_completion_tokens": 5}, 5, 5),             # completions ignore it in vLLM: mirrored
    ({"max_completion_tokens": 5, "max_tokens": 9}, 9, 9),
    ({"max_completion_tokens": 9, "max_tokens": 5}, 9, 5),  # chat honours the 9: reserve 9
])
def test_caps_reserve_the_most_the_backend_may_generate(body, asked, sent):
    assert admission.apply_caps(body, ROUTE) == asked
    assert body["max_tokens"] == sent


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_every_token_field_over_the_cap_is_refused_by_name(field):
    with pytest.raises(ApiError) as e:
        admission.apply_caps({field: 101}, ROUTE)
    assert e.value.param == field and "100" in e.value.message
    assert admission.apply_caps({field: 100}, ROUTE) == 100


@pytest.mark.parametrize("endpoint, route, ok", [
    ("completions", ROUTE, True), ("chat", ROUTE, True), ("embeddings", ROUTE, False),
    ("completions", EMBED, False), ("chat", EMBED, False), ("embeddings", EMBED, True),
])
def test_endpoints_match_the_model_task(endpoint, route, ok):
    if ok:
        admission.check_task(endpoint, route)
    else:
        with pytest.raises(ApiError, match="use POST /v1/"):
            admission.check_task(endpoint, route)


@pytest.mark.parametrize("endpoint, body, expected", [
    # 8 characters: 8 // 4 + 1 = 3 prompt tokens, then 1 prompt x n=1 x 10
    ("completions", {"prompt": "abcdefgh"}, (3, 13)),
    ("completions", {"prompt": "abcdefgh", "n": 3}, (3, 33)),
    ("completions", {"prompt": ["abcd", "abcdefgh"], "n": 2}, (2 + 3, 5 + 2 * 2 * 10)),
    ("completions", {"prompt": [5, 6, 7]}, (3, 13)),
    ("completions", {"prompt": [[5, 6], [7]]}, (3, 3 + 2 * 10)),
    ("embeddings", {"input": ["abcd", "abcdefgh"]}, (5, 5)),
    ("embeddings", {"input": [[1, 2, 3, 4]]}, (4, 4)),
    # (4 + 16) // 4 + 1 = 6
    ("chat", {"messages": [{"role": "user", "content": "abcd"}]}, (6, 16)),
    ("chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]},
     ((admission.IMAGE_TOKENS * 4 + 16) // 4 + 1, (admission.IMAGE_TOKENS * 4 + 16) // 4 + 11)),
])
def test_the_reservation_counts_every_prompt_choice_and_part(endpoint, body, expected):
    assert admission.estimate(endpoint, body, 10) == expected


def test_tool_definitions_count_towards_the_prompt():
    msgs = [{"role": "user", "content": "x"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "d" * 4000}}]
    without = admission.estimate("chat", {"messages": msgs}, 1)[0]
    with_tools = admission.estimate("chat", {"messages": msgs, "tools": tools}, 1)[0]
    assert with_tools - without >= 1000


@pytest.mark.parametrize("prompt", [[3] * 100, [[3] * 10] * 100])
def test_large_token_id_prompts_take_the_cheap_path_and_stay_intact(prompt):
    body = orjson.dumps({"model": "m", "prompt": prompt})
    assert admission.parse_body(body, schemas.CompletionRequest)["prompt"] == prompt


@pytest.mark.parametrize("prompt", [[3] * 99 + [-1], [3] * 99 + [2**31], [3] * 99 + [1.5],
                                    [[3] * 10] * 99 + [[]]])
def test_the_cheap_path_still_refuses_what_validation_refuses(prompt):
    body = orjson.dumps({"model": "m", "prompt": prompt})
    with pytest.raises(ApiError) as e:
        admission.parse_body(body, schemas.CompletionRequest)
    assert e.value.param.startswith("prompt")


def test_whole_number_floats_are_integers_and_others_are_not():
    body = admission.parse_body(b'{"model": "m", "prompt": "x", "n": 2.0, "max_tokens": 3.0}',
                                schemas.CompletionRequest)
    assert type(body["n"]) is int and type(body["max_tokens"]) is int
    for bad in (b'2.5', b'"2"', b'true', b'1e300'):
        with pytest.raises(ApiError):
            admission.parse_body(b'{"model": "m", "prompt": "x", "n": ' + bad + b'}',
                                 schemas.CompletionRequest)


@pytest.mark.parametrize("value, expected", [(3, 3), (0, 0), (-1, None), ("3", None),
                                             (True, None), (2.0, None), (None, None)])
def test_usage_numbers_are_taken_only_as_non_negative_ints(value, expected):
    assert token_count(value) == expected


@pytest.mark.parametrize("raw, message", [
    (b'{"error": {"message": "too long", "type": "BadRequestError", "code": 400}}', "too long"),
    (b'{"message": "flat shape", "type": "x"}', "flat shape"),
    (b"<html>/srv/app.py Traceback sk-secret</html>", "backend status 400"),
    (b'{"error": {"message": ["not", "a", "string"]}}', "backend status 400"),
    (b'{"error": {"message": "' + b"y" * 5000 + b'"}}', "y" * 500),
])
def test_backend_errors_become_short_clean_openai_errors(raw, message):
    err = orjson.loads(backend_error_body(raw, 400, "m"))["error"]
    assert message in err["message"]
    assert len(err["message"]) <= 500 and "sk-secret" not in str(err)
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] is None or isinstance(err["code"], str)


def relay() -> SseRelay:
    ex = SimpleNamespace(model="m", chunks=0, prompt_tokens=None, completion_tokens=None,
                         t0=0.0, backend=SimpleNamespace(route=ROUTE),
                         gw=SimpleNamespace(streams=set()))
    return SseRelay(ex, resp=None, hide_usage=True, served="m")


def test_events_split_on_crlf_and_cr_even_across_reads():
    r, out = relay(), b""
    buf = b""
    for piece in (b'data: {"a":1}\r', b'\n\r\ndata: {"b":2}\r\r', b"data: [DONE]\r\n\r\n"):
        events, buf = r._split(buf + piece)
        out += events
    assert out == b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    assert r.done and r.ex.chunks == 2 and buf == b""


def test_the_hidden_usage_chunk_is_read_and_dropped():
    r = relay()
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":9}}\n\n'
    events, _ = r._split(usage)
    assert events == b"" and r.ex.prompt_tokens == 4 and r.ex.completion_tokens == 9
    assert r.ex.chunks == 0


def test_events_in_one_read_pass_as_they_came_unless_one_must_change():
    r = relay()
    plain = b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\n'
    events, rest = r._split(plain + b'data: {"cho')
    assert events == plain and rest == b'data: {"cho' and r.ex.chunks == 2
    # the last content chunk carrying usage the client did not ask for: usage removed only
    mixed = (b'data: {"choices":[{"text":"c"}]}\n\n'
             b'data: {"choices":[{"text":"d"}],"usage":{"prompt_tokens":1,"completion_tokens":3}}'
             b"\n\ndata: [DONE]\n\n")
    events, rest = r._split(mixed)
    assert events == (b'data: {"choices":[{"text":"c"}]}\n\ndata: {"choices":[{"text":"d"}]}'
                      b"\n\ndata: [DONE]\n\n")
    assert rest == b"" and r.done and r.ex.completion_tokens == 3 and r.ex.chunks == 4


def test_an_event_that_never_ends_is_refused_past_its_cap():
    from app.relay import MAX_EVENT_BYTES, _Broken
    r = relay()
    r._split(b"data: " + b"x" * (MAX_EVENT_BYTES - 10))
    with pytest.raises(_Broken):
        r._split(b"data: " + b"x" * (MAX_EVENT_BYTES + 1))


@pytest.mark.parametrize("stream", [
    b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\ndata: [DONE]\n\n',
    # text that looks like the protocol: neither an event nor the end
    b'data: {"choices":[{"text":"data: {x\\n\\ndata: [DONE]"}]}\n\ndata: [DONE]\n\n',
    # cut off before its end, though its text quotes the end
    b'data: {"choices":[{"text":"data: [DONE]"}]}\n\ndata: {"choices":[]}\n\n',
    # extra blank lines, a comment and a multi-line event
    b': keep-alive\n\n\n\ndata: {"a":1}\n\ndata: {"b":\ndata: 2}\n\ndata: [DONE]\n\n',
])
@pytest.mark.parametrize("cut", [1, 7, 16, 1000])
def test_whole_reads_count_events_and_the_end_as_event_by_event_does(stream, cut):
    """The fast path (a read without usage passes whole) must count what the per-event path
    counts: chunks with a body, and [DONE] only as an event of its own."""
    fast, slow = relay(), relay()
    slow.rename = (b"\x00never", b"\x00never")  # forces the per-event path, changes nothing
    outs = {}
    for r in (fast, slow):
        out, buf = b"", b""
        for i in range(0, len(stream), cut):
            piece, buf = r._split(buf + stream[i:i + cut])
            out += piece
        outs[r] = out + buf
    assert outs[fast] == outs[slow] == stream
    assert fast.ex.chunks == slow.ex.chunks and fast.done == slow.done
    assert fast.done == stream.endswith(b"data: [DONE]\n\n")
