"""Scaling policies: queue statistics in, a wanted node count in [min_nodes, max_nodes] out.

A policy (`Scaler`) is asked every ``autoscale_interval_s`` by the server's autoscaler. The
built-in ones, registered through ``register_scaling_policies`` like any plugin's:

- ``queue_length``: the seed's rule: one more node when the queue holds more than
  ``scale_up_queue_per_node`` items a node, one fewer when it holds fewer than
  ``scale_down_queue_per_node`` and some node is idle.
- ``target_utilisation``: Kubernetes' HPA rule: desired = ceil(current x load / target), no change
  within a 10 % dead band, scale-up at once, scale-down only to the highest recommendation seen
  over ``scale_down_window_s``, so a constant load never flaps.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import math
from typing import Any

from gpurag.errors import InvalidInputError
from gpurag.hookspecs import Register, hookimpl


@dataclasses.dataclass(frozen=True)
class QueueStats:
    """What the autoscaler sees at one tick.

    ``load`` is the work per ready node in units of its capacity: (busy nodes + queued batches)
    divided by ready nodes, where queued batches = queue length / max batch size.
    """

    time: float  # monotonic seconds
    queue_length: int
    arrival_rate: float  # requests/s since the previous tick
    completion_rate: float  # requests/s since the previous tick
    wait_p50_s: float
    wait_p99_s: float
    busy_nodes: int
    ready_nodes: int
    starting_nodes: int = 0
    max_batch_size: int = 8

    @property
    def load(self) -> float:
        """Busy nodes plus queued batches, per ready node (1.0: every node busy, nothing queued)."""
        queued_batches = self.queue_length / max(self.max_batch_size, 1)
        return (self.busy_nodes + queued_batches) / max(self.ready_nodes, 1)


@dataclasses.dataclass(frozen=True)
class ScalingDecision:
    """The node count a policy wants and why."""

    wanted: int
    reason: str


class Scaler(abc.ABC):
    """A scaling policy: `decide` is the one method to implement; the answer is clamped to the bounds."""

    name: str = ""

    def __init__(self, min_nodes: int = 1, max_nodes: int = 4, **options: Any) -> None:
        if not isinstance(min_nodes, int) or min_nodes < 0:
            raise InvalidInputError(f"min_nodes must be an int >= 0; got {min_nodes!r}")
        if not isinstance(max_nodes, int) or max_nodes < max(min_nodes, 1):
            raise InvalidInputError(
                f"max_nodes must be an int >= max(min_nodes, 1) = {max(min_nodes, 1)}; got {max_nodes!r}"
            )
        if options:
            raise InvalidInputError(f"scaling policy {self.name!r} takes no option(s) {', '.join(sorted(options))}")
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes

    def decide(self, stats: QueueStats, current: int) -> ScalingDecision:
        """The node count wanted now (within the bounds) and the reason."""
        decision = self.recommend(stats, current)
        wanted = min(max(decision.wanted, self.min_nodes), self.max_nodes)
        if wanted != decision.wanted:
            bound = "min_nodes" if wanted == self.min_nodes else "max_nodes"
            return ScalingDecision(wanted, f"{decision.reason}; clamped to {bound}={wanted}")
        return decision

    @abc.abstractmethod
    def recommend(self, stats: QueueStats, current: int) -> ScalingDecision:
        """The unclamped recommendation for ``current`` nodes (counting the ones still starting)."""


class QueueLengthScaler(Scaler):
    """The seed's policy: thresholds on queue length per node, one node at a time."""

    name = "queue_length"

    def __init__(
        self,
        min_nodes: int = 1,
        max_nodes: int = 4,
        *,
        scale_up_queue_per_node: float = 8.0,
        scale_down_queue_per_node: float = 1.0,
    ) -> None:
        super().__init__(min_nodes, max_nodes)
        if not scale_down_queue_per_node < scale_up_queue_per_node:
            raise InvalidInputError(
                "scale_down_queue_per_node must be below scale_up_queue_per_node; "
                f"got {scale_down_queue_per_node} and {scale_up_queue_per_node}"
            )
        self.up = scale_up_queue_per_node
        self.down = scale_down_queue_per_node

    def recommend(self, stats: QueueStats, current: int) -> ScalingDecision:
        per_node = stats.queue_length / max(current, 1)
        if per_node > self.up:
            return ScalingDecision(current + 1, f"queue {stats.queue_length} is {per_node:.1f}/node > {self.up:g}")
        if per_node < self.down and stats.busy_nodes < current and stats.starting_nodes == 0:
            return ScalingDecision(
                current - 1, f"queue {stats.queue_length} is {per_node:.1f}/node < {self.down:g}, a node is idle"
            )
        return ScalingDecision(current, f"queue {stats.queue_length} is {per_node:.1f}/node, within thresholds")


class TargetUtilisationScaler(Scaler):
    """HPA's policy: desired = ceil(current x load / target) with a dead band and a scale-down window."""

    name = "target_utilisation"

    def __init__(
        self,
        min_nodes: int = 1,
        max_nodes: int = 4,
        *,
        target: float = 0.7,
        tolerance: float = 0.1,
        scale_down_window_s: float = 60.0,
    ) -> None:
        super().__init__(min_nodes, max_nodes)
        if not 0 < target <= 1:
            raise InvalidInputError(f"target must be in (0, 1]; got {target}")
        if not 0 <= tolerance < 1:
            raise InvalidInputError(f"tolerance must be in [0, 1); got {tolerance}")
        if scale_down_window_s < 0:
            raise InvalidInputError(f"scale_down_window_s must be >= 0; got {scale_down_window_s}")
        self.target = target
        self.tolerance = tolerance
        self.window_s = scale_down_window_s
        self._history: collections.deque[tuple[float, int]] = collections.deque()

    def recommend(self, stats: QueueStats, current: int) -> ScalingDecision:
        current = max(current, 1)
        ratio = stats.load / self.target
        if abs(ratio - 1.0) <= self.tolerance:
            raw = current
            why = f"load {stats.load:.2f} within {self.tolerance:.0%} of target {self.target:g}"
        else:
            raw = max(math.ceil(current * ratio - 1e-9), 0)
            why = f"load {stats.load:.2f} against target {self.target:g}: ceil({current} x {ratio:.2f}) = {raw}"
        self._history.append((stats.time, raw))
        while self._history and self._history[0][0] < stats.time - self.window_s:
            self._history.popleft()
        if raw >= current:
            return ScalingDecision(raw, why)
        highest = max(r for _, r in self._history)
        if highest >= current:
            return ScalingDecision(
                current, f"{why}; held by the highest recommendation of {self.window_s:g} s ({highest})"
            )
        return ScalingDecision(highest, f"{why}; highest recommendation of {self.window_s:g} s is {highest}")


@hookimpl
def register_scaling_policies(register: Register) -> None:
    """Register ``queue_length`` and ``target_utilisation``."""
    register(QueueLengthScaler, "queue_length")
    register(TargetUtilisationScaler, "target_utilisation")


def get_scaling_policy(name: str, min_nodes: int, max_nodes: int, **options: Any) -> Scaler:
    """A new policy of the kind registered as ``name``."""
    from gpurag.plugins import lookup

    scaler: Scaler = lookup("scaling_policies", name)(min_nodes, max_nodes, **options)
    return scaler
