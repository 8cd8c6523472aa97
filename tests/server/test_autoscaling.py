"""The autoscaler against a real server (step load up and down) and the pool's drain."""

from __future__ import annotations

import asyncio
import time

import httpx
from server_fakes import Harness, ScriptedNode
from server_harness import serving

from gpurag_server.nodes.base import NodeState


def test_a_step_load_scales_up_then_back_to_min_nodes_with_no_failed_request() -> None:
    with serving(
        workload="sleep",
        sleep_per_batch_s=0.2,
        autoscale=True,
        autoscale_interval_s=0.3,
        min_nodes=1,
        max_nodes=3,
        nodes=1,
    ) as running:

        async def step() -> list[int]:
            limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
            async with httpx.AsyncClient(base_url=running.url, timeout=60, limits=limits) as http:
                stop = time.monotonic() + 3.0

                async def client(i: int) -> list[int]:
                    codes = []
                    while time.monotonic() < stop:
                        codes.append((await http.post("/v1/rag", json={"query": f"q{i}"})).status_code)
                    return codes

                return [c for codes in await asyncio.gather(*(client(i) for i in range(64))) for c in codes]

        codes = asyncio.run(step())
        assert codes
        assert set(codes) == {200}
        during = httpx.get(f"{running.url}/v1/status").json()["autoscaler"]["decisions"]
        assert max(d["new"] for d in during) >= 2, [
            (d["queue_length"], d["old"], d["new"], d["reason"]) for d in during
        ]
        deadline = time.monotonic() + 30
        while len(httpx.get(f"{running.url}/v1/status").json()["nodes"]) != 1:
            assert time.monotonic() < deadline, "the node count did not return to min_nodes"
            time.sleep(0.1)
        decisions = httpx.get(f"{running.url}/v1/status").json()["autoscaler"]["decisions"]
        assert decisions[-1]["new"] == 1
        assert all(1 <= d["new"] <= 3 for d in decisions)
        assert all(d["reason"] for d in decisions)


def test_a_draining_node_finishes_its_batches_then_stops() -> None:
    async def scenario() -> None:
        slow = ScriptedNode("slow", delay_s=0.2)
        async with Harness([slow], max_wait_s=0.0) as h:
            items = [h.submit(f"q{i}") for i in range(16)]
            await asyncio.sleep(0.02)
            assert slow.in_flight == 2
            assert h.pool.remove(1) == [slow]
            assert slow.state is NodeState.DRAINING
            h.pool.add(1)  # a fresh node takes whatever is still queued
            replies = await asyncio.gather(*(p.future for p in items))
            assert [r.status for r in replies] == [200] * 16
            await asyncio.sleep(0.05)
            assert "slow" in h.provider.stopped
            assert slow.state is NodeState.STOPPED
            assert slow not in h.pool.nodes

    asyncio.run(scenario())


def test_nodes_still_starting_are_removed_before_ready_ones() -> None:
    async def scenario() -> None:
        async with Harness([ScriptedNode("ready")]) as h:
            h.provider.start_delay_s = 30
            (starting,) = h.pool.add(1)
            assert starting.state is NodeState.STARTING
            assert h.pool.remove(1) == [starting]
            assert [n.name for n in h.pool.nodes] == ["ready"]

    asyncio.run(scenario())


def test_the_decision_log_is_bounded() -> None:
    async def scenario() -> None:
        from gpurag.scaling import QueueLengthScaler
        from gpurag_server.autoscaler import Autoscaler

        async with Harness([ScriptedNode("a")]) as h:
            scaler = Autoscaler(QueueLengthScaler(1, 2), h.batcher, h.pool, h.metrics, interval_s=1, log_size=5)
            for _ in range(12):
                scaler.step()
            assert len(scaler.decisions) == 5

    asyncio.run(scenario())
