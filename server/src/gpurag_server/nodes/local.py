"""The ``local`` provider: each node is a worker thread in the server process, with its own workload."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence

from gpurag_server.nodes.base import BatchFailedError, Node, NodeDiedError, NodeProvider, TextSink
from gpurag_server.workload import Outcome, WorkItem, Workload, WorkloadInfo


class LocalNode(Node):
    """A single worker thread: batches run one at a time, never on the event loop."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "local")
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.workload: Workload | None = None

    async def run(self, items: Sequence[WorkItem], on_text: TextSink | None = None) -> list[Outcome]:
        workload = self.workload
        if workload is None:
            raise NodeDiedError(f"node {self.name} has no workload (stopped)")
        loop = asyncio.get_running_loop()
        from_thread = None
        if on_text is not None:
            sink = on_text

            def from_thread(i: int, text: str) -> None:  # handed to the loop: it runs before the batch's result
                loop.call_soon_threadsafe(sink, i, text)

        try:
            return await loop.run_in_executor(self.executor, workload.run, list(items), from_thread)
        except RuntimeError as exc:
            if self.executor._shutdown:
                raise NodeDiedError(f"node {self.name} was shut down") from exc
            raise BatchFailedError(f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise BatchFailedError(f"{type(exc).__name__}: {exc}") from exc


class LocalProvider(NodeProvider):
    """Worker threads in this process: cheap to start, share the process's memory and GIL."""

    name = "local"

    def create(self) -> Node:
        return LocalNode(self.next_name())

    async def start(self, node: Node) -> WorkloadInfo:
        assert isinstance(node, LocalNode)
        loop = asyncio.get_running_loop()
        node.workload = await loop.run_in_executor(node.executor, Workload, self.settings)
        return node.workload.info()

    async def stop(self, node: Node) -> None:
        assert isinstance(node, LocalNode)
        node.workload = None
        node.executor.shutdown(wait=False, cancel_futures=False)
