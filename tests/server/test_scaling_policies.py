"""The built-in scaling policies: always within bounds, no flapping under constant load, fast scale-up."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpurag.errors import InvalidInputError
from gpurag.scaling import QueueLengthScaler, QueueStats, Scaler, TargetUtilisationScaler, get_scaling_policy

POLICIES = [QueueLengthScaler, TargetUtilisationScaler]


def stats(t: float, queue: int, busy: int, ready: int) -> QueueStats:
    return QueueStats(
        time=t,
        queue_length=queue,
        arrival_rate=0.0,
        completion_rate=0.0,
        wait_p50_s=0.0,
        wait_p99_s=0.0,
        busy_nodes=min(busy, ready),
        ready_nodes=ready,
        max_batch_size=8,
    )


bounds = st.tuples(st.integers(0, 5), st.integers(1, 10)).filter(lambda b: b[1] >= max(b[0], 1))
loads = st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 20)), min_size=1, max_size=40)


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=150, deadline=None)
@given(bound=bounds, sequence=loads, start=st.integers(0, 12))
def test_the_wanted_count_is_always_within_bounds(
    policy: type[Scaler], bound: tuple[int, int], sequence: list[tuple[int, int]], start: int
) -> None:
    scaler = policy(*bound)
    current = start
    for tick, (queue, busy) in enumerate(sequence):
        decision = scaler.decide(stats(tick * 15.0, queue, busy, max(current, 1)), current)
        assert bound[0] <= decision.wanted <= bound[1], decision
        assert decision.reason
        current = decision.wanted


def simulate(scaler: Scaler, offered_batches: float, ticks: int, start: int) -> list[int]:
    """A constant load of ``offered_batches`` node-batches in flight at once, fed through a simple model:
    each node works on one batch, the rest queue."""
    counts, current = [], start
    for tick in range(ticks):
        busy = min(current, int(offered_batches))
        queue = int(max(offered_batches - current, 0) * 8)
        current = scaler.decide(stats(tick * 15.0, queue, busy, max(current, 1)), current).wanted
        counts.append(current)
    return counts


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=150, deadline=None)
@given(offered=st.floats(0, 12), start=st.integers(1, 8))
def test_a_constant_load_never_flaps(policy: type[Scaler], offered: float, start: int) -> None:
    counts = simulate(policy(1, 8), offered, 40, start)
    moves = [b - a for a, b in itertools.pairwise(counts) if b != a]
    reversals = sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))
    assert reversals == 0, counts
    assert counts[-1] == counts[-5], counts  # settled


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=100, deadline=None)
@given(low=st.floats(0, 0.5), high=st.floats(6, 20), max_nodes=st.integers(2, 8))
def test_a_step_up_in_load_scales_up_within_one_interval(
    policy: type[Scaler], low: float, high: float, max_nodes: int
) -> None:
    scaler = policy(1, max_nodes)
    current = 1
    for tick in range(5):  # settle at the low load
        current = scaler.decide(stats(tick * 15.0, int(low * 8), 0, current), current).wanted
    assert current == 1
    step = scaler.decide(stats(75.0, int(high * 8), current, current), current)
    assert step.wanted > current, step.reason


def test_target_utilisation_holds_within_the_dead_band() -> None:
    scaler = TargetUtilisationScaler(1, 10, target=0.5, tolerance=0.1)
    assert scaler.decide(stats(0, 1, 2, 4), 4).wanted == 4  # load 0.53: 6 % over the target, inside the band
    assert scaler.decide(stats(1, 0, 4, 4), 4).wanted == 8  # load 1.0: ceil(4 x 2)


def test_target_utilisation_scales_down_only_to_the_highest_recent_recommendation() -> None:
    scaler = TargetUtilisationScaler(1, 10, target=0.5, tolerance=0.1, scale_down_window_s=60)
    assert scaler.decide(stats(0, 0, 4, 4), 4).wanted == 8
    assert scaler.decide(stats(15, 0, 0, 8), 8).wanted == 8  # the window still holds 8
    assert scaler.decide(stats(90, 0, 0, 8), 8).wanted == 1  # the window has passed


def test_queue_length_moves_one_node_at_a_time() -> None:
    scaler = QueueLengthScaler(1, 4)
    assert scaler.decide(stats(0, 100, 2, 2), 2).wanted == 3
    assert scaler.decide(stats(0, 0, 1, 3), 3).wanted == 2
    assert scaler.decide(stats(0, 10, 2, 2), 2).wanted == 2


def test_bad_bounds_and_options_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="max_nodes"):
        QueueLengthScaler(3, 2)
    with pytest.raises(InvalidInputError, match="target"):
        TargetUtilisationScaler(1, 2, target=0)


@pytest.mark.parametrize("name", ["queue_length", "target_utilisation"])
def test_the_policies_are_registered(name: str) -> None:
    assert get_scaling_policy(name, 1, 3).name == name
