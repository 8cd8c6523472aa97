"""The console's pages and assets over HTTP (no browser): served from the package, open without a key."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from server_harness import RunningServer, serving

from gpurag_server.console import STATIC_DIR

KEY = "routes-test-key"


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serving(workload="zero", api_keys=(KEY,)) as running:
        yield running


@pytest.mark.parametrize(("path", "script"), [("/", "static/ask.js"), ("/dashboard", "static/dashboard.js")])
def test_the_pages_load_without_a_key(server: RunningServer, path: str, script: str) -> None:
    response = httpx.get(f"{server.url}{path}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert f'src="{script}"' in response.text


def test_every_asset_a_page_names_is_served_with_its_type(server: RunningServer) -> None:
    types = {".js": "javascript", ".css": "text/css", ".html": "text/html"}
    names = sorted(p.name for p in STATIC_DIR.iterdir())
    assert {"ask.html", "dashboard.html", "console.js", "charts.js", "prometheus.js", "console.css"} <= set(names)
    for name in names:
        response = httpx.get(f"{server.url}/static/{name}")
        assert response.status_code == 200, name
        assert types[name[name.rindex(".") :]] in response.headers["content-type"], name
        assert response.content == (STATIC_DIR / name).read_bytes()


def test_no_page_loads_anything_from_another_origin() -> None:
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), path.name
        assert "https://" not in text, path.name
        assert "//cdn" not in text, path.name


def test_the_api_still_refuses_requests_without_the_key(server: RunningServer) -> None:
    for path in ["/v1/status", "/metrics", "/openapi.json"]:
        assert httpx.get(f"{server.url}{path}").status_code == 401, path
        assert httpx.get(f"{server.url}{path}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
    refused = httpx.post(f"{server.url}/v1/rag", json={"query": "q"})
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "unauthorized"


@pytest.mark.parametrize("path", ["/static/../app.py", "/static/%2e%2e/app.py", "/static/missing.js", "/dashboard/x"])
def test_nothing_outside_the_static_folder_is_served(server: RunningServer, path: str) -> None:
    response = httpx.get(f"{server.url}{path}")
    assert response.status_code in (401, 404), response.status_code
    assert "create_app" not in response.text
