"""The web playground: `GET /` serves the page, `GET /static/<name>` its files (plain HTML, CSS and JS shipped
with the package: no build step, nothing fetched from elsewhere). The page itself is public, like a login page:
everything it shows comes from the API routes, which ask for the API key when the server has one. Its URLs are
relative to the page's own, so that it works behind a reverse proxy that serves it under a path prefix."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from server.errors import APIError

STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".png": "image/png",
               ".svg": "image/svg+xml"}

router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])  # HEAD: uptime checkers
async def index() -> FileResponse:
    return static_file("index.html")


@router.get("/favicon.ico")
async def favicon() -> Response:
    """No icon (browsers ask for one on every page load): an empty answer rather than a 404."""
    return Response(status_code=204)


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    return static_file(name)


def static_file(name: str) -> FileResponse:
    """A file of the static folder by its bare name (no folders, so nothing outside it can be named)."""
    path = STATIC_DIR / name
    media_type = MEDIA_TYPES.get(path.suffix)
    if "/" in name or "\\" in name or name.startswith(".") or media_type is None or not path.is_file():
        raise APIError(404, f"no such file: {name!r}", "not_found_error")
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})
