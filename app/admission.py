"""Admission: read, parse and check a request body, cap it and estimate what it may cost.

Pure functions over the parsed body (a plain dict), so each rule is unit-tested on its own.
Every bound here holds before any budget is charged, so a refused request stays cheap.
"""

from __future__ import annotations

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

from app import schemas
from app.config import ModelRoute
from app.errors import ApiError, bad_request

# Deeper than any real request (JSON schemas in response_format or tools run to ~10 levels);
# orjson refuses to write past 254, and deep input makes validation and estimates recurse.
MAX_DEPTH = 64
CHARS_PER_TOKEN = 4  # the reservation's estimate; the backend's count settles it
# reserved per image part: vision models spend hundreds to a few thousand tokens per image
IMAGE_TOKENS = 1024
_IMAGE_PARTS = {"image_url", "input_image", "image"}


# bodies above this are charged to requests/min before they are read (see routes.py)
SMALL_BODY = 64 << 10


def small(request: Request) -> bool:
    declared = request.headers.get("content-length")
    return declared is not None and declared.isdigit() and int(declared) <= SMALL_BODY


class ClientGone(Exception):
    """The client disconnected before its request was complete."""


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"request body is larger than the {limit}-byte limit",
                       "invalid_request_error", "request_too_large")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length is not a number")
        if int(declared) > limit:
            raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
    except ClientDisconnect:
        raise ClientGone from None
    return bytes(body)


_SCALARS = {int, float, str, bool, type(None)}


def too_deep(doc, limit: int = MAX_DEPTH) -> bool:
    """Whether lists and objects nest deeper than `limit` (iterative: no recursion)."""
    todo = [(doc, 1)]
    while todo:
        node, depth = todo.pop()
        children = node.values() if type(node) is dict else node
        if set(map(type, children)) <= _SCALARS:
            continue  # a flat list (token ids): checked at C speed, not item by item
        for child in children:
            t = type(child)
            if t is dict or t is list:
                if depth >= limit:
                    return True
                todo.append((child, depth + 1))
    return False


def _token_ids(value) -> bool:
    return type(value) is list and bool(value) and set(map(type, value)) == {int} \
        and min(value) >= 0 and max(value) <= schemas.MAX_TOKEN_ID


def _cheap_stand_in(data: dict, field: str) -> dict:
    """`data` with a large token-id prompt checked here at C speed and replaced by a
    one-token stand-in, so the schema validation that follows costs nothing per token
    (validating 200k ids one by one held the event loop for tenths of a second)."""
    value = data.get(field)
    if type(value) is not list or len(value) < 64:
        return data
    if _token_ids(value):
        return {**data, field: [0]}
    if len(value) <= schemas.MAX_ITEMS and set(map(type, value)) == {list} \
            and all(_token_ids(v) for v in value):
        return {**data, field: [[0]]}
    return data


def parse_body(body: bytes, model_cls) -> dict:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    checked = _cheap_stand_in(data, "input" if model_cls is schemas.EmbeddingRequest else "prompt")
    if too_deep(checked):
        raise bad_request(f"request body nests lists or objects deeper than {MAX_DEPTH} levels")
    try:
        valid = model_cls.__pydantic_validator__.validate_python(checked)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"invalid field '{field}': {first['msg']}", param=field) from None
    for field in _COUNTS:  # 2.0 was accepted as 2: keep the int, for the arithmetic here
        if data.get(field) is not None:
            data[field] = getattr(valid, field)
    if data.get("stream_options") is not None and not data.get("stream"):
        del data["stream_options"]  # meaningless without a stream, and vLLM refuses it
    return data


_COUNTS = ("max_tokens", "max_completion_tokens", "n")


def check_task(endpoint: str, route: ModelRoute) -> None:
    """Completions and chat go to generators, embeddings to pooling models."""
    if endpoint == "embeddings" and route.task != "embed":
        raise bad_request(f"model '{route.name}' generates text: use POST /v1/completions or "
                          "/v1/chat/completions", param="model", code="wrong_endpoint_for_model")
    if endpoint != "embeddings" and route.task == "embed":
        raise bad_request(f"model '{route.name}' computes embeddings: use POST /v1/embeddings",
                          param="model", code="wrong_endpoint_for_model")


def apply_caps(data: dict, route: ModelRoute) -> int:
    """Refuse token counts above the model's cap, default the count to the cap when absent,
    and return the most tokens one generation may produce.

    vLLM reads `max_completion_tokens or max_tokens` on chat and `max_tokens` on completions;
    every field present is capped and `max_tokens` is always set, so whichever the backend
    honours, it is at most the value returned here.
    """
    cap = route.max_tokens
    asked = [(f, data[f]) for f in ("max_tokens", "max_completion_tokens")
             if data.get(f) is not None]
    for field, value in asked:
        if value > cap:
            raise bad_request(
                f"{field}={value} is above model '{route.name}' limit of {cap}; ask for {cap} "
                "or fewer", param=field, code="max_tokens_too_large")
    if data.get("max_tokens") is None:
        data["max_tokens"] = data.get("max_completion_tokens") or cap
    return max(v for _, v in asked) if asked else data["max_tokens"]


def _content_chars(content) -> int:
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        return 0
    chars = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") in _IMAGE_PARTS:
            chars += IMAGE_TOKENS * CHARS_PER_TOKEN
        elif isinstance(part.get("text"), str):
            chars += len(part["text"])
        else:  # audio, files, parts we do not know: count their JSON
            chars += len(orjson.dumps(part))
    return chars


def _inputs(value) -> tuple[int, int]:
    """(prompts, tokens) of a prompt or input field: a string, strings, token ids or lists
    of token ids (each list item is a prompt of its own)."""
    if isinstance(value, str):
        return 1, len(value) // CHARS_PER_TOKEN + 1
    if value and isinstance(value[0], int | float):  # token ids (2.0 is accepted as 2)
        return 1, len(value)
    return len(value), sum(len(v) if isinstance(v, list) else len(v) // CHARS_PER_TOKEN + 1
                           for v in value)


def estimate(endpoint: str, data: dict, max_completion: int) -> tuple[int, int]:
    """(prompt tokens, total reservation) for a validated body: every prompt is its own
    generation of `n` sequences of up to `max_completion` tokens."""
    if endpoint == "chat":
        chars = sum(_content_chars(m.get("content")) + 16 for m in data["messages"])
        for extra in ("tools", "functions"):
            if data.get(extra):
                chars += len(orjson.dumps(data[extra]))
        prompts, prompt_tokens = 1, chars // CHARS_PER_TOKEN + 1
    else:
        prompts, prompt_tokens = _inputs(data["prompt" if endpoint == "completions" else "input"])
    if endpoint == "embeddings":
        return prompt_tokens, prompt_tokens
    return prompt_tokens, prompt_tokens + prompts * (data.get("n") or 1) * max_completion
