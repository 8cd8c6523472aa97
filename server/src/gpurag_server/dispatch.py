"""Dispatchers: pick the node for each batch among those that can take one.

Registered through ``register_dispatchers``: ``round_robin`` (default) and ``least_loaded``.
A node can take a batch while it is ready and holds fewer than two (one running, one waiting),
so work piles up in the head node's queue, where it is visible, not in the nodes.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from gpurag.hookspecs import Register, hookimpl
from gpurag.plugins import lookup
from gpurag_server.nodes.base import Node


class Dispatcher(abc.ABC):
    """Picks a node for the next batch; `pick` is the one method to implement."""

    name: str = ""

    @abc.abstractmethod
    def pick(self, nodes: Sequence[Node]) -> Node | None:
        """A node from ``nodes`` whose `Node.can_take` is true, or None when none can."""


class RoundRobin(Dispatcher):
    """Each batch to the next node in turn, skipping nodes that cannot take one."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, nodes: Sequence[Node]) -> Node | None:
        count = len(nodes)
        for step in range(count):
            node = nodes[(self._next + step) % count]
            if node.can_take:
                self._next = (self._next + step + 1) % count
                return node
        return None


class LeastLoaded(Dispatcher):
    """The node holding the fewest batches; ties go to the one that has done the fewest."""

    name = "least_loaded"

    def pick(self, nodes: Sequence[Node]) -> Node | None:
        candidates = [node for node in nodes if node.can_take]
        if not candidates:
            return None
        return min(candidates, key=lambda node: (node.in_flight, node.batches_done))


@hookimpl
def register_dispatchers(register: Register) -> None:
    """Register ``round_robin`` and ``least_loaded``."""
    register(RoundRobin, "round_robin")
    register(LeastLoaded, "least_loaded")


def get_dispatcher(name: str) -> Dispatcher:
    """A new dispatcher of the kind registered as ``name``."""
    dispatcher: Dispatcher = lookup("dispatchers", name)()
    return dispatcher
