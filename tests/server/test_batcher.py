"""The batcher: size and time flush, the idle rule, cancellation, deadlines, split-on-failure, requeue."""

from __future__ import annotations

import asyncio
import time

import pytest
from server_fakes import Harness, ScriptedNode

from gpurag_server.queueing import Ledger, PendingItem, QueueFullError, RequestQueue
from gpurag_server.workload import WorkItem


def test_a_full_batch_leaves_at_once() -> None:
    async def scenario() -> None:
        node = ScriptedNode("a")
        async with Harness([node], max_wait_s=30) as h:
            items = [h.submit(f"q{i}") for i in range(8)]
            started = time.monotonic()
            replies = await asyncio.gather(*(p.future for p in items))
            assert time.monotonic() - started < 5
            assert node.batches == [[f"q{i}" for i in range(8)]]
            assert [r.outcome.value["echo"] for r in replies if r.outcome and r.outcome.value] == [
                f"q{i}" for i in range(8)
            ]
            assert {r.batch_size for r in replies} == {8}

    asyncio.run(scenario())


def test_nineteen_requests_make_batches_of_eight_eight_and_three() -> None:
    async def scenario() -> None:
        node = ScriptedNode("a")
        async with Harness([node], max_wait_s=0.2) as h:
            items = [h.submit(f"q{i}") for i in range(19)]
            await asyncio.gather(*(p.future for p in items))
            assert [len(b) for b in node.batches] == [8, 8, 3]
            assert [q for b in node.batches for q in b] == [f"q{i}" for i in range(19)]

    asyncio.run(scenario())


def test_a_partial_batch_waits_max_wait_s_then_leaves() -> None:
    async def scenario() -> None:
        node = ScriptedNode("a")
        async with Harness([node], max_wait_s=0.3) as h:
            started = time.monotonic()
            items = [h.submit(f"q{i}") for i in range(3)]
            await asyncio.sleep(0.15)
            assert node.batches == []
            await asyncio.gather(*(p.future for p in items))
            assert time.monotonic() - started >= 0.3
            assert node.batches == [["q0", "q1", "q2"]]

    asyncio.run(scenario())


def test_an_idle_node_takes_a_request_without_waiting() -> None:
    async def scenario() -> None:
        node = ScriptedNode("a")
        async with Harness([node], max_wait_s=30, dispatch_when_idle=True) as h:
            started = time.monotonic()
            await h.submit("alone").future
            assert time.monotonic() - started < 1
            assert node.batches == [["alone"]]

    asyncio.run(scenario())


def test_a_node_holds_at_most_two_batches_and_the_rest_waits_in_the_queue() -> None:
    async def scenario() -> None:
        node = ScriptedNode("a", delay_s=0.05)
        async with Harness([node], max_wait_s=0.0) as h:
            items = [h.submit(f"q{i}") for i in range(40)]
            await asyncio.sleep(0.01)
            assert node.in_flight == 2
            assert len(h.queue) == 40 - 16
            await asyncio.gather(*(p.future for p in items))
            assert node.most_running <= 2

    asyncio.run(scenario())


def test_requests_whose_client_left_never_reach_a_node() -> None:
    async def scenario() -> None:
        node = ScriptedNode("a")
        async with Harness([node], start=0, max_wait_s=0.0) as h:
            items = [h.submit(f"q{i}") for i in range(6)]
            for pending in items[::2]:
                pending.future.cancel()
            h.pool.add(1)
            await asyncio.gather(*(p.future for p in items[1::2]))
            assert node.batches == [["q1", "q3", "q5"]]

    asyncio.run(scenario())


def test_requests_past_their_deadline_are_answered_504_before_dispatch() -> None:
    async def scenario() -> None:
        node = ScriptedNode("a")
        async with Harness([node], start=0, max_wait_s=0.0) as h:
            late = h.submit("late", timeout_s=0.01)
            fine = h.submit("fine", timeout_s=30)
            await asyncio.sleep(0.05)
            h.pool.add(1)
            assert (await late.future).status == 504
            assert (await fine.future).status == 200
            assert node.batches == [["fine"]]

    asyncio.run(scenario())


def test_a_failing_batch_is_split_and_only_the_bad_request_fails() -> None:
    async def scenario() -> None:
        node = ScriptedNode("a")
        async with Harness([node], max_wait_s=30) as h:
            queries = ["q0", "q1", "q2", "q3", "q4", "bad", "q6", "q7"]
            items = [h.submit(q) for q in queries]
            replies = await asyncio.gather(*(p.future for p in items))
            assert [r.status for r in replies] == [200] * 5 + [500] + [200] * 2
            assert "bad query" in replies[5].message
            sizes = [len(b) for b in node.batches]
            assert sizes == [8, 4, 4, 1, 1, 1, 1]  # whole, halves once, then the failing half one by one

    asyncio.run(scenario())


def test_a_dead_nodes_batch_runs_again_elsewhere_once() -> None:
    async def scenario() -> None:
        doomed, healthy = ScriptedNode("doomed", dies=True), ScriptedNode("healthy")
        async with Harness([doomed, healthy], max_wait_s=30) as h:
            items = [h.submit(f"q{i}") for i in range(8)]
            replies = await asyncio.gather(*(p.future for p in items))
            assert [r.status for r in replies] == [200] * 8
            assert doomed.batches
            assert healthy.batches[0] == [f"q{i}" for i in range(8)]
            assert h.batcher.requeued == 8
            assert len(h.batcher.ledger) == 0

    asyncio.run(scenario())


def test_a_request_whose_second_node_dies_too_gets_503_with_the_reason() -> None:
    async def scenario() -> None:
        first, second = ScriptedNode("first", dies=True), ScriptedNode("second", dies=True)
        async with Harness([first, second], max_wait_s=30) as h:
            items = [h.submit(f"q{i}") for i in range(8)]
            replies = await asyncio.gather(*(p.future for p in items))
            assert {r.status for r in replies} == {503}
            assert "second was killed" in replies[0].message

    asyncio.run(scenario())


def test_the_ledger_ignores_a_late_result_from_a_node_given_up() -> None:
    loop = asyncio.new_event_loop()
    try:
        pending = PendingItem(WorkItem("rag", {"query": "q"}), loop.create_future(), 0.0, 10.0)
        ledger = Ledger()
        ledger.record(pending, "old")
        pending.attempt = 1
        ledger.record(pending, "new")
        assert not ledger.settle(pending, "old", 0)
        assert ledger.settle(pending, "new", 1)
        assert not ledger.settle(pending, "new", 1)
    finally:
        loop.close()


def test_the_queue_refuses_arrivals_beyond_capacity_but_takes_requeued_items() -> None:
    async def scenario() -> None:
        queue = RequestQueue(2)
        loop = asyncio.get_running_loop()
        items = [PendingItem(WorkItem("rag", {"query": str(i)}), loop.create_future(), 0.0, 1.0) for i in range(4)]
        queue.put(items[0])
        queue.put(items[1])
        with pytest.raises(QueueFullError, match="max_queue_length=2"):
            queue.put(items[2])
        queue.requeue_front([items[2], items[3]])
        assert [p.item.payload["query"] for p in queue.take(10)] == ["2", "3", "0", "1"]

    asyncio.run(scenario())
