"""The HTTP contract against a real uvicorn on loopback: answers, every bad input, limits, auth, overload."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import RunningServer, post_many, serving


@pytest.fixture(scope="module")
def server(small_corpus: Path) -> Iterator[RunningServer]:
    with serving(
        corpus=small_corpus, embedder="hashing", nodes=2, max_k=20, max_query_chars=200, max_texts=4
    ) as running:
        yield running


def test_v1_rag_answers_with_sources_and_timings(server: RunningServer) -> None:
    response = httpx.post(f"{server.url}/v1/rag", json={"query": "What does the with statement do?", "k": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] == "What does the with statement do?"
    assert "with" in body["answer"].lower()
    assert len(body["sources"]) == 2
    assert all(s["source"].startswith("pydoc:") for s in body["sources"])
    assert body["sources"][0]["score"] >= body["sources"][1]["score"]
    timings = body["timings"]
    assert 0 <= timings["queue_wait_s"] <= timings["total_s"]
    assert {"compute_s", "embed_s", "search_s", "generate_s"} <= set(timings)
    assert body["node"].startswith("local-")
    assert body["batch_size"] >= 1


def test_the_seeds_rag_route_keeps_its_shape(server: RunningServer) -> None:
    response = httpx.post(f"{server.url}/rag", json={"query": "try statement", "k": 1})
    assert response.status_code == 200
    assert set(response.json()) == {"query", "result"}
    assert response.json()["result"]


def test_concurrent_requests_are_batched_and_all_answered(server: RunningServer) -> None:
    bodies = [{"query": f"exceptions and the try statement {i}", "k": 3} for i in range(48)]
    responses = asyncio.run(post_many(server.url, bodies))
    assert [r.status_code for r in responses] == [200] * 48
    assert [r.json()["query"] for r in responses] == [b["query"] for b in bodies]
    assert max(r.json()["batch_size"] for r in responses) > 1


def test_search_by_text_and_by_vector_agree(server: RunningServer) -> None:
    from gpurag.rag.embedders import get_embedder

    by_text = httpx.post(f"{server.url}/v1/search", json={"texts": ["for loop", "class definition"], "k": 3}).json()
    vectors = get_embedder("hashing").embed_batch(["for loop", "class definition"]).tolist()
    by_vector = httpx.post(f"{server.url}/v1/search", json={"vectors": vectors, "k": 3}).json()
    assert len(by_text["results"]) == 2
    assert [r["ids"] for r in by_text["results"]] == [r["ids"] for r in by_vector["results"]]
    assert all(len(r["texts"]) == 3 for r in by_text["results"])


def test_embeddings_have_openais_shape(server: RunningServer) -> None:
    body = httpx.post(f"{server.url}/v1/embeddings", json={"input": ["a for loop", "a class"], "model": "any"}).json()
    assert body["object"] == "list"
    assert body["model"] == "hashing"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert len(body["data"][0]["embedding"]) == 256
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    one = httpx.post(
        f"{server.url}/v1/embeddings", json={"input": "x", "encoding_format": "base64", "dimensions": 8}
    ).json()
    assert isinstance(one["data"][0]["embedding"], str)


BAD_INPUTS: list[tuple[str, Any, int, str, str]] = [
    ("/v1/rag", b"{not json", 400, "body", "not valid JSON"),
    ("/v1/rag", b"", 422, "body", "empty"),
    ("/v1/rag", b"[1, 2]", 422, "body", "should be an object"),
    ("/v1/rag", {"k": 3}, 422, "query", "required"),
    ("/v1/rag", {"query": 5}, 422, "query", "valid string"),
    ("/v1/rag", {"query": "ok", "k": "3"}, 422, "k", "valid integer"),
    ("/v1/rag", {"query": "ok", "k": 2.5}, 422, "k", "valid integer"),
    ("/v1/rag", {"query": "   "}, 422, "query", "empty"),
    ("/v1/rag", {"query": "x" * 201}, 422, "query", "at most 200"),
    ("/v1/rag", {"query": "ok", "k": 0}, 422, "k", "between 1 and 20"),
    ("/v1/rag", {"query": "ok", "k": 21}, 422, "k", "between 1 and 20"),
    ("/v1/rag", {"query": "ok", "colour": "red"}, 422, "colour", "not a known field"),
    ("/rag", {"query": ""}, 422, "query", "empty"),
    ("/v1/search", {"k": 3}, 422, "texts", "or vectors must be given"),
    ("/v1/search", {"texts": ["a"], "vectors": [[1.0]]}, 422, "texts", "not both"),
    ("/v1/search", {"texts": []}, 422, "texts", "empty"),
    ("/v1/search", {"texts": ["a"] * 5}, 422, "texts", "at most 4"),
    ("/v1/search", {"vectors": [[0.5] * 3]}, 422, "vectors.0", "dimension 3; expected 256"),
    ("/v1/search", b'{"vectors": [[NaN' + b", 0.0" * 255 + b"]]}", 422, "vectors.0", "NaN"),
    ("/v1/search", {"vectors": [["a"] * 256]}, 422, "vectors.0.0", "valid number"),
    ("/v1/embeddings", {"input": []}, 422, "input", "empty"),
    ("/v1/embeddings", {"input": "ok", "encoding_format": "int8"}, 422, "encoding_format", "float"),
    ("/v1/embeddings", {"input": "ok", "dimensions": 999}, 422, "dimensions", "between 1 and"),
]


@pytest.mark.parametrize(("route", "body", "status", "field", "problem"), BAD_INPUTS)
def test_bad_input_is_a_4xx_naming_the_field_and_nothing_reaches_a_node(
    server: RunningServer, route: str, body: Any, status: int, field: str, problem: str
) -> None:
    done_before = sum(n.items_done for n in server.head.pool.nodes)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}{route}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert any(e["field"] == field and problem in e["problem"] for e in error["errors"]), error
    assert sum(n.items_done for n in server.head.pool.nodes) == done_before
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_a_body_over_the_limit_is_413(small_corpus: Path) -> None:
    with serving(corpus=small_corpus, embedder="hashing", max_body_bytes=100) as running:
        response = httpx.post(f"{running.url}/v1/rag", json={"query": "x" * 200})
        assert response.status_code == 413
        assert response.json()["error"]["errors"][0]["field"] == "body"


def test_status_metrics_openapi_and_health(server: RunningServer) -> None:
    httpx.post(f"{server.url}/v1/rag", json={"query": "while loop"})
    status = httpx.get(f"{server.url}/v1/status").json()
    assert status["version"] == 1
    assert status["ready"] is True
    assert [n["state"] for n in status["nodes"]] == ["ready", "ready"]
    assert status["queue"]["capacity"] == 1024
    assert int(status["requests"]["200"]) >= 1
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in (
        "gpurag_queue_length",
        "gpurag_batch_size_bucket",
        "gpurag_batch_fill_ratio_bucket",
        "gpurag_queue_wait_seconds_bucket",
        "gpurag_compute_seconds_bucket",
        "gpurag_request_duration_seconds_bucket",
        'gpurag_requests_total{route="/v1/rag",status="200"}',
        'gpurag_nodes{state="ready"} 2.0',
    ):
        assert name in metrics, name
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/rag", "/rag", "/v1/search", "/v1/embeddings", "/v1/status"} <= set(spec["paths"])
    assert "RagResponse" in spec["components"]["schemas"]
    assert "StatusResponse" in spec["components"]["schemas"]
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_bearer_keys_guard_every_route_but_health(small_corpus: Path) -> None:
    with serving(corpus=small_corpus, embedder="hashing", api_keys=("s3cret",)) as running:
        for route in ("/v1/status", "/metrics", "/openapi.json"):
            assert httpx.get(f"{running.url}{route}").status_code == 401
        denied = httpx.post(f"{running.url}/v1/rag", json={"query": "x"}, headers={"Authorization": "Bearer wrong"})
        assert denied.status_code == 401
        assert denied.json()["error"]["type"] == "unauthorized"
        allowed = httpx.post(f"{running.url}/v1/rag", json={"query": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code == 200
        assert httpx.get(f"{running.url}/healthz").status_code == 200
        assert httpx.get(f"{running.url}/readyz").status_code == 200


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing() -> None:
    with serving(
        workload="sleep", sleep_per_batch_s=0.2, max_queue_length=4, max_batch_size=2, retry_after_s=3
    ) as running:
        responses = asyncio.run(post_many(running.url, [{"query": f"q{i}"} for i in range(30)]))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}
        assert codes.count(503) > 0
        assert codes.count(200) >= 4
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["Retry-After"] == "3"
        assert refused.json()["error"]["type"] == "overloaded"


def test_a_request_past_its_deadline_is_504() -> None:
    with serving(workload="sleep", sleep_per_batch_s=0.5, request_timeout_s=0.2) as running:
        response = httpx.post(f"{running.url}/v1/rag", json={"query": "slow"})
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "deadline_exceeded"


def test_a_disconnected_clients_request_is_dropped_before_dispatch() -> None:
    with serving(workload="sleep", sleep_per_batch_s=0.3, max_batch_size=1) as running:

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=running.url, timeout=10) as http:
                blockers = [asyncio.create_task(http.post("/v1/rag", json={"query": f"b{i}"})) for i in range(2)]
                await asyncio.sleep(0.1)  # both node slots are busy now
                gone = asyncio.create_task(http.post("/v1/rag", json={"query": "gone"}))
                await asyncio.sleep(0.1)
                gone.cancel()  # the client closes its connection while the request waits in the queue
                await asyncio.gather(*blockers)
                await asyncio.sleep(0.5)

        asyncio.run(scenario())
        status = httpx.get(f"{running.url}/v1/status").json()
        assert sum(n["items_done"] for n in status["nodes"]) == 2
        assert 'gpurag_rejects_total{reason="client_gone"} 1.0' in httpx.get(f"{running.url}/metrics").text


def test_readyz_is_503_without_a_ready_node_and_requests_wait_for_one_until_their_deadline() -> None:
    with serving(wait_ready=False, workload="zero", nodes=0, request_timeout_s=0.3) as running:
        response = httpx.get(f"{running.url}/readyz")
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "not_ready"
        assert httpx.get(f"{running.url}/healthz").status_code == 200
        assert httpx.post(f"{running.url}/v1/rag", json={"query": "anyone?"}).status_code == 504
