"""Checks every request passes before a route sees it: the API key, the body guard (JSON content type, size
limit, a browser's page of another origin) and the host guard (DNS rebinding of a local server)."""
from __future__ import annotations

import ipaddress
import json
import secrets

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_response
from server.protocol import ErrorInfo


async def require_api_key(request: Request) -> None:
    """A route dependency: with an API key configured, requests must send it as a bearer token."""
    api_key = request.app.state.server.config.api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), api_key.encode()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", "authentication_error",
                       code="invalid_api_key")


class BodyGuard:
    """ASGI middleware: a request with a body must say it is JSON and stay within `max_bytes`, and, sent by a web
    page, come from this server's own origin or one `cors_origins` allows. The body is read here, whole, and
    handed on; later receives (disconnect detection) go to the client as before."""

    def __init__(self, app: ASGIApp, max_bytes: int, cors_origins: list[str] | None = None) -> None:
        self.app, self.max_bytes, self.cors_origins = app, max_bytes, cors_origins or []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self._check_site(headers)
            body = await self._read(headers, receive)
        except APIError as e:
            await error_response(e.status, e.info)(scope, receive, send)
            return
        if body and not _media_type(headers):  # (JSON, _read found: said so, for FastAPI to read it)
            scope = dict(scope, headers=[*scope["headers"], (b"content-type", b"application/json")])
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _check_site(self, headers: dict[str, str]) -> None:
        """A browser says where a request comes from (Sec-Fetch-Site): a page of another site may post a JSON body
        with no content type, which asks for no CORS preflight, and so drive a server without an API key (load and
        unload adapters, spend its compute). Only the origins --cors-origins names may."""
        if headers.get("sec-fetch-site") not in ("cross-site", "same-site"):  # same-origin, a user's own, or no browser
            return
        if "*" not in self.cors_origins and headers.get("origin") not in self.cors_origins:
            raise APIError(403, f"a web page of another origin ({headers.get('origin', 'unknown')}) may not call this "
                                "server: allow it with --cors-origins", "permission_error", code="cross_origin")

    async def _read(self, headers: dict[str, str], receive: Receive) -> bytes:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise _too_large(self.max_bytes)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise APIError(400, "the client closed the connection while sending the body")
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                raise _too_large(self.max_bytes)
            if not message.get("more_body", False):
                break
        media_type = _media_type(headers)
        # (a JSON body without a content type is taken: clients such as requests.post(data=...) send none)
        if body and media_type != "application/json" and not media_type.endswith("+json") and not (
                media_type == "" and _is_json(body)):
            raise APIError(415, f"the body must be JSON, sent with 'Content-Type: application/json' "
                                f"(got {media_type or 'no content type'!r})", code="unsupported_media_type")
        return bytes(body)


class HostGuard:
    """ASGI middleware for a server listening on a loopback address without an API key: it answers only requests
    addressed to a loopback name (the Host header: localhost, *.localhost, 127.0.0.0/8, ::1). A web page whose
    domain its attacker rebinds to 127.0.0.1 (DNS rebinding) is of the same origin as this server to the browser,
    which then lets it read the answers, but its requests still name its own domain."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            if not is_loopback(_host_name(host)):
                await error_response(403, ErrorInfo(
                    message=f"this server listens on a loopback address and answers only requests to a loopback "
                            f"name, not to {host or 'no host'!r} (behind a proxy, send 'Host: localhost'; or "
                            f"start it with --api-key)", type="permission_error", code="host_not_allowed"),
                )(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    """Whether a host name or address names this machine's loopback interface."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host: str) -> str:
    """The name of a Host header, without its port (IPv6 addresses in brackets)."""
    if host.startswith("["):
        return host[1:host.find("]")]
    return host.rpartition(":")[0] if ":" in host else host


# (form-encoded bodies, as curl -d sends them without -H, stay a 415: a browser posts those cross-site without a
# CORS preflight, so any web page could drive a server that took them)
def _media_type(headers: dict[str, str]) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(body: bytearray) -> bool:
    try:
        json.loads(body)
    except (ValueError, RecursionError):  # (RecursionError: nested too deep to be a request's)
        return False
    return True


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
