"""The OpenAI request and response shapes the gateway checks and documents.

Requests are validated with these models (strict types, so "stream": "yes" is a 400, not a
silent True) but forwarded as the client's own JSON: parameters the gateway does not know
(vLLM's extras such as top_k or guided_json) pass through untouched.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

_PASS_THROUGH = ConfigDict(extra="allow", strict=True)

# Bounds on what one request may ask for: each list item is work for the engine (a prompt is
# its own generation, an input its own embedding), and every item costs the gateway time to
# check before any budget is charged.
MAX_ITEMS = 2048
MAX_CHOICES = 16



def _whole_number(value):
    # JSON has one number type: 2.0 is an integer to JSON Schema (and to the OpenAPI document
    # clients read), so it is accepted as 2; 2.5, "2" and true are still refused
    # (only where a float holds integers exactly: beyond 2**53 it is a rounded stand-in)
    if type(value) is float and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


_WHOLE = BeforeValidator(_whole_number)  # after the bounds, or they vanish from the schema
Count = Annotated[int, Field(ge=1), _WHOLE]
INT64 = 2**63 - 1
MAX_TOKEN_ID = 2**31 - 1
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID), _WHOLE]],
                     Field(min_length=1)]
Inputs = (Annotated[str, Field(min_length=1)]
          | Annotated[list[Annotated[str, Field(min_length=1)]],
                      Field(min_length=1, max_length=MAX_ITEMS)]
          | TokenIds
          | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_ITEMS)])


class StreamOptions(BaseModel):
    model_config = _PASS_THROUGH
    include_usage: bool | None = None


class _Generation(BaseModel):
    model_config = _PASS_THROUGH
    model: str = Field(min_length=1, description="a model name from GET /v1/models")
    max_tokens: Count | None = Field(default=None, description="defaults to the model's cap")
    max_completion_tokens: Count | None = Field(
        default=None, description="the newer name of max_tokens (chat); capped the same")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES), _WHOLE] = 1
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: Annotated[int, Field(ge=-INT64 - 1, le=INT64), _WHOLE] | None = None


class CompletionRequest(_Generation):
    prompt: Inputs


class ChatMessage(BaseModel):
    model_config = _PASS_THROUGH
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_ITEMS)] | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_ITEMS)
    tools: Annotated[list[dict[str, Any]], Field(max_length=256)] | None = None
    functions: Annotated[list[dict[str, Any]], Field(max_length=256)] | None = None


class EmbeddingRequest(BaseModel):
    model_config = _PASS_THROUGH
    model: str = Field(min_length=1)
    input: Inputs
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Count | None = None


# ---- responses (documentation and schema checks; the gateway relays the backend's JSON)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class _Response(BaseModel):
    id: str
    object: str
    created: int
    model: str
    usage: Usage | None = None


class CompletionResponse(_Response):
    choices: list[dict[str, Any]]


class ChatCompletionResponse(_Response):
    choices: list[dict[str, Any]]


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[dict[str, Any]]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
