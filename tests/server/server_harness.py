"""A real uvicorn on loopback for the server tests, and a client helper."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from gpurag_server.app import create_app
from gpurag_server.settings import ServerSettings


class RunningServer:
    """A uvicorn serving `create_app(settings)` in a thread; ``url`` is its loopback address."""

    def __init__(self, settings: ServerSettings) -> None:
        self.app = create_app(settings)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=0, loop="uvloop", http="httptools", log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    @property
    def head(self) -> Any:
        return self.app.state.head

    def start(self, wait_ready: bool = True) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        if wait_ready:
            while httpx.get(f"{self.url}/readyz").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("no node became ready")
                time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextmanager
def serving(wait_ready: bool = True, **overrides: Any) -> Iterator[RunningServer]:
    """Run a server with ``ServerSettings(port=0, **overrides)`` for the block."""
    running = RunningServer(ServerSettings(port=0, **overrides))
    running.start(wait_ready)
    try:
        yield running
    finally:
        running.stop()


async def post_many(
    url: str, bodies: list[dict[str, Any]], route: str = "/v1/rag", **client: Any
) -> list[httpx.Response]:
    """POST every body at once from one client; return the responses in order."""
    limits = httpx.Limits(max_connections=len(bodies) + 1, max_keepalive_connections=len(bodies) + 1)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, **client) as http:
        return list(await asyncio.gather(*(http.post(route, json=body) for body in bodies)))
