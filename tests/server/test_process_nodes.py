"""Process nodes on loopback: they answer, and a node SIGKILLed under load loses no request."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
from server_harness import serving

from gpurag_server.nodes.process import ProcessNode, ProcessProvider
from gpurag_server.settings import ServerSettings


def test_a_node_killed_under_load_loses_nothing() -> None:
    with serving(
        node_provider="process", nodes=2, workload="sleep", sleep_per_batch_s=0.05, max_wait_s=0.01
    ) as running:
        sent = 300

        async def scenario() -> list[httpx.Response | BaseException]:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(base_url=running.url, timeout=60, limits=limits) as http:
                tasks = []
                for i in range(sent):
                    tasks.append(asyncio.create_task(http.post("/v1/rag", json={"query": f"q{i}"})))
                    await asyncio.sleep(0.002)
                    if i == sent // 3:
                        victim = next(n for n in running.head.pool.nodes if isinstance(n, ProcessNode) and n.in_flight)
                        os.kill(victim.pid, signal.SIGKILL)
                return await asyncio.gather(*tasks, return_exceptions=True)

        responses = asyncio.run(scenario())
        answered = [r for r in responses if isinstance(r, httpx.Response)]
        assert len(answered) == sent, [r for r in responses if not isinstance(r, httpx.Response)][:3]
        ok = sum(1 for r in answered if r.status_code == 200)
        explicit = sum(1 for r in answered if r.status_code in (503, 504) and r.json()["error"]["type"])
        assert ok + explicit == sent
        assert ok == sent  # one death: every request it held ran again elsewhere
        assert running.head.batcher.requeued > 0
        deadline = time.monotonic() + 20
        while sum(n["state"] == "ready" for n in httpx.get(f"{running.url}/v1/status").json()["nodes"]) < 2:
            assert time.monotonic() < deadline, "the dead node was not replaced"
            time.sleep(0.1)


def test_a_silent_node_is_given_up_after_the_heartbeat_timeout() -> None:
    with serving(
        node_provider="process", nodes=1, workload="zero", heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5
    ) as running:
        node = running.head.pool.nodes[0]
        assert isinstance(node, ProcessNode)
        assert node.pid is not None
        os.kill(node.pid, signal.SIGSTOP)  # alive but silent
        deadline = time.monotonic() + 10
        while node.death is None:
            assert time.monotonic() < deadline, "a silent node was never declared dead"
            time.sleep(0.05)
        assert "heartbeat" in node.death
        response = httpx.post(f"{running.url}/v1/rag", json={"query": "still served"}, timeout=30)
        assert response.status_code == 200
        assert response.json()["node"] != node.name


def test_nodes_are_spread_over_the_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    provider = ProcessProvider(ServerSettings())
    assert [provider.create().gpu for _ in range(5)] == ["3", "5", "6", "3", "5"]  # type: ignore[attr-defined]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert ProcessProvider(ServerSettings()).create().gpu is None  # type: ignore[attr-defined]
