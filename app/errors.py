"""OpenAI-shaped errors: every failure a client sees is {"error": {message, type, param, code}}."""

from __future__ import annotations

import orjson
from starlette.responses import Response


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}

    def response(self, extra_headers: dict[str, str] | None = None) -> Response:
        return error_response(self.status, self.message, self.type, self.code, self.param,
                              {**self.headers, **(extra_headers or {})})


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None):
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}})


def error_response(status: int, message: str, type_: str, code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message, type_, code, param), status_code=status,
                    media_type="application/json", headers=headers)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "authentication_error", "invalid_api_key",
                    headers={"www-authenticate": 'Bearer realm="llm-gateway"'})


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def draining() -> ApiError:
    """A new request while the host drains for a restart (SIGUSR1): nothing was done, so a
    retry is safe, and behind a load balancer it reaches another host."""
    return ApiError(503, "this host is draining for a restart and accepts no new requests; "
                    "retry the request", "service_unavailable", "gateway_draining",
                    headers={"retry-after": "5"})
