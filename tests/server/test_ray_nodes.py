"""Ray nodes: the ``ray`` provider serves through actors, scales, and loses nothing when an actor is killed.

One local Ray instance (2 CPUs, no dashboard, its own temp dir) serves the whole module: starting
Ray takes seconds and most of a GiB. Each actor reserves half a CPU so that three fit.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the ray provider's tests need ray (gpurag-server[ray])")
from server_harness import post_many, serving  # noqa: E402

from gpurag_server.nodes.ray import RayNode, RayProvider  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    temp_dir = tempfile.mkdtemp(prefix="gpurag-ray-")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 << 20,
        namespace="gpurag-tests",
        log_to_driver=False,
        _temp_dir=temp_dir,
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def half_a_cpu_per_actor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPURAG_RAY_NUM_CPUS", "0.5")


def ray_nodes(running: object) -> list[RayNode]:
    nodes = running.head.pool.nodes  # type: ignore[attr-defined]
    assert all(isinstance(n, RayNode) for n in nodes)
    return list(nodes)


def wait_ready(running: object, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(n.state == "ready" for n in ray_nodes(running)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} nodes became ready"
        time.sleep(0.05)


def process_running(pid: int | None) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def all_gone(pids: set[int | None], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(process_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("transfer", ["object_store", "path"])
def test_rag_answers_come_from_ray_actors_and_match_the_pipeline(
    transfer: str, small_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpurag.rag.pipeline import RAGPipeline

    monkeypatch.setenv("GPURAG_RAY_CORPUS_TRANSFER", transfer)
    queries = [f"How does {topic} work in Python?" for topic in ("a for loop", "the with statement", "yield", "import")]
    expected = RAGPipeline.from_index(small_corpus).answer_batch(queries, 3)
    with serving(node_provider="ray", nodes=2, corpus=small_corpus, max_wait_s=0.01) as running:
        provider = running.head.provider
        assert isinstance(provider, RayProvider)
        wait_ready(running, 2)
        assert (provider.corpus_load_s is not None) == (transfer == "object_store")
        responses = asyncio.run(post_many(running.url, [{"query": q, "k": 3} for q in queries * 3]))
        assert [r.status_code for r in responses] == [200] * len(responses)
        for response, answer in zip(responses, expected * 3, strict=True):
            body = response.json()
            assert body["node"].startswith("ray-")
            assert [s["id"] for s in body["sources"]] == [p.id for p in answer.sources]
            assert body["answer"] == answer.answer
        vectors = asyncio.run(post_many(running.url, [{"texts": ["list comprehension"], "k": 2}], route="/v1/search"))
        assert vectors[0].status_code == 200
        assert len(vectors[0].json()["results"][0]["ids"]) == 2
        nodes = ray_nodes(running)
        pids = {n.pid for n in nodes}
        assert None not in pids
        assert os.getpid() not in pids
        assert len(pids) == 2
        assert {r.json()["node"] for r in responses} == {n.name for n in nodes}
        assert all(process_running(pid) for pid in pids)
    assert all_gone(pids), "stopping the server left its actors alive"


def test_an_actor_killed_under_load_loses_nothing() -> None:
    with serving(node_provider="ray", nodes=2, workload="sleep", sleep_per_batch_s=0.05, max_wait_s=0.01) as running:
        wait_ready(running, 2)
        sent = 300
        killed: list[RayNode] = []

        async def scenario() -> list[httpx.Response | BaseException]:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(base_url=running.url, timeout=60, limits=limits) as http:
                tasks = []
                for i in range(sent):
                    tasks.append(asyncio.create_task(http.post("/v1/rag", json={"query": f"q{i}"})))
                    await asyncio.sleep(0.002)
                    if i == sent // 3:
                        victim = next(n for n in ray_nodes(running) if n.in_flight and n.pid)
                        assert victim.pid is not None
                        os.kill(victim.pid, signal.SIGKILL)
                        killed.append(victim)
                return await asyncio.gather(*tasks, return_exceptions=True)

        responses = asyncio.run(scenario())
        answered = [r for r in responses if isinstance(r, httpx.Response)]
        assert len(answered) == sent, [r for r in responses if not isinstance(r, httpx.Response)][:3]
        ok = sum(1 for r in answered if r.status_code == 200)
        explicit = sum(1 for r in answered if r.status_code in (503, 504) and r.json()["error"]["type"])
        assert ok + explicit == sent
        assert ok == sent  # one death: every request the actor held ran again on the other
        assert running.head.batcher.requeued > 0
        assert killed[0].death is not None
        assert "died" in killed[0].death
        deadline = time.monotonic() + 60
        while sum(n.state == "ready" for n in ray_nodes(running)) < 2:
            assert time.monotonic() < deadline, "the dead actor was not replaced"
            time.sleep(0.1)
        assert killed[0] not in ray_nodes(running)


def test_a_frozen_actor_is_given_up_when_it_stops_answering_pings() -> None:
    with serving(
        node_provider="ray", nodes=1, workload="zero", heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0
    ) as running:
        node = ray_nodes(running)[0]
        assert node.pid is not None
        os.kill(node.pid, signal.SIGSTOP)  # alive but silent
        try:
            deadline = time.monotonic() + 20
            while node.death is None:
                assert time.monotonic() < deadline, "a frozen actor was never declared dead"
                time.sleep(0.05)
            assert "ping" in node.death
            response = httpx.post(f"{running.url}/v1/rag", json={"query": "still served"}, timeout=60)
            assert response.status_code == 200
            assert response.json()["node"] != node.name
        finally:
            os.kill(node.pid, signal.SIGKILL)


def test_a_step_load_scales_ray_nodes_up_then_back_down_with_no_failed_request() -> None:
    with serving(
        node_provider="ray",
        workload="sleep",
        sleep_per_batch_s=0.2,
        autoscale=True,
        autoscale_interval_s=0.5,
        min_nodes=1,
        max_nodes=3,
        nodes=1,
    ) as running:
        scaled_pids: set[int | None] = set()
        served_by: set[str] = set()

        async def step() -> list[int]:
            limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
            async with httpx.AsyncClient(base_url=running.url, timeout=60, limits=limits) as http:
                stop = time.monotonic() + 6.0

                async def client(i: int) -> list[int]:
                    codes = []
                    while time.monotonic() < stop:
                        response = await http.post("/v1/rag", json={"query": f"q{i}"})
                        codes.append(response.status_code)
                        if response.status_code == 200:
                            served_by.add(response.json()["node"])
                    return codes

                async def sample_pids() -> list[int]:
                    while time.monotonic() < stop:
                        scaled_pids.update(n.pid for n in ray_nodes(running) if n.pid)
                        await asyncio.sleep(0.1)
                    return []

                clients = [client(i) for i in range(64)]
                return [c for codes in await asyncio.gather(sample_pids(), *clients) for c in codes]

        codes = asyncio.run(step())
        assert codes
        assert set(codes) == {200}
        assert len(scaled_pids) >= 2  # actors were added (how many depends on this machine's speed)
        status = httpx.get(f"{running.url}/v1/status").json()
        assert max(d["new"] for d in status["autoscaler"]["decisions"]) >= 2
        assert len(served_by) >= 2, served_by  # the nodes it added took work
        deadline = time.monotonic() + 30
        while len(httpx.get(f"{running.url}/v1/status").json()["nodes"]) != 1:
            assert time.monotonic() < deadline, "the node count did not return to min_nodes"
            time.sleep(0.1)
        left = {n.pid for n in ray_nodes(running)}
        assert all(process_running(pid) for pid in left)
        assert all_gone(scaled_pids - left), "drained actors were forgotten but not stopped"


def test_an_actor_that_cannot_build_its_workload_fails_its_start_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GPURAG_RAY_CORPUS_TRANSFER", "path")
    with serving(wait_ready=False, node_provider="ray", nodes=1, corpus=tmp_path / "missing") as running:
        deadline = time.monotonic() + 60
        while running.head.pool.last_error is None:
            assert time.monotonic() < deadline, "the failed start was never reported"
            time.sleep(0.1)
        assert "missing" in running.head.pool.last_error
        assert httpx.get(f"{running.url}/readyz").status_code == 503
        assert httpx.get(f"{running.url}/healthz").status_code == 200
