"""Operations: /health (is the engine running; /ping too, as vLLM and SageMaker's probes call it), /metrics
(Prometheus) and /version, which need no API key; and /openapi.json, the API's document, which does."""
from __future__ import annotations

from importlib.metadata import version

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from server.errors import error_response
from server.guards import require_api_key
from server.protocol import ErrorInfo, ErrorResponse
from server.state import State

router = APIRouter()


class Health(BaseModel):
    status: str


class Version(BaseModel):
    version: str


@router.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
@router.head("/health", include_in_schema=False)
@router.api_route("/ping", methods=["GET", "POST"], include_in_schema=False)
async def health(state: State) -> JSONResponse:
    if not state.engine.is_running:
        failure = state.engine.failure
        message = f"the engine is down: {failure}" if failure else "the engine is not running"
        return error_response(503, ErrorInfo(message=message, type="service_unavailable"))
    return JSONResponse({"status": "ok"})


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/version", response_model=Version)
async def gorgon_version() -> Version:
    return Version(version=version("gorgon"))


@router.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_api_key)])
async def openapi_document(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())
