"""`NodePool`: the head node's nodes, through their provider: start, drain, replace the dead."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gpurag_server.nodes.base import Node, NodeProvider, NodeState
from gpurag_server.workload import WorkloadInfo

log = logging.getLogger("gpurag_server")


class NodePool:
    """The nodes serving now. `wanted` counts starting and ready ones; draining ones are on their way out."""

    def __init__(self, provider: NodeProvider, on_change: Callable[[], None], start_timeout_s: float) -> None:
        self.provider = provider
        self.nodes: list[Node] = []
        self.info: WorkloadInfo | None = None
        self._on_change = on_change
        self._start_timeout_s = start_timeout_s
        self._tasks: dict[Node, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self.last_error: str | None = None
        self.closing = False

    @property
    def wanted(self) -> int:
        """Nodes starting or ready: the count the autoscaler reasons about."""
        return sum(1 for n in self.nodes if n.state in (NodeState.STARTING, NodeState.READY))

    def count(self, state: NodeState) -> int:
        return sum(1 for n in self.nodes if n.state is state)

    @property
    def ready(self) -> bool:
        return any(n.state is NodeState.READY for n in self.nodes)

    def has_idle_node(self) -> bool:
        return any(n.state is NodeState.READY and n.in_flight == 0 for n in self.nodes)

    def add(self, count: int = 1) -> list[Node]:
        """Start ``count`` nodes in the background; they take batches once ready."""
        started = []
        for _ in range(count):
            node = self.provider.create()
            node.on_death = self.mark_dead
            self.nodes.append(node)
            self._tasks[node] = asyncio.create_task(self._start(node), name=f"start {node.name}")
            started.append(node)
        self._on_change()
        return started

    async def _start(self, node: Node) -> None:
        try:
            info = await asyncio.wait_for(self.provider.start(node), self._start_timeout_s)
        except Exception as exc:
            self.last_error = f"node {node.name} failed to start: {type(exc).__name__}: {exc}"
            log.error(self.last_error)
            node.state = NodeState.DEAD
            await self._stop_quietly(node)
            self._forget(node)
            return
        finally:
            self._tasks.pop(node, None)
        if node.state is NodeState.STARTING:
            self.info = self.info or info
            node.state = NodeState.READY
            log.info("node %s ready", node.name)
        self._on_change()

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until a node is ready (or none is left starting)."""
        async with asyncio.timeout(timeout_s):
            while not self.ready:
                if not any(n.state is NodeState.STARTING for n in self.nodes):
                    raise RuntimeError(self.last_error or "no node is starting")
                await asyncio.sleep(0.02)

    def remove(self, count: int) -> list[Node]:
        """Take ``count`` nodes out: starting ones first, then the least busy ready ones, which drain."""
        chosen: list[Node] = []
        starting = [n for n in self.nodes if n.state is NodeState.STARTING]
        ready = sorted(
            (n for n in self.nodes if n.state is NodeState.READY), key=lambda n: (n.in_flight, -n.started_at)
        )
        for node in (starting + ready)[:count]:
            chosen.append(node)
            if node.state is NodeState.STARTING:
                task = self._tasks.pop(node, None)
                if task is not None:
                    task.cancel()
                node.state = NodeState.STOPPED
                self._stop_later(node)
                self._forget(node)
            else:
                node.state = NodeState.DRAINING
                self._tasks[node] = asyncio.create_task(self._drain(node), name=f"drain {node.name}")
        self._on_change()
        return chosen

    async def _drain(self, node: Node) -> None:
        """No new batches go to a draining node; stop it once its batches are answered."""
        while node.in_flight > 0:
            await asyncio.sleep(0.01)
        node.state = NodeState.STOPPED
        await self._stop_quietly(node)
        self._tasks.pop(node, None)
        self._forget(node)
        log.info("node %s drained and stopped", node.name)

    def mark_dead(self, node: Node, reason: str) -> None:
        """Give ``node`` up: stop it, drop it, and start a replacement so the count holds."""
        if node.state in (NodeState.DEAD, NodeState.STOPPED):
            return
        replace = node.state is NodeState.READY and not self.closing  # a node that never started is not retried
        node.state = NodeState.DEAD
        self.last_error = f"node {node.name} died: {reason}"
        log.warning(self.last_error)
        self._stop_later(node)
        self._forget(node)
        if replace:
            self.add(1)
        self._on_change()

    def _forget(self, node: Node) -> None:
        with contextlib.suppress(ValueError):
            self.nodes.remove(node)
        self._on_change()

    def _stop_later(self, node: Node) -> None:
        task = asyncio.create_task(self._stop_quietly(node))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop_quietly(self, node: Node) -> None:
        try:
            await self.provider.stop(node)
        except Exception as exc:  # a node that will not stop cleanly is still gone from the pool
            log.warning("stopping node %s: %s", node.name, exc)

    async def close(self) -> None:
        """Stop every node now and the provider."""
        self.closing = True
        for task in list(self._tasks.values()):
            task.cancel()
        for node in list(self.nodes):
            node.state = NodeState.STOPPED
            await self._stop_quietly(node)
        self.nodes.clear()
        await self.provider.close()
