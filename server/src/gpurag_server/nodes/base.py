"""The `Node` and `NodeProvider` interfaces: a provider starts and stops nodes; a node runs batches.

The queue, batcher, dispatcher and autoscaler stay the head node's; a provider (``local``
threads, ``process`` on loopback, ``ray`` actors) only starts, stops and calls nodes, so any of
them is a peer. A node takes at most `Node.capacity` batches at once (one running, one waiting).
"""

from __future__ import annotations

import abc
import enum
import itertools
import time
from collections.abc import Callable, Sequence

from gpurag.errors import GpuragError
from gpurag_server.settings import ServerSettings
from gpurag_server.workload import Outcome, WorkItem, WorkloadInfo

#: Where a node sends a streaming batch's text: ``(item index in the batch, new text)``, on the event loop.
TextSink = Callable[[int, str], None]


class NodeState(enum.StrEnum):
    """Where a node is in its life: starting -> ready -> draining -> stopped, or dead at any point."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    DEAD = "dead"


class NodeDiedError(GpuragError):
    """The node died (process gone, broken pipe, missed heartbeat): its batches go back to the queue."""


class BatchFailedError(GpuragError):
    """The node is alive but the batch raised as a whole: the head splits it and retries."""


class Node(abc.ABC):
    """One compute node. `run` is the one method a provider implements for work; the head keeps the books."""

    #: Batches a node holds at once: one running and one waiting.
    capacity = 2

    def __init__(self, name: str, provider: str) -> None:
        self.name = name
        self.provider = provider
        self.state = NodeState.STARTING
        self.in_flight = 0
        self.batches_done = 0
        self.items_done = 0
        self.started_at = time.monotonic()
        #: Called by the node when it finds out by itself that it died (the pool sets it).
        self.on_death: Callable[[Node, str], None] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.state}, in_flight={self.in_flight})"

    @property
    def can_take(self) -> bool:
        """Ready and holding fewer than `capacity` batches."""
        return self.state is NodeState.READY and self.in_flight < self.capacity

    @abc.abstractmethod
    async def run(self, items: Sequence[WorkItem], on_text: TextSink | None = None) -> list[Outcome]:
        """One outcome per item; raise `NodeDiedError` if the node died, `BatchFailedError` if the batch raised.

        With ``on_text``, a node that can stream calls ``on_text(i, text)`` on the event loop with
        item ``i``'s new answer text as it is generated, before `run` returns; the batcher passes
        it only for batches holding a streaming request.
        """


class NodeProvider(abc.ABC):
    """Starts, stops and calls nodes of one kind. Constructed once per server with its settings."""

    name: str = ""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._numbers = itertools.count()

    def next_name(self) -> str:
        return f"{self.name}-{next(self._numbers)}"

    @abc.abstractmethod
    def create(self) -> Node:
        """A new node in state ``starting`` (cheap; `start` does the slow part)."""

    @abc.abstractmethod
    async def start(self, node: Node) -> WorkloadInfo:
        """Bring ``node`` up (load the model and corpus) and return what it serves; raise if it cannot start."""

    @abc.abstractmethod
    async def stop(self, node: Node) -> None:
        """Stop ``node`` now and free what it holds (the head drains it first when it must)."""

    async def close(self) -> None:  # noqa: B027 - optional: most providers hold nothing of their own
        """Release what the provider itself holds, after every node is stopped."""
