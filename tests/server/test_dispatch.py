"""Dispatchers pick only nodes that can take a batch."""

from __future__ import annotations

import pytest
from server_fakes import ScriptedNode

from gpurag_server.dispatch import LeastLoaded, RoundRobin, get_dispatcher
from gpurag_server.nodes.base import NodeState


def nodes(*in_flight: int) -> list[ScriptedNode]:
    made = []
    for i, count in enumerate(in_flight):
        node = ScriptedNode(f"n{i}")
        node.state = NodeState.READY
        node.in_flight = count
        made.append(node)
    return made


def test_round_robin_takes_turns() -> None:
    pool, dispatcher = nodes(0, 0, 0), RoundRobin()
    assert [dispatcher.pick(pool).name for _ in range(7)] == ["n0", "n1", "n2", "n0", "n1", "n2", "n0"]  # type: ignore[union-attr]


def test_round_robin_skips_full_draining_and_starting_nodes() -> None:
    pool, dispatcher = nodes(2, 0, 0, 0), RoundRobin()
    pool[2].state = NodeState.DRAINING
    pool[3].state = NodeState.STARTING
    assert [dispatcher.pick(pool).name for _ in range(3)] == ["n1", "n1", "n1"]  # type: ignore[union-attr]
    pool[1].in_flight = 2
    assert dispatcher.pick(pool) is None


def test_least_loaded_picks_the_emptiest_node() -> None:
    pool = nodes(1, 0, 2)
    assert LeastLoaded().pick(pool) is pool[1]
    pool[1].in_flight = 1
    pool[1].batches_done = 5
    assert LeastLoaded().pick(pool) is pool[0]
    assert LeastLoaded().pick(nodes(2, 2)) is None


@pytest.mark.parametrize("name", ["round_robin", "least_loaded"])
def test_dispatchers_are_registered(name: str) -> None:
    assert get_dispatcher(name).name == name
