"""The web console: the ask page (``/``) and the live dashboard (``/dashboard``), static files in ``static/``.

The pages hold no data, so they load without a key; with API keys configured they ask for one
and send it as a bearer token to the API, which still refuses requests without it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

#: Paths served without a key: the two pages and their assets.
PAGES = {"/": "ask.html", "/dashboard": "dashboard.html"}
STATIC_PREFIX = "/static/"


def is_console_path(path: str) -> bool:
    """Whether ``path`` is one of the console's pages or assets (served without a key)."""
    return path in PAGES or path.startswith(STATIC_PREFIX)


def _page(filename: str) -> Callable[[Request], Awaitable[Response]]:
    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / filename, media_type="text/html", headers={"Cache-Control": "no-cache"})

    return page


def console_routes() -> list[BaseRoute]:
    """``GET /``, ``GET /dashboard`` and ``/static``."""
    routes: list[BaseRoute] = [Route(path, _page(name), methods=["GET"]) for path, name in PAGES.items()]
    routes.append(Mount(STATIC_PREFIX.rstrip("/"), app=StaticFiles(directory=STATIC_DIR), name="static"))
    return routes
