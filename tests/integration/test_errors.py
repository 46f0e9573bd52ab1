"""Every error the API returns: right status, OpenAI error JSON, no stack trace, no key."""

import socket
import threading
import time

import httpx
import pytest


def post(gateway, path="/v1/completions", key="default", headers=None, **kw):
    h = {**(gateway.auth(key) if key else {}), **(headers or {})}
    return httpx.post(gateway.url + path, headers=h, timeout=10, **kw)


def assert_openai_error(r, status, code=None, type_=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code
    if type_:
        assert err["type"] == type_
    assert "Traceback" not in r.text and "sk-" not in r.text
    return err


BODY = {"model": "text2sql", "prompt": "hello", "max_tokens": 2}


@pytest.mark.parametrize("headers", [
    {}, {"authorization": "Bearer sk-000000000000-wrong"}, {"authorization": "Basic abc"},
    {"authorization": "Bearer"}, {"authorization": "Bearer  x y"},
])
def test_missing_wrong_or_malformed_key_is_401(gateway, headers):
    r = post(gateway, key=None, headers=headers, json=BODY)
    assert_openai_error(r, 401, type_="authentication_error")
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_wrong_key_is_not_echoed(gateway):
    secret = "sk-0123456789ab-thisIsMySecretValue"
    r = post(gateway, key=None, headers={"authorization": f"Bearer {secret}"}, json=BODY)
    assert r.status_code == 401 and "thisIsMySecretValue" not in r.text
    assert "thisIsMySecretValue" not in "\n".join(gateway.log_lines())


def test_model_not_allowed_is_403_and_unknown_model_404(gateway):
    assert_openai_error(post(gateway, key="sql-only", json={**BODY, "model": "sql-coder"}),
                        403, "model_not_allowed")
    err = assert_openai_error(post(gateway, json={**BODY, "model": "gpt-9"}), 404,
                              "model_not_found")
    assert "gpt-9" in err["message"] and err["param"] == "model"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x"}, "model"),
    ({"model": "text2sql"}, "prompt"),
    ({"model": "text2sql", "prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ({"model": "text2sql", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "text2sql", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "text2sql", "prompt": "x", "temperature": 9}, "temperature"),
    ({"model": 5, "prompt": "x"}, "model"),
])
def test_wrong_types_are_400_naming_the_field(gateway, body, param):
    err = assert_openai_error(post(gateway, json=body), 400, type_="invalid_request_error")
    assert err["param"].startswith(param) and param in err["message"]


def test_chat_message_fields_are_named(gateway):
    body = {"model": "text2sql", "messages": [{"role": "wizard", "content": "x"}]}
    err = assert_openai_error(post(gateway, "/v1/chat/completions", json=body), 400)
    assert err["param"] == "messages.0.role"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_malformed_json_is_400(gateway, raw):
    assert_openai_error(post(gateway, content=raw), 400)


def test_max_tokens_above_the_model_cap_is_400(gateway):
    err = assert_openai_error(post(gateway, json={**BODY, "max_tokens": 65}), 400,
                              "max_tokens_too_large")
    assert "64" in err["message"]


def test_body_over_the_limit_is_413_whether_declared_or_streamed(gateway):
    big = {**BODY, "prompt": "x" * 70_000}
    assert_openai_error(post(gateway, json=big), 413, "request_too_large")

    def chunks():
        yield b'{"model": "text2sql", "prompt": "'
        for _ in range(80):
            yield b"y" * 1000
        yield b'"}'

    assert_openai_error(post(gateway, content=chunks()), 413, "request_too_large")


def test_backend_down_is_503_naming_the_model(gateway):
    err = assert_openai_error(post(gateway, json={**BODY, "model": "ghost"}), 503,
                              "backend_unavailable")
    assert "ghost" in err["message"] and "127.0.0.1" not in err["message"]


def test_backend_slower_than_the_timeout_is_504(gateway):
    # sql-coder's timeout is 1.5 s
    r = post(gateway, json={"model": "sql-coder", "prompt": "[[sleep=3]]", "max_tokens": 1})
    assert_openai_error(r, 504, "backend_timeout")


def test_backend_4xx_passes_through_in_openai_form(gateway):
    err = assert_openai_error(post(gateway, json={**BODY, "prompt": "[[status=400]]"}), 400)
    assert "stub error 400" in err["message"]


def test_backend_5xx_becomes_502(gateway):
    assert_openai_error(post(gateway, json={**BODY, "prompt": "[[status=500]]"}), 502,
                        "backend_error")


def test_unknown_path_and_wrong_method_are_openai_errors(gateway):
    assert_openai_error(httpx.get(gateway.url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(gateway.url + "/v1/completions"), 405)


def test_client_disconnect_mid_stream_cancels_the_backend(gateway, backends):
    with httpx.stream("POST", gateway.url + "/v1/completions", headers=gateway.auth(),
                      json={"model": "text2sql", "prompt": "x [[delay=0.3]]",
                            "max_tokens": 50, "stream": True}, timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first token
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and backends["sql"].stats()["cancelled"] < 1:
        time.sleep(0.05)
    stats = backends["sql"].stats()
    assert stats["cancelled"] == 1 and stats["completed"] == 0
    # the concurrency slot and the in-flight gauge came back
    assert 'gateway_in_flight_requests{model="text2sql"} 0.0' in gateway.metrics()


def test_slow_loris_client_does_not_hold_other_requests(gateway):
    """A client that sends half a body never blocks the event loop for others."""
    host, port = gateway.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n"
              b"authorization: " + gateway.auth()["authorization"].encode() + b"\r\n\r\n{")
    result = {}
    t = threading.Thread(target=lambda: result.update(r=post(gateway, json=BODY)))
    t.start()
    t.join(10)
    s.close()
    assert result["r"].status_code == 200
