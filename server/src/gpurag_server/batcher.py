"""The batcher: one task that turns the queue into batches and hands them to nodes.

Flush rule: a batch leaves when it holds ``max_batch_size`` requests, or when its oldest request
has waited ``max_wait_s``, or (``dispatch_when_idle``, the default) at once when some node is idle:
an idle node gains nothing from waiting, and under load no node is idle so batches fill up.
In every case a batch leaves only when the dispatcher finds a node that can take it.

Before dispatch, requests whose client went away are dropped and requests past their deadline
are answered 504. A batch that fails as a whole is split in halves, each retried once; a half
that fails again has each of its requests run alone, so each gets its own answer or error. A batch
whose node dies goes back to the front of the queue once; a second death answers 503.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Sequence

import numpy as np

from gpurag_server.dispatch import Dispatcher
from gpurag_server.metrics import ServerMetrics
from gpurag_server.nodes.base import BatchFailedError, Node, NodeDiedError
from gpurag_server.pool import NodePool
from gpurag_server.queueing import Ledger, PendingItem, Reply, RequestQueue
from gpurag_server.workload import Outcome

log = logging.getLogger("gpurag_server")

#: Attempts a request gets when its node dies under it.
MAX_ATTEMPTS = 2


class Batcher:
    """Size/time flush, dispatch, the ledger, and the books the autoscaler reads."""

    def __init__(
        self,
        queue: RequestQueue,
        pool: NodePool,
        dispatcher: Dispatcher,
        metrics: ServerMetrics,
        *,
        max_batch_size: int,
        max_wait_s: float,
        dispatch_when_idle: bool = True,
    ) -> None:
        self.queue = queue
        self.pool = pool
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.dispatch_when_idle = dispatch_when_idle
        self.ledger = Ledger()
        self.arrived = 0
        self.completed = 0
        self.requeued = 0
        self.waits: collections.deque[float] = collections.deque(maxlen=4096)
        self._batches: set[asyncio.Task[None]] = set()

    # --- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Form and dispatch batches until cancelled."""
        queue, wakeup = self.queue, self.queue.wakeup
        while True:
            wakeup.clear()
            due, timeout = self._flush_due()
            node = self.dispatcher.pick(self.pool.nodes) if due else None
            if node is None:
                # Not due: wake at the flush time or on news. Due but no node free: wait for news.
                try:
                    async with asyncio.timeout(None if due else timeout):
                        await wakeup.wait()
                except TimeoutError:
                    pass
                continue
            batch = self._take(len(queue))
            if batch:
                self._dispatch(node, batch)

    def _flush_due(self) -> tuple[bool, float | None]:
        """Whether the flush rule says send now; if not, seconds until it will (None: nothing queued)."""
        length = len(self.queue)
        if length == 0:
            return False, None
        if length >= self.max_batch_size or (self.dispatch_when_idle and self.pool.has_idle_node()):
            return True, None
        oldest = self.queue.oldest_arrival()
        assert oldest is not None
        left = oldest + self.max_wait_s - time.monotonic()
        return (True, None) if left <= 0 else (False, left)

    def _take(self, available: int) -> list[PendingItem]:
        """Up to ``max_batch_size`` live items: the abandoned dropped, the expired answered 504."""
        batch: list[PendingItem] = []
        now = time.monotonic()
        while len(batch) < self.max_batch_size and len(self.queue):
            for pending in self.queue.take(self.max_batch_size - len(batch)):
                if pending.abandoned:
                    self.metrics.rejects.labels("client_gone").inc()
                elif now >= pending.deadline:
                    self.metrics.rejects.labels("deadline").inc()
                    pending.answer(Reply(504, error_type="deadline_exceeded", message=_late(pending, now)))
                else:
                    batch.append(pending)
        return batch

    def _dispatch(self, node: Node, batch: list[PendingItem]) -> None:
        now = time.monotonic()
        node.in_flight += 1
        for pending in batch:
            pending.dispatched_at = now
            wait = now - pending.arrival
            self.waits.append(wait)
            self.metrics.queue_wait.observe(wait)
            self.ledger.record(pending, node.name)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_fill.observe(len(batch) / self.max_batch_size)
        task = asyncio.create_task(self._run_batch(node, batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    # --- running a batch -------------------------------------------------------------------------

    async def _run_batch(self, node: Node, batch: list[PendingItem]) -> None:
        try:
            await self._run_on(node, batch, split=True)
        except Exception:  # never leave a future unanswered, whatever went wrong in here
            log.exception("batch on node %s", node.name)
            for pending in batch:
                if self.ledger.settle(pending, node.name, pending.attempt):
                    pending.answer(Reply(500, error_type="internal", message="the head node failed on this batch"))
        finally:
            node.in_flight -= 1
            node.batches_done += 1
            node.items_done += len(batch)
            self.queue.wakeup.set()

    async def _run_on(self, node: Node, batch: list[PendingItem], *, split: bool) -> None:
        started = time.perf_counter()
        try:
            outcomes = await self._call(node, batch)
        except NodeDiedError as exc:
            self._node_died(node, batch, str(exc))
            return
        except BatchFailedError as exc:
            if len(batch) == 1:
                self._answer(node, batch, [Outcome(ok=False, error=str(exc))], len(batch))
            elif split:
                middle = len(batch) // 2
                for half in (batch[:middle], batch[middle:]):
                    await self._run_on(node, half, split=False)
            else:
                for pending in batch:
                    await self._run_on(node, [pending], split=False)
            return
        self.metrics.compute.observe(time.perf_counter() - started)
        if len(outcomes) != len(batch):
            message = f"node {node.name} returned {len(outcomes)} outcomes for a batch of {len(batch)}"
            outcomes = [Outcome(ok=False, error=message)] * len(batch)
        self._answer(node, batch, outcomes, len(batch))

    def _call(self, node: Node, batch: list[PendingItem]) -> Awaitable[list[Outcome]]:
        """``node.run`` of the batch; streaming requests among it get their text as the node produces it."""
        items = [p.item for p in batch]
        if all(p.on_text is None for p in batch):
            return node.run(items)
        attempts = [p.attempt for p in batch]
        for pending in batch:
            pending.restart_text()

        def on_text(index: int, text: str) -> None:
            if not 0 <= index < len(batch):
                return
            pending = batch[index]
            if self.ledger.holds(pending, node.name, attempts[index]):  # not a node given up for dead
                pending.add_text(text)

        return node.run(items, on_text=on_text)

    def _answer(self, node: Node, batch: Sequence[PendingItem], outcomes: Sequence[Outcome], size: int) -> None:
        for pending, outcome in zip(batch, outcomes, strict=True):
            if not self.ledger.settle(pending, node.name, pending.attempt):
                continue  # a late duplicate: this request was given to another node
            self.completed += 1
            wait = pending.dispatched_at - pending.arrival
            if outcome.ok:
                reply = Reply(200, outcome=outcome, node=node.name, batch_size=size, queue_wait_s=wait)
            else:
                reply = Reply(
                    500, error_type="node_failed", message=f"node {node.name}: {outcome.error}", node=node.name
                )
            pending.answer(reply)

    def _node_died(self, node: Node, batch: Sequence[PendingItem], reason: str) -> None:
        """Put the batch back at the front once; a request whose second node died too gets 503."""
        self.pool.mark_dead(node, reason)
        again = []
        for pending in batch:
            if not self.ledger.settle(pending, node.name, pending.attempt) or pending.abandoned:
                continue
            if pending.attempt + 1 < MAX_ATTEMPTS:
                pending.attempt += 1
                again.append(pending)
            else:
                self.completed += 1
                self.metrics.rejects.labels("node_died_twice").inc()
                pending.answer(
                    Reply(503, error_type="node_failed", message=f"two nodes died running this request; last: {reason}")
                )
        if again:
            self.requeued += len(again)
            self.metrics.requeues.inc(len(again))
            self.queue.requeue_front(again)

    # --- books -----------------------------------------------------------------------------------

    def wait_percentiles(self) -> tuple[float, float]:
        if not self.waits:
            return 0.0, 0.0
        p50, p99 = np.percentile(np.fromiter(self.waits, dtype=np.float64), [50, 99])
        return float(p50), float(p99)

    async def stop(self) -> None:
        """Wait for running batches, then answer what is still queued 503."""
        if self._batches:
            await asyncio.wait(list(self._batches), timeout=30)
        for pending in self.queue.drain_all():
            pending.answer(Reply(503, error_type="overloaded", message="the server is shutting down"))


def _late(pending: PendingItem, now: float) -> str:
    allowed = pending.deadline - pending.arrival
    return f"the request waited {now - pending.arrival:.3f} s, past its deadline of {allowed:.3f} s"
