"""Assembly and lifecycle: `app.main:app` is the ASGI app, configured from GATEWAY_CONFIG."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException

from app import health, routes, schemas
from app.config import GatewayConfig, config_path_from_env, load_config
from app.errors import error_response
from app.health import HealthMonitor
from app.state import Gateway

log = logging.getLogger("gateway")

_HTTP_TYPES = {404: "not_found_error", 405: "invalid_request_error"}


def create_app(config: GatewayConfig | None = None) -> FastAPI:
    """The gateway app; without `config`, the file named by GATEWAY_CONFIG is read now so a
    bad file stops the process before it listens."""
    config = config or load_config(config_path_from_env())
    gw = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        await monitor.start()
        log.info("gateway started with models %s", [m.name for m in config.models])
        yield
        await monitor.stop()
        await gw.stop()

    # no slash redirects: they would send clients to a URL built from their own Host header
    app = FastAPI(title="LLM gateway", version="0.1.0", lifespan=lifespan, docs_url=None,
                  redoc_url=None, summary="OpenAI-compatible front door to vLLM",
                  redirect_slashes=False)
    app.state.gw = gw
    app.state.health = monitor = HealthMonitor(gw)
    app.include_router(routes.router)
    app.include_router(health.router)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = (f"no endpoint at {request.method} {request.url.path}: the API is "
                       "/v1/completions, /v1/chat/completions, /v1/embeddings and /v1/models")
        return error_response(exc.status_code, message,
                              _HTTP_TYPES.get(exc.status_code, "invalid_request_error"),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, "invalid request", "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal error", "api_error", "internal_error")

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes,
                               summary=app.summary)
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            for cls in [*routes.REQUEST_MODELS, schemas.ErrorResponse]:
                schema = cls.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[cls.__name__] = schema
            _document_models(components, config)
            spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in spec["paths"].items():
                if path.startswith("/v1/"):
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    return app


class FastPath:
    """The ASGI app served: POSTs to the OpenAI endpoints go straight to their handler.

    They skip the framework's middleware stack and router, which cost more CPU per request
    than the gateway's own work (profiled under load); `routes.proxy` already answers every
    error itself. Everything else (/v1/models, health, metrics, OpenAPI, 404s) is the
    FastAPI app's, as is the lifespan.
    """

    def __init__(self, app: FastAPI):
        self.app = app
        self.paths = routes.fast_paths()

    async def __call__(self, scope, receive, send) -> None:
        endpoint = self.paths.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app  # request.app.state, as under the router
        request = Request(scope, receive, send)
        response = await routes.proxy(request, endpoint)
        await response(scope, receive, send)


def _document_models(components: dict, config: GatewayConfig) -> None:
    """Put the declared model names and caps into the request schemas, so /openapi.json tells
    clients (and schemathesis) what exists and what each model accepts."""
    by_task = {t: [m for m in config.models if m.task == t] for t in ("generate", "embed")}
    for cls, task in ((schemas.CompletionRequest, "generate"),
                      (schemas.ChatCompletionRequest, "generate"),
                      (schemas.EmbeddingRequest, "embed")):
        schema, models = components[cls.__name__], by_task[task]
        if not models:
            continue
        schema["properties"]["model"]["enum"] = [m.name for m in models]
        if task != "generate":
            continue
        top = max(m.max_tokens for m in models)
        for field in ("max_tokens", "max_completion_tokens"):
            schema["properties"][field]["anyOf"][0]["maximum"] = top
        # a model with a lower cap than the top one says so for its own name
        schema["allOf"] = [{
            "if": {"properties": {"model": {"const": m.name}}, "required": ["model"]},
            "then": {"properties": {f: {"anyOf": [{"type": "integer", "maximum": m.max_tokens},
                                                  {"type": "null"}]}
                                    for f in ("max_tokens", "max_completion_tokens")}},
        } for m in models if m.max_tokens < top]
        if not schema["allOf"]:
            del schema["allOf"]


def __getattr__(name: str):
    # `app.main:app` builds the app on first use, so importing this module has no side effect
    if name == "app":
        globals()["app"] = application = create_app()
        return application
    raise AttributeError(name)
