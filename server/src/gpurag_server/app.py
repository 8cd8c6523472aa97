"""The Starlette app: routes, lifespan, bearer auth, body limits. `create_app(settings)` builds one."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gpurag.errors import GpuragError
from gpurag_server.console import console_routes, is_console_path
from gpurag_server.head import HeadNode
from gpurag_server.nodes.base import NodeState
from gpurag_server.queueing import PendingItem, Reply
from gpurag_server.schemas import (
    EmbeddingsRequest,
    FieldProblem,
    RagRequest,
    RequestInvalidError,
    SearchRequest,
    finite_vectors,
    openapi_schema,
    parse,
)
from gpurag_server.settings import ServerSettings
from gpurag_server.workload import WorkItem

#: Routes that never ask for a key.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def sse_event(event: str, data: Any) -> bytes:
    """One server-sent event: its name and its JSON data."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def error_response(status: int, kind: str, message: str, problems: list[FieldProblem] | None = None) -> Response:
    """The JSON error body every 4xx/5xx carries."""
    errors = [p.model_dump() for p in problems or []]
    return _json(status, {"error": {"type": kind, "message": message, "errors": errors}})


class _Limits:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings

    def query(self, text: str, field: str) -> FieldProblem | None:
        if not text.strip():
            return FieldProblem(field=field, problem="is empty; expected a non-empty string")
        if len(text) > self.settings.max_query_chars:
            return FieldProblem(
                field=field, problem=f"has {len(text)} characters; at most {self.settings.max_query_chars} are accepted"
            )
        return None

    def k(self, k: int | None) -> FieldProblem | None:
        if k is not None and not 1 <= k <= self.settings.max_k:
            return FieldProblem(field="k", problem=f"must be between 1 and {self.settings.max_k}; got {k}")
        return None

    def count(self, count: int, field: str) -> FieldProblem | None:
        if count == 0:
            return FieldProblem(field=field, problem="is empty; expected at least one item")
        if count > self.settings.max_texts:
            return FieldProblem(
                field=field, problem=f"holds {count} items; at most {self.settings.max_texts} are accepted"
            )
        return None


def _raise_if(*problems: FieldProblem | None) -> None:
    found = [p for p in problems if p is not None]
    if found:
        raise RequestInvalidError(found)


