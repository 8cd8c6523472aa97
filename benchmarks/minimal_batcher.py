"""The anchor for the head node's cost: a minimal Starlette + asyncio batcher (8 requests or 0.1 s).

Zero-cost work, no validation, no metrics, no ledger: the ceiling gpurag's head node is measured
against in `serve_report.py`. Run: uvicorn benchmarks.minimal_batcher:app --loop uvloop --http httptools
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[str]]] = asyncio.Queue(maxsize=1024)


async def batcher(max_batch_size: int = 8, max_wait_s: float = 0.1) -> None:
    loop = asyncio.get_running_loop()
    while True:
        batch = [await queue.get()]
        deadline = loop.time() + max_wait_s
        while len(batch) < max_batch_size:
            if not queue.empty():  # take what is there without a timer
                batch.append(queue.get_nowait())
                continue
            if (left := deadline - loop.time()) <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
        for payload, future in batch:  # the zero-cost "model"
            if not future.done():
                future.set_result(str(payload.get("query", "")))


async def rag(request: Request) -> Response:
    payload = orjson.loads(await request.body())
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    await queue.put((payload, future))
    return Response(orjson.dumps({"query": payload["query"], "answer": await future}), media_type="application/json")


@asynccontextmanager
async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
    task = asyncio.create_task(batcher())
    yield
    task.cancel()


app = Starlette(routes=[Route("/v1/rag", rag, methods=["POST"])], lifespan=lifespan)
