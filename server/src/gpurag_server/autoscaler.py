"""The autoscaler: every ``autoscale_interval_s`` it reads queue statistics, asks the scaling
policy for a node count and starts or drains nodes to reach it. Every decision is logged (bounded)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

from gpurag.scaling import QueueStats, Scaler
from gpurag_server.batcher import Batcher
from gpurag_server.metrics import ServerMetrics
from gpurag_server.nodes.base import NodeState
from gpurag_server.pool import NodePool

log = logging.getLogger("gpurag_server")


@dataclasses.dataclass(frozen=True)
class LoggedDecision:
    """One decision: when (monotonic), what the policy saw, the old and new count, why."""

    time: float
    stats: QueueStats
    old: int
    new: int
    reason: str


class Autoscaler:
    """Samples `QueueStats` from the batcher and pool and applies the policy's answer."""

    def __init__(
        self,
        policy: Scaler,
        batcher: Batcher,
        pool: NodePool,
        metrics: ServerMetrics,
        *,
        interval_s: float,
        log_size: int,
    ) -> None:
        self.policy = policy
        self.batcher = batcher
        self.pool = pool
        self.metrics = metrics
        self.interval_s = interval_s
        self.decisions: collections.deque[LoggedDecision] = collections.deque(maxlen=log_size)
        self._last = (time.monotonic(), 0, 0)

    def sample(self) -> QueueStats:
        """Queue statistics since the previous sample."""
        now = time.monotonic()
        then, arrived, completed = self._last
        elapsed = max(now - then, 1e-9)
        self._last = (now, self.batcher.arrived, self.batcher.completed)
        p50, p99 = self.batcher.wait_percentiles()
        self.batcher.waits.clear()
        nodes = self.pool.nodes
        return QueueStats(
            time=now,
            queue_length=len(self.batcher.queue),
            arrival_rate=(self.batcher.arrived - arrived) / elapsed,
            completion_rate=(self.batcher.completed - completed) / elapsed,
            wait_p50_s=p50,
            wait_p99_s=p99,
            busy_nodes=sum(1 for n in nodes if n.state is NodeState.READY and n.in_flight > 0),
            ready_nodes=sum(1 for n in nodes if n.state is NodeState.READY),
            starting_nodes=sum(1 for n in nodes if n.state is NodeState.STARTING),
            max_batch_size=self.batcher.max_batch_size,
        )

    def step(self) -> LoggedDecision:
        """One tick: sample, decide, act, log."""
        stats = self.sample()
        current = self.pool.wanted
        decision = self.policy.decide(stats, current)
        if decision.wanted > current:
            self.pool.add(decision.wanted - current)
            self.metrics.decisions.labels("up").inc()
        elif decision.wanted < current:
            self.pool.remove(current - decision.wanted)
            self.metrics.decisions.labels("down").inc()
        else:
            self.metrics.decisions.labels("hold").inc()
        logged = LoggedDecision(stats.time, stats, current, decision.wanted, decision.reason)
        self.decisions.append(logged)
        if decision.wanted != current:
            log.info("autoscaler: %d -> %d nodes (%s)", current, decision.wanted, decision.reason)
        return logged

    async def run(self) -> None:
        """Tick every ``interval_s`` until cancelled."""
        self.sample()
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.step()
            except Exception:  # a failing policy must not stop the server; it is logged and retried
                log.exception("autoscaler step")