def create_app(settings: ServerSettings | None = None) -> Starlette:
    """The server's ASGI app; its lifespan starts the head node and stops it."""
    settings = settings or ServerSettings()
    limits = _Limits(settings)
    head_ref: dict[str, HeadNode] = {}

    def head() -> HeadNode:
        return head_ref["head"]

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise _BodyTooLargeError(int(declared))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise _BodyTooLargeError(size)
            chunks.append(chunk)
        return b"".join(chunks)

    def endpoint(
        route: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        histogram = head_metrics_latency = None  # resolved on first call (the head exists only after startup)

        async def wrapped(request: Request) -> Response:
            nonlocal histogram, head_metrics_latency
            started = time.perf_counter()
            try:
                response = await handler(request)
            except _ReplyError as exc:
                response = exc.response
            except RequestInvalidError as exc:
                response = error_response(exc.status, "invalid_request", str(exc), exc.problems)
            except _BodyTooLargeError as exc:
                response = error_response(
                    413,
                    "payload_too_large",
                    f"the body has {exc.size} bytes; at most {settings.max_body_bytes} are accepted",
                    [FieldProblem(field="body", problem=f"exceeds max_body_bytes={settings.max_body_bytes}")],
                )
            server = head()
            if histogram is None:
                histogram = server.metrics.latency.labels(route)
            histogram.observe(time.perf_counter() - started)
            server.metrics.requests.labels(route, str(response.status_code)).inc()
            server.count(response.status_code)
            return response

        return wrapped

    def reply_error(reply: Reply | None) -> Response | None:
        if reply is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        if reply.status == 200:
            return None
        response = error_response(reply.status, reply.error_type, reply.message)
        if reply.status == 503 and reply.error_type == "overloaded":
            response.headers["Retry-After"] = str(settings.retry_after_s)
        return response

    async def run(request: Request, kind: str, payload: dict[str, Any]) -> tuple[Reply, dict[str, Any]]:
        """Submit one work item; its reply and the node's value, or `_ReplyError` carrying the error response."""
        reply = await head().submit(WorkItem(kind, payload), request.receive)
        failed = reply_error(reply)
        if failed is not None:
            raise _ReplyError(failed)
        assert reply is not None
        assert reply.outcome is not None
        assert reply.outcome.value is not None
        return reply, reply.outcome.value

    async def parse_rag(request: Request) -> RagRequest:
        body = parse(RagRequest, await read_body(request))
        _raise_if(limits.query(body.query, "query"), limits.k(body.k))
        return body

    def rag_body(body: RagRequest, reply: Reply, value: dict[str, Any], total: float) -> dict[str, Any]:
        timings = {"queue_wait_s": reply.queue_wait_s, "compute_s": value["compute_s"], "total_s": total}
        timings.update(value["timings"])
        return {
            "query": body.query,
            "answer": value["answer"],
            "sources": value["sources"],
            "timings": timings,
            "node": reply.node,
            "batch_size": reply.batch_size,
        }

    async def rag_v1(request: Request) -> Response:
        started = time.monotonic()
        body = await parse_rag(request)
        if body.stream:
            return rag_stream(body, started)
        reply, value = await run(request, "rag", {"query": body.query, "k": body.k})
        return _json(200, rag_body(body, reply, value, time.monotonic() - started))

    def rag_stream(body: RagRequest, started: float) -> Response:
        """Queue the request with a text sink and answer with its server-sent events (`sse_answer`)."""
        texts: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
        item = WorkItem("rag", {"query": body.query, "k": body.k, "stream": True})
        queued = head().enqueue(item, on_text=lambda text, reset: texts.put_nowait((text, reset)))
        if isinstance(queued, Reply):  # refused before anything was streamed: a plain error response
            failed = reply_error(queued)
            assert failed is not None
            return failed
        return StreamingResponse(
            sse_answer(body, queued, texts, started),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def sse_answer(
        body: RagRequest, pending: PendingItem, texts: asyncio.Queue[tuple[str, bool]], started: float
    ) -> AsyncIterator[bytes]:
        """``token`` (and ``reset``) events as the node generates, then ``done`` or ``error``.

        A client that goes away cancels this generator: its request is abandoned (dropped if
        still queued, its answer ignored if running); the batch it is in goes on for the others.
        """
        reply_task = asyncio.ensure_future(head().wait(pending))
        streamed = False
        try:
            while not reply_task.done() or not texts.empty():
                if texts.empty():
                    next_text = asyncio.ensure_future(texts.get())
                    await asyncio.wait({next_text, reply_task}, return_when=asyncio.FIRST_COMPLETED)
                    if not next_text.done():
                        next_text.cancel()
                        continue
                    text, reset = next_text.result()
                else:
                    text, reset = texts.get_nowait()
                streamed = True
                yield sse_event("reset" if reset else "token", {"text": text})
            reply = reply_task.result()
            if reply is None or reply.status != 200:
                failed = reply_error(reply)
                status = failed.status_code if failed is not None else 500
                error = orjson.loads(failed.body) if failed is not None else {"error": {"type": "internal"}}
                yield sse_event("error", {**error, "status": status})
                return
            assert reply.outcome is not None
            assert reply.outcome.value is not None
            value = reply.outcome.value
            if not streamed and value["answer"]:  # a node that cannot stream (ray): the answer in one piece
                yield sse_event("token", {"text": value["answer"]})
            yield sse_event("done", rag_body(body, reply, value, time.monotonic() - started))
        finally:
            reply_task.cancel()

    async def rag_seed(request: Request) -> Response:
        body = await parse_rag(request)
        if body.stream:
            raise RequestInvalidError([FieldProblem(field="stream", problem="is supported on /v1/rag only")])
        _, value = await run(request, "rag", {"query": body.query, "k": body.k})
        return _json(200, {"query": body.query, "result": value["answer"]})

    async def search(request: Request) -> Response:
        body = parse(SearchRequest, await read_body(request))
        if (body.texts is None) == (body.vectors is None):
            raise RequestInvalidError(
                [FieldProblem(field="texts", problem="or vectors must be given, not both nor neither")]
            )
        _raise_if(limits.k(body.k))
        k = body.k if body.k is not None else 10
        if body.texts is not None:
            _raise_if(
                limits.count(len(body.texts), "texts"),
                *(limits.query(t, f"texts.{i}") for i, t in enumerate(body.texts)),
            )
            payload: dict[str, Any] = {"texts": body.texts, "k": k}
        else:
            assert body.vectors is not None
            _raise_if(limits.count(len(body.vectors), "vectors"))
            info = head().pool.info
            finite_vectors(body.vectors, info.dim if info is not None else None)
            payload = {"vectors": body.vectors, "k": k}
        _, value = await run(request, "search", payload)
        return _json(200, {"results": value["results"]})

    async def embeddings(request: Request) -> Response:
        body = parse(EmbeddingsRequest, await read_body(request))
        texts = [body.input] if isinstance(body.input, str) else body.input
        _raise_if(limits.count(len(texts), "input"), *(limits.query(t, f"input.{i}") for i, t in enumerate(texts)))
        info = head().pool.info
        if body.dimensions is not None and not 1 <= body.dimensions <= (info.dim if info and info.dim else 1 << 16):
            raise RequestInvalidError(
                [
                    FieldProblem(
                        field="dimensions",
                        problem=f"must be between 1 and the model's {info.dim if info else '?'}; got {body.dimensions}",
                    )
                ]
            )
        payload = {"input": texts, "dimensions": body.dimensions, "encoding_format": body.encoding_format}
        _, value = await run(request, "embed", payload)
        tokens = sum(len(t.split()) for t in texts)
        data = [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(value["embeddings"])]
        return _json(
            200,
            {
                "object": "list",
                "data": data,
                "model": value["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    async def healthz(request: Request) -> Response:
        return _json(200, {"status": "ok"})

    async def readyz(request: Request) -> Response:
        pool = head().pool
        if pool.ready:
            return _json(200, {"ready": True, "nodes": pool.count(NodeState.READY)})
        return error_response(503, "not_ready", pool.last_error or "no compute node is ready yet")

    async def metrics(request: Request) -> Response:
        head().refresh_gauges()
        return Response(head().metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def status(request: Request) -> Response:
        return _json(200, head().status().model_dump())

    async def openapi(request: Request) -> Response:
        return _json(200, openapi_schema())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server = HeadNode(settings)
        head_ref["head"] = server
        app.state.head = server
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    routes = [
        Route("/v1/rag", endpoint("/v1/rag", rag_v1), methods=["POST"]),
        Route("/rag", endpoint("/rag", rag_seed), methods=["POST"]),
        Route("/v1/search", endpoint("/v1/search", search), methods=["POST"]),
        Route("/v1/embeddings", endpoint("/v1/embeddings", embeddings), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    routes_and_console = [*routes, *console_routes()]  # the web console: `/`, `/dashboard`, `/static` (issue 19)
    app = Starlette(routes=routes_and_console, lifespan=lifespan)
    if settings.api_keys:
        return _BearerAuth(app, settings.api_keys)  # type: ignore[return-value]
    return app


class _ReplyError(GpuragError):
    """The head node answered a request with an error (503, 504, 500): ``response`` says which."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class _BodyTooLargeError(GpuragError):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class _BearerAuth:
    """Pure-ASGI check of ``Authorization: Bearer <key>`` on every route but health."""

    def __init__(self, app: Starlette, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [f"Bearer {key}".encode() for key in keys]
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not is_console_path(scope["path"]):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not any(hmac.compare_digest(given, key) for key in self.keys):
                response = error_response(
                    401, "unauthorized", "a valid 'Authorization: Bearer <key>' header is required"
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
