"""`HeadNode`: the one process that owns the queue, the batcher, the node pool and the autoscaler."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gpurag.plugins import lookup
from gpurag.scaling import get_scaling_policy
from gpurag_server.autoscaler import Autoscaler
from gpurag_server.batcher import Batcher
from gpurag_server.dispatch import get_dispatcher
from gpurag_server.metrics import ServerMetrics
from gpurag_server.nodes.base import NodeProvider, NodeState
from gpurag_server.pool import NodePool
from gpurag_server.queueing import PendingItem, QueueFullError, Reply, RequestQueue
from gpurag_server.schemas import AutoscalerStatus, Decision, NodeStatus, QueueStatus, StatusResponse
from gpurag_server.settings import ServerSettings
from gpurag_server.workload import WorkItem

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class HeadNode:
    """Accepts work items, answers each with a `Reply`; nothing accepted goes unanswered."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.started = time.monotonic()
        self.metrics = ServerMetrics(settings.max_batch_size)
        self.queue = RequestQueue(settings.max_queue_length)
        provider_class = lookup("node_providers", settings.node_provider)
        self.provider: NodeProvider = provider_class(settings)
        self.pool = NodePool(self.provider, self.queue.wakeup.set, settings.node_start_timeout_s)
        self.batcher = Batcher(
            self.queue,
            self.pool,
            get_dispatcher(settings.dispatcher),
            self.metrics,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_s,
            dispatch_when_idle=settings.dispatch_when_idle,
        )
        policy = get_scaling_policy(settings.scaling_policy, settings.min_nodes, settings.max_nodes)
        self.autoscaler = Autoscaler(
            policy,
            self.batcher,
            self.pool,
            self.metrics,
            interval_s=settings.autoscale_interval_s,
            log_size=settings.decision_log_size,
        )
        self.status_counts: dict[int, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start the nodes (in the background), the batcher and, if enabled, the autoscaler."""
        self.pool.add(self.settings.nodes)
        self._tasks.append(asyncio.create_task(self.batcher.run(), name="batcher"))
        if self.settings.autoscale:
            self._tasks.append(asyncio.create_task(self.autoscaler.run(), name="autoscaler"))

    async def stop(self) -> None:
        """Finish running batches, answer what is queued 503, stop the nodes."""
        for task in self._tasks[1:]:
            task.cancel()
        await self.batcher.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.pool.close()

    async def submit(self, item: WorkItem, receive: Receive | None = None) -> Reply | None:
        """Queue ``item`` and wait for its reply; None when the client went away first."""
        queued = self.enqueue(item)
        if isinstance(queued, Reply):
            return queued
        return await self.wait(queued, receive)

    def enqueue(self, item: WorkItem, on_text: Callable[[str, bool], None] | None = None) -> PendingItem | Reply:
        """Queue ``item`` (a streaming one with its text sink, see `PendingItem.on_text`); a 503 reply if full."""
        now = time.monotonic()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        pending = PendingItem(item, future, now, now + self.settings.request_timeout_s, on_text=on_text)
        try:
            self.queue.put(pending)
        except QueueFullError as exc:
            self.metrics.rejects.labels("queue_full").inc()
            return Reply(503, error_type="overloaded", message=str(exc))
        self.batcher.arrived += 1
        return pending

    async def wait(self, pending: PendingItem, receive: Receive | None = None) -> Reply | None:
        """The reply of a queued item; None when the client went away first (cancelling this abandons it)."""
        loop = asyncio.get_running_loop()
        future = pending.future
        timer = loop.call_at(loop.time() + max(pending.deadline - time.monotonic(), 0.0), self._expire, pending)
        watcher = loop.create_task(_watch_disconnect(receive, future)) if receive is not None else None
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                return None  # the client disconnected; the batcher drops the item
            raise
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()

    def _expire(self, pending: PendingItem) -> None:
        if pending.answer(
            Reply(504, error_type="deadline_exceeded", message=f"no answer within {self.settings.request_timeout_s} s")
        ):
            self.metrics.rejects.labels("deadline").inc()

    def count(self, status: int) -> None:
        self.status_counts[status] = self.status_counts.get(status, 0) + 1

    def status(self) -> StatusResponse:
        """What ``GET /v1/status`` answers."""
        now = time.monotonic()
        p50, p99 = self.batcher.wait_percentiles()
        stats_window = self.autoscaler._last
        elapsed = max(now - stats_window[0], 1e-9)
        policy = self.autoscaler.policy
        return StatusResponse(
            uptime_s=now - self.started,
            ready=self.pool.ready,
            workload=self.settings.workload,
            dispatcher=self.settings.dispatcher,
            node_provider=self.settings.node_provider,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_wait_s,
            queue=QueueStatus(
                length=len(self.queue),
                capacity=self.queue.capacity,
                in_flight=len(self.batcher.ledger),
                arrival_rate=(self.batcher.arrived - stats_window[1]) / elapsed,
                completion_rate=(self.batcher.completed - stats_window[2]) / elapsed,
                wait_p50_s=p50,
                wait_p99_s=p99,
            ),
            nodes=[
                NodeStatus(
                    name=n.name,
                    provider=n.provider,
                    state=str(n.state),
                    in_flight=n.in_flight,
                    batches_done=n.batches_done,
                    items_done=n.items_done,
                    started_s_ago=now - n.started_at,
                )
                for n in self.pool.nodes
            ],
            autoscaler=AutoscalerStatus(
                enabled=self.settings.autoscale,
                policy=policy.name,
                min_nodes=policy.min_nodes,
                max_nodes=policy.max_nodes,
                interval_s=self.autoscaler.interval_s,
                decisions=[
                    Decision(
                        time_s=d.time - self.started,
                        queue_length=d.stats.queue_length,
                        arrival_rate=d.stats.arrival_rate,
                        busy_nodes=d.stats.busy_nodes,
                        old=d.old,
                        new=d.new,
                        reason=d.reason,
                    )
                    for d in list(self.autoscaler.decisions)[-50:]
                ],
            ),
            requests={str(code): count for code, count in sorted(self.status_counts.items())},
        )

    def refresh_gauges(self) -> None:
        self.metrics.queue_length.set(len(self.queue))
        self.metrics.in_flight.set(len(self.batcher.ledger))
        for state in NodeState:
            self.metrics.nodes.labels(str(state)).set(self.pool.count(state))


async def _watch_disconnect(receive: Receive | None, future: asyncio.Future[Reply]) -> None:
    """Cancel ``future`` when the client disconnects before its reply."""
    assert receive is not None
    while not future.done():
        message = await receive()
        if message["type"] == "http.disconnect":
            if not future.done():
                future.cancel()
            return
