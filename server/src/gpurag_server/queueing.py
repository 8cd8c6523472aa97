"""The head node's queue: pending items, the bounded request queue, and the in-flight ledger.

The queue is a deque rather than an `asyncio.Queue` because a dead node's items go back to its
front; only new arrivals are bounded (a full queue answers 503), requeued items always fit.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable

from gpurag.errors import GpuragError
from gpurag_server.workload import Outcome, WorkItem

_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class Reply:
    """How one request ended: an outcome from a node, or an explicit rejection (status, type, message)."""

    status: int
    outcome: Outcome | None = None
    error_type: str = ""
    message: str = ""
    node: str = ""
    batch_size: int = 0
    queue_wait_s: float = 0.0


@dataclasses.dataclass(eq=False)
class PendingItem:
    """A request waiting for its reply: payload, future, arrival and deadline (monotonic seconds)."""

    item: WorkItem
    future: asyncio.Future[Reply]
    arrival: float
    deadline: float
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    attempt: int = 0
    dispatched_at: float = 0.0
    #: A streaming request's sink: ``on_text(text, reset)`` gets the answer's new text as the node
    #: generates it; ``reset`` means ``text`` replaces everything given before (see `add_text`).
    on_text: Callable[[str, bool], None] | None = None
    #: The text given to ``on_text`` so far, and the text of the run now under way.
    streamed: str = ""
    run_text: str = ""

    @property
    def abandoned(self) -> bool:
        """Answered already, or its client went away (the future was cancelled)."""
        return self.future.done()

    def restart_text(self) -> None:
        """A new run of this request begins (a retry after a split or a dead node): its text starts over."""
        self.run_text = ""

    def add_text(self, text: str) -> None:
        """Pass on the new text of the current run, once: a retry that repeats what was sent adds nothing.

        Generation is greedy, so a retry usually repeats the first run's text; only what goes
        beyond the text already sent is passed on. A retry whose text departs from it (another
        batch, other rounding) is passed on whole with ``reset``: the client replaces what it has.
        """
        if self.on_text is None or self.abandoned:
            return
        self.run_text += text
        if self.run_text.startswith(self.streamed):
            new, self.streamed = self.run_text[len(self.streamed) :], self.run_text
            if new:
                self.on_text(new, False)
        elif not self.streamed.startswith(self.run_text):
            self.streamed = self.run_text
            self.on_text(self.run_text, True)

    def answer(self, reply: Reply) -> bool:
        """Resolve the future once; False if it was already resolved or cancelled."""
        if self.future.done():
            return False
        self.future.set_result(reply)
        return True


class QueueFullError(GpuragError):
    """The queue holds ``max_queue_length`` items: answer 503 with Retry-After."""


class RequestQueue:
    """Bounded FIFO of `PendingItem`; `wakeup` is set whenever something changes that the batcher awaits."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.deque[PendingItem] = collections.deque()
        self.wakeup = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, pending: PendingItem) -> None:
        """Append a new arrival; `QueueFullError` when at capacity."""
        if len(self._items) >= self.capacity:
            raise QueueFullError(f"the queue holds {len(self._items)} requests (max_queue_length={self.capacity})")
        self._items.append(pending)
        self.wakeup.set()

    def requeue_front(self, items: Iterable[PendingItem]) -> None:
        """Put ``items`` back at the front, in their order, whatever the capacity."""
        self._items.extendleft(reversed(list(items)))
        self.wakeup.set()

    def oldest_arrival(self) -> float | None:
        return self._items[0].arrival if self._items else None

    def take(self, count: int) -> list[PendingItem]:
        """Up to ``count`` items from the front."""
        taken: list[PendingItem] = []
        while self._items and len(taken) < count:
            taken.append(self._items.popleft())
        return taken

    def drain_all(self) -> list[PendingItem]:
        items = list(self._items)
        self._items.clear()
        return items


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """Where an in-flight request is: its node, the attempt, its deadline."""

    node: str
    attempt: int
    deadline: float
    since: float


class Ledger:
    """Every request handed to a node and not yet answered: request id -> (node, attempt, deadline).

    A result is accepted only from the node and attempt the ledger holds, so a late duplicate
    from a node given up for dead is ignored.
    """

    def __init__(self) -> None:
        self._entries: dict[int, LedgerEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, pending: PendingItem, node: str) -> None:
        self._entries[pending.id] = LedgerEntry(node, pending.attempt, pending.deadline, time.monotonic())

    def settle(self, pending: PendingItem, node: str, attempt: int) -> bool:
        """Remove the entry if it is (node, attempt); False (a late duplicate) otherwise."""
        entry = self._entries.get(pending.id)
        if entry is None or entry.node != node or entry.attempt != attempt:
            return False
        del self._entries[pending.id]
        return True

    def holds(self, pending: PendingItem, node: str, attempt: int) -> bool:
        """Whether ``pending`` is in flight on ``node`` in ``attempt`` (what `settle` would accept)."""
        entry = self._entries.get(pending.id)
        return entry is not None and entry.node == node and entry.attempt == attempt

    def on_node(self, node: str) -> list[int]:
        return [request for request, entry in self._entries.items() if entry.node == node]
