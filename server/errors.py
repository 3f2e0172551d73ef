"""Errors in OpenAI's format: every 4xx and 5xx the server sends is `{"error": {message, type, param, code}}`."""
from __future__ import annotations

import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("gorgon.server")

# the routes' error statuses, documented in /openapi.json
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 429, 503)}


class APIError(Exception):
    """An error the client caused (or may retry), sent as OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers
        self.info = ErrorInfo(message=message, type=type_, param=param, code=code)


def error_response(status: int, info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


def validation_error(e: RequestValidationError) -> APIError:
    """A 400 naming the first bad field of the body (its top-level name is `param`)."""
    errors = e.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if first["loc"][:1] != ("body",) or len(first["loc"]) < 2:  # missing, or not a JSON object
        return APIError(400, f"the body must be a JSON object: {first['msg']}")
    field = str(first["loc"][1])
    if first["type"] == "field_error":  # its message names the field
        return APIError(400, first["msg"], param=field)
    # one bad value can fail several ways (each member of a union such as `prompt`, or several fields of one
    # message): say them all, under the path they share
    related = [err for err in errors if err["loc"][1:2] == first["loc"][1:2]]
    paths = [[str(part) for part in err["loc"][1:]] for err in related]
    if len(related) == 1:
        if first["type"] == "extra_forbidden":
            return APIError(400, f"unknown field {'.'.join(paths[0])!r}: this server does not serve it", param=field)
        return APIError(400, f"{'.'.join(paths[0])}: {first['msg']}", param=field)
    shared = os.path.commonprefix(paths)
    reasons = [f"unknown field {'.'.join(path[len(shared):])!r}" if err["type"] == "extra_forbidden" else err["msg"]
               for err, path in zip(related, paths)]
    return APIError(400, f"{'.'.join(shared)}: {'; '.join(dict.fromkeys(reasons))}", param=field)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.info, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        return await _api_error(request, validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, ErrorInfo(message=str(e.detail), type="invalid_request_error"),
                              e.headers)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, ErrorInfo(message=internal_error_message(e), type="internal_error"))


def internal_error_message(e: Exception) -> str:
    """What a client reads of a failure gorgon did not foresee: its kind alone. Its text stays in the server's log:
    it may name the server's files, its settings or another request's data."""
    return f"internal error ({type(e).__name__}): the server's log has the details"
