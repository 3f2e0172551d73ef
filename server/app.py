"""The FastAPI app: OpenAI routes, vLLM's adapter routes, health and metrics over one engine, whose step loop
runs from startup to shutdown."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from engine import LLM
from server import adapter_routes, openai_routes, ops_routes, playground, responses_api
from server.async_engine import AsyncEngine
from server.errors import install_error_handlers
from server.guards import BodyGuard, HostGuard
from server.metrics import ServerMetrics
from server.protocol import ChatCompletionChunk
from server.state import ServerConfig, ServerState

__all__ = ["Server", "ServerConfig", "create_app"]

# at shutdown, the time after --shutdown-timeout that the requests' errors have to reach their clients before
# uvicorn cancels what is left
ERROR_FLUSH_S = 2.0


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    """An app serving `llm`."""
    metrics = ServerMetrics(llm)
    engine = AsyncEngine(llm, metrics, config.max_waiting_requests)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        await engine.stop()

    # /openapi.json is ours (ops_routes), behind the API key like the routes it describes; no /docs or /redoc
    # (their pages load scripts from a CDN, and were open to anyone)
    app = FastAPI(title="gorgon", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.server = ServerState(llm, engine, metrics, config)
    install_error_handlers(app)
    app.add_middleware(BodyGuard, max_bytes=config.max_request_bytes, cors_origins=config.cors_origins)
    if config.loopback_hosts_only:
        app.add_middleware(HostGuard)
    if config.cors_origins:  # added last, so outermost: preflight requests and error responses get its headers
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    for module in (openai_routes, responses_api, adapter_routes, ops_routes, playground):  # playground: page at /
        app.include_router(module.router)
    app.openapi = lambda: openapi(app)
    return app


class Server(uvicorn.Server):
    """uvicorn's server of one create_app app. At shutdown it waits `shutdown_timeout` seconds for the requests in
    flight, then ends those still running with the API's error (a 503 body; in a stream, an error event and
    [DONE]) rather than have uvicorn cancel them (a bare 500, a stream cut without [DONE])."""

    def __init__(self, app: FastAPI, shutdown_timeout: float, **config) -> None:
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=shutdown_timeout + ERROR_FLUSH_S, **config))
        self.engine: AsyncEngine = app.state.server.engine
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets=None) -> None:
        asyncio.get_running_loop().call_later(self.shutdown_timeout, self.engine.end_requests,
                                              "the server is shutting down: the request outlasted its shutdown time")
        await super().shutdown(sockets)


def openapi(app: FastAPI) -> dict:
    """FastAPI's document, told what this server really sends: errors are JSON ErrorResponse bodies on every
    route (never FastAPI's 422), and streamed chat chunks have a schema (no route returns one as JSON, so
    FastAPI leaves it out, though the chat route's text/event-stream response refers to it)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(ChatCompletionChunk, "serialization")],
                                     ref_template="#/components/schemas/{model}")
        schemas = schema["components"]["schemas"]
        for name, definition in defs["$defs"].items():
            schemas.setdefault(name, definition)
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            operation["responses"].pop("422", None)
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    response["content"] = error
        app.openapi_schema = schema
    return app.openapi_schema
