"""Scripted nodes and a provider for them: unit tests of the batcher, pool and autoscaler without HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from gpurag_server.batcher import Batcher
from gpurag_server.dispatch import RoundRobin
from gpurag_server.metrics import ServerMetrics
from gpurag_server.nodes.base import BatchFailedError, Node, NodeDiedError, NodeProvider, NodeState
from gpurag_server.pool import NodePool
from gpurag_server.queueing import PendingItem, RequestQueue
from gpurag_server.settings import ServerSettings
from gpurag_server.workload import Outcome, WorkItem, WorkloadInfo


class ScriptedNode(Node):
    """Answers ``{"echo": query}``; a batch holding a query "bad" with others fails as a whole,
    "bad" alone fails on its own; ``dies`` makes every batch raise `NodeDiedError`."""

    def __init__(self, name: str, delay_s: float = 0.0, dies: bool = False) -> None:
        super().__init__(name, "scripted")
        self.delay_s = delay_s
        self.dies = dies
        self.batches: list[list[str]] = []
        self.running = 0
        self.most_running = 0

    async def run(self, items: Sequence[WorkItem]) -> list[Outcome]:
        queries = [item.payload["query"] for item in items]
        self.batches.append(queries)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.running -= 1
        if self.dies:
            raise NodeDiedError(f"{self.name} was killed")
        if "bad" in queries and len(queries) > 1:
            raise BatchFailedError("a bad query spoiled the batch")
        return [
            Outcome(ok=False, error="bad query")
            if q == "bad"
            else Outcome(ok=True, value={"echo": q, "node": self.name})
            for q in queries
        ]


class ScriptedProvider(NodeProvider):
    """Hands out pre-made nodes in order, then fresh healthy ones."""

    name = "scripted"

    def __init__(self, nodes: list[ScriptedNode], start_delay_s: float = 0.0) -> None:
        super().__init__(ServerSettings())
        self.queue = list(nodes)
        self.made: list[ScriptedNode] = []
        self.start_delay_s = start_delay_s
        self.stopped: list[str] = []

    def create(self) -> Node:
        node = self.queue.pop(0) if self.queue else ScriptedNode(self.next_name())
        self.made.append(node)
        return node

    async def start(self, node: Node) -> WorkloadInfo:
        await asyncio.sleep(self.start_delay_s)
        return WorkloadInfo(embedder="scripted", dim=None, chunks=0)

    async def stop(self, node: Node) -> None:
        self.stopped.append(node.name)


class Harness:
    """A queue, pool and batcher around scripted nodes, inside a running event loop."""

    def __init__(self, nodes: list[ScriptedNode], *, start: int | None = None, **batcher: Any) -> None:
        self.provider = ScriptedProvider(nodes)
        self.queue = RequestQueue(batcher.pop("capacity", 1000))
        self.pool = NodePool(self.provider, self.queue.wakeup.set, 10)
        self.metrics = ServerMetrics(8)
        options: dict[str, Any] = {"max_batch_size": 8, "max_wait_s": 0.1, "dispatch_when_idle": False, **batcher}
        self.batcher = Batcher(self.queue, self.pool, RoundRobin(), self.metrics, **options)
        self.count = len(nodes) if start is None else start
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Harness:
        if self.count:
            self.pool.add(self.count)
            while self.pool.count(NodeState.READY) < self.count:
                await asyncio.sleep(0.001)
        self.task = asyncio.create_task(self.batcher.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def submit(self, query: str, timeout_s: float = 10.0) -> PendingItem:
        now = time.monotonic()
        pending = PendingItem(
            WorkItem("rag", {"query": query}), asyncio.get_running_loop().create_future(), now, now + timeout_s
        )
        self.queue.put(pending)
        self.batcher.arrived += 1
        return pending
