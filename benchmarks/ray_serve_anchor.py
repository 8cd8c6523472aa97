"""gpurag's server against Ray Serve, same work, same load, one run on this machine.

Ray Serve is configured fairly: `@serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)`,
``max_ongoing_requests`` (512) above every connection count, access logs off, the same replica
count as gpurag's nodes, the replica's CPU work off its event loop. Three scenarios:

- ``zero``: the work costs nothing (the servers' own overhead);
- ``rag``: the default RAG pipeline (all-MiniLM-L6-v2, default corpus, extractive generator);
- ``kill``: two replicas / two nodes (Ray actors, then processes) doing 50 ms batches under
  open-loop load; one replica's process is SIGKILLed mid-run; each side's failed requests are counted.

For ``zero`` and ``rag`` every server is up at once (gpurag with each provider of ``--providers``,
one node, and Ray Serve, one replica) and the measurements alternate between them: saturation
throughput from ``wrk`` (closed loop, ``--repeats`` runs a server), then latency at common rates
from `gpurag load`'s open loop (Poisson arrivals fixed in advance, latency from the intended send
time) at fractions of the lowest saturation, ``--repeats`` runs a server and rate; medians, with
every run kept. Writes ``benchmarks/results/ray_serve_anchor.{json,md}``.

Run: ``make ray-serve-anchor`` (installs ``gpurag-server[ray-serve]``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
#: A keep-alive connection idle longer than this is not reused (uvicorn closes them after 5 s).
IDLE_REUSE_S = 4.0
WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '{"query": "What does the with statement do?", "k": 3}'
wrk.headers["Content-Type"] = "application/json"
"""


# --- the Ray Serve side (run in its own process: ``--ray-serve-app``) ----------------------------


def ray_serve_app(workload: str, replicas: int, port: int, num_cpus: float) -> None:
    """Start a local Ray, deploy the workload on Ray Serve at 127.0.0.1:port, serve until SIGTERM."""
    import ray
    from ray import serve
    from starlette.requests import Request

    temp_dir = tempfile.mkdtemp(prefix="gpurag-rs-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)

    @serve.deployment(
        num_replicas=replicas,
        max_ongoing_requests=512,
        ray_actor_options={"num_cpus": num_cpus},
        logging_config={"enable_access_log": False},
    )
    class Replica:
        def __init__(self, workload: str) -> None:
            self.workload = workload
            self.pipeline: Any = None
            if workload == "rag":
                from gpurag.rag.pipeline import RAGPipeline

                self.pipeline = RAGPipeline.default()

        def _answer(self, queries: list[str], k: int) -> list[dict[str, Any]]:
            answers = self.pipeline.answer_batch(queries, k)
            return [
                {"query": q, "answer": a.answer, "sources": [{"id": p.id, "source": p.source} for p in a.sources]}
                for q, a in zip(queries, answers, strict=True)
            ]

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)
        async def handle(self, queries: list[str]) -> list[dict[str, Any]]:
            if self.workload == "rag":
                return await asyncio.to_thread(self._answer, queries, 3)
            if self.workload == "sleep":
                await asyncio.sleep(0.05)
            return [{"query": q, "answer": "", "sources": [], "pid": os.getpid()} for q in queries]

        async def __call__(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            result: dict[str, Any] = await self.handle(body["query"])
            return result

    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    serve.run(Replica.bind(workload), route_prefix="/", logging_config={"enable_access_log": False})
    print("READY", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


# --- servers as subprocesses -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A server subprocess: ``kind`` gpurag (provider local, process or ray) or rayserve."""

    def __init__(self, kind: str, workload: str, nodes: int, provider: str = "local") -> None:
        self.kind, self.workload, self.nodes, self.provider = kind, workload, nodes, provider
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.route = "/v1/rag" if kind == "gpurag" else "/"
        self.process: subprocess.Popen[bytes] | None = None
        self.temp_dir = tempfile.mkdtemp(prefix="gpurag-anchor-")

    @property
    def label(self) -> str:
        if self.kind == "rayserve":
            return f"Ray Serve ({self.nodes} replica{'s' if self.nodes > 1 else ''})"
        return f"gpurag, {self.provider} provider ({self.nodes} node{'s' if self.nodes > 1 else ''})"

    def start(self) -> float:
        started = time.monotonic()
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        log = open(Path(self.temp_dir) / "server.log", "wb")  # noqa: SIM115 - closed with the process
        if self.kind == "gpurag":
            env.update(
                GPURAG_WORKLOAD=self.workload if self.workload != "sleep" else "sleep",
                GPURAG_SLEEP_PER_BATCH_S="0.05",
                GPURAG_NODE_PROVIDER=self.provider,
                GPURAG_NODES=str(self.nodes),
                GPURAG_PORT=str(self.port),
                GPURAG_MAX_QUEUE_LENGTH="4096",
                GPURAG_RAY_NUM_CPUS=str(1.0 / self.nodes),
            )
            command = [str(BIN / "gpurag"), "serve"]
        else:
            command = [sys.executable, __file__, "--ray-serve-app", self.workload, str(self.nodes), str(self.port)]
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(600)
        return time.monotonic() - started

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.post(self.url + self.route, json={"query": "warm up", "k": 3}, timeout=30)
                if response.status_code == 200:
                    for _ in range(20):  # warm every replica
                        httpx.post(self.url + self.route, json={"query": "warm up", "k": 3}, timeout=30)
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.label} did not answer within {timeout_s} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return (Path(self.temp_dir) / "server.log").read_text(errors="replace")[-2000:]

    def replica_pids(self) -> list[int]:
        """Process ids of the Ray actors that do the work (Serve replicas or gpurag node actors)."""
        assert self.process is not None
        if self.kind == "gpurag" and self.provider == "process":
            return [
                pid for pid in descendants(self.process.pid) if "-m gpurag_server.nodes.worker_process" in _cmdline(pid)
            ]
        title = "ray::ServeReplica" if self.kind == "rayserve" else "ray::NodeActor"
        return [pid for pid in descendants(self.process.pid) if _cmdline(pid).startswith(title)]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT if self.kind == "gpurag" else signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    startup = server.start()
    print(f"  {server.label} up in {startup:.1f} s", flush=True)
    try:
        yield server
    finally:
        server.stop()


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --- load ----------------------------------------------------------------------------------------


def wrk(server: Server, connections: int, duration_s: int) -> dict[str, Any]:
    """Closed loop: requests/s, p50/p99 and the requests that failed (non-2xx, socket errors)."""
    script = Path(server.temp_dir) / "post.lua"
    script.write_text(WRK_SCRIPT)
    threads = min(2, connections)
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration_s}s", "--timeout", "60s"]
    out = subprocess.run(
        [*command, "--latency", "-s", str(script), server.url + server.route],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    return {
        "connections": connections,
        "requests": total,
        "rate": rate,
        "p50_ms": _wrk_ms(out, "50%"),
        "p99_ms": _wrk_ms(out, "99%"),
        "failed": failed,
    }


def _wrk_ms(out: str, name: str) -> float:
    match = re.search(rf"^\s+{re.escape(name)}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    assert match is not None, out
    return float(match.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]


class RawClient:
    """HTTP/1.1 POSTs on raw asyncio streams, for the kill scenario (a fresh connection a request, and
    a SIGKILL at a set time); it reads Content-Length and chunked bodies (Ray Serve's proxy sends
    chunked ones). The open-loop rows use `gpurag load`."""

    def __init__(self, url: str, route: str, keep_alive: bool) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port, self.route, self.keep_alive = (
            parsed.hostname or "127.0.0.1",
            parsed.port or 80,
            route,
            keep_alive,
        )
        self.idle: list[tuple[float, tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = []

    async def post(self, body: bytes) -> int:
        while self.idle and time.monotonic() - self.idle[-1][0] > IDLE_REUSE_S:
            self.idle.pop()[1][1].close()  # the server may be closing it: its keep-alive ran out
        connection = self.idle.pop()[1] if self.idle else await asyncio.open_connection(self.host, self.port)
        reader, writer = connection
        closing = "" if self.keep_alive else "Connection: close\r\n"
        head = f"POST {self.route} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n{closing}"
        try:
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            response = await reader.readuntil(b"\r\n\r\n")
            status, lowered = int(response[9:12]), response.lower()
            if b"transfer-encoding: chunked" in lowered:
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    await reader.readexactly(size + 2)
                await reader.readuntil(b"\r\n")
            else:
                found = re.search(rb"content-length:\s*(\d+)", lowered)
                await reader.readexactly(int(found.group(1)) if found else 0)
        except BaseException:
            writer.close()
            raise
        if self.keep_alive and b"connection: close" not in lowered:
            self.idle.append((time.monotonic(), connection))
        else:
            writer.close()
        return status

    def close(self) -> None:
        for _, (_, writer) in self.idle:
            writer.close()


async def arrivals(
    server: Server,
    rate: float,
    duration_s: float,
    *,
    poisson: bool,
    keep_alive: bool,
    kill_at_s: float | None = None,
    victim: int | None = None,
) -> dict[str, Any]:
    """Requests at send times fixed in advance, each its own task, latency from its intended send time.

    The same `RawClient` drives both servers. With ``kill_at_s``, SIGKILL ``victim`` then.
    Every request ends as a status or an exception's name: nothing goes uncounted.
    """
    rng = np.random.default_rng(0)
    gaps = (
        rng.exponential(1 / rate, int(rate * duration_s * 1.2))
        if poisson
        else np.full(int(rate * duration_s), 1 / rate)
    )
    offsets = np.cumsum(gaps) - gaps[0]
    offsets = offsets[offsets < duration_s]
    statuses: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    late = 0
    client = RawClient(server.url, server.route, keep_alive)
    try:

        async def one(i: int, due: float) -> None:
            body = json.dumps({"query": f"question {i}", "k": 3}).encode()
            try:
                status = await asyncio.wait_for(client.post(body), 120)
                statuses[str(status)] += 1
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                statuses[type(exc).__name__] += 1
            latencies.append(time.perf_counter() - due)

        start = time.perf_counter()
        tasks, killed = [], False
        for i, offset in enumerate(offsets):
            due = start + float(offset)
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.01:
                late += 1
            tasks.append(asyncio.create_task(one(i, due)))
            if kill_at_s is not None and victim is not None and not killed and offset >= kill_at_s:
                os.kill(victim, signal.SIGKILL)
                killed = True
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    finally:
        client.close()
    ok = sum(v for k, v in statuses.items() if k.startswith("2"))
    p50, p99 = np.percentile(np.array(latencies), [50, 99]) * 1e3
    return {
        "rate": rate,
        "sent": len(tasks),
        "ok": ok,
        "failed": len(tasks) - ok,
        "statuses": dict(statuses),
        "throughput": ok / elapsed,
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "late_sends": late,
        "killed_pid": victim if killed else None,
    }


# --- scenarios -----------------------------------------------------------------------------------


def mean_batch(server: Server) -> tuple[float, float] | None:
    """gpurag's batch-size sum and count from ``/metrics`` (None for Ray Serve)."""
    if server.kind != "gpurag":
        return None
    found = dict.fromkeys(("gpurag_batch_size_sum", "gpurag_batch_size_count"), 0.0)
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found["gpurag_batch_size_sum"], found["gpurag_batch_size_count"]


def side_by_side(
    workload: str, providers: list[str], connections: list[int], fractions: list[float], repeats: int, duration_s: int
) -> dict[str, Any]:
    """Every server up at once; wrk at each connection count, then the open loop at ``fractions`` of the
    lowest saturation, the servers alternating (reversed every other repeat); medians and every run.
    """
    from gpurag_server.load import LoadSpec, run_load

    servers = [Server("gpurag", workload, 1, provider=provider) for provider in providers]
    servers.append(Server("rayserve", workload, 1))
    result: dict[str, Any] = {"workload": workload, "repeats": repeats, "servers": {}}

    def order(repeat: int) -> list[Server]:
        return servers if repeat % 2 == 0 else servers[::-1]

    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(running(server))
            result["servers"][key(server)] = {"label": server.label, "wrk": [], "open_loop": []}
        for conns in connections:
            runs: dict[str, list[dict[str, Any]]] = {key(server): [] for server in servers}
            for repeat in range(repeats):
                for server in order(repeat):
                    load_average, before = os.getloadavg()[0], mean_batch(server)
                    measured = wrk(server, conns, duration_s)
                    after = mean_batch(server)
                    if before is not None and after is not None and after[1] > before[1]:
                        measured["mean_batch"] = (after[0] - before[0]) / (after[1] - before[1])
                    measured["load_average"] = load_average
                    runs[key(server)].append(measured)
                    print(f"    {server.label}: wrk {conns} conns #{repeat}: {measured}", flush=True)
            for name, repeated in runs.items():
                result["servers"][name]["wrk"].append(_medians(repeated, "rate", connections=conns))
        saturation = [max(w["rate"] for w in entry["wrk"]) for entry in result["servers"].values()]
        result["rates"] = [round(min(saturation) * f, 1) for f in fractions]
        for rate in result["rates"]:
            runs = {key(server): [] for server in servers}
            for repeat in range(repeats):
                for server in order(repeat):
                    load_average = os.getloadavg()[0]
                    spec = LoadSpec(url=server.url, route=server.route, rate=rate, duration_s=duration_s, seed=repeat)
                    spec.status_route = None  # no server is polled while measured
                    spec.max_connections = 512
                    report = run_load(spec)
                    ok = sum(v for k, v in report.statuses.items() if k.startswith("2"))
                    runs[key(server)].append(
                        {
                            "sent": report.sent,
                            "failed": report.sent - ok,
                            "rate": ok / report.elapsed_s,
                            "p50_ms": report.latency_s["p50"] * 1e3,
                            "p99_ms": report.latency_s["p99"] * 1e3,
                            "late_sends": report.late_sends,
                            "load_average": load_average,
                        }
                    )
                    print(f"    {server.label} {rate}/s #{repeat}: {runs[key(server)][-1]}", flush=True)
            for name, repeated in runs.items():
                result["servers"][name]["open_loop"].append(_medians(repeated, "rate", offered=rate))
    return result


def key(server: Server) -> str:
    return f"{server.kind}-{server.provider}" if server.kind == "gpurag" else server.kind


def _medians(runs: list[dict[str, Any]], rate: str, **fields: Any) -> dict[str, Any]:
    """Medians of ``runs``' rate, p50 and p99; summed failures and late sends; every run kept."""
    out: dict[str, Any] = dict(fields)
    for name in (rate, "p50_ms", "p99_ms"):
        out[name] = statistics.median(run[name] for run in runs)
    out["failed"] = sum(run["failed"] for run in runs)
    if "late_sends" in runs[0]:
        out["late_sends"] = sum(run["late_sends"] for run in runs)
    batches = [run["mean_batch"] for run in runs if "mean_batch" in run]
    if batches:
        out["mean_batch"] = statistics.median(batches)
    out["runs"] = runs
    return out


def kill_under_load(providers: list[str], rate: float, duration_s: float, kill_at_s: float) -> dict[str, Any]:
    """Two replicas/nodes, 50 ms batches, constant ``rate``; SIGKILL one replica at ``kill_at_s``."""
    result: dict[str, Any] = {"rate": rate, "duration_s": duration_s, "kill_at_s": kill_at_s, "servers": {}}
    servers = [Server("gpurag", "sleep", 2, provider=provider) for provider in providers]
    for server in [*servers, Server("rayserve", "sleep", 2)]:
        with running(server):
            pids = server.replica_pids()
            assert len(pids) >= 2, f"{server.label}: replica processes not found ({pids})"
            measured = asyncio.run(
                arrivals(server, rate, duration_s, poisson=False, keep_alive=False, kill_at_s=kill_at_s, victim=pids[0])
            )
            time.sleep(5)
            measured["replicas_after"] = len(server.replica_pids())
            result["servers"][key(server)] = {"label": server.label, **measured}
            print(f"    {server.label}: {measured}", flush=True)
    return result


# --- report --------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    lines = []
    for name in ("zero", "rag"):
        block = results.get(name)
        if not block:
            continue
        lines += [
            f"**{name}**: every server up at once, runs alternating; wrk (closed loop) {results['duration_s']} s a "
            f"run; open loop (`gpurag load`, Poisson, latency from the intended send time) {results['duration_s']} s "
            f"a run at fractions of the lowest saturation; medians of {block['repeats']} runs (each run's figure in "
            "brackets); mean batch: gpurag's, from its `/metrics`",
            "",
            "| server | load | req/s | p50 ms | p99 ms | failed | mean batch | load average |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for entry in block["servers"].values():
            for row, load in [(w, f"wrk {w['connections']} conns") for w in entry["wrk"]] + [
                (o, f"open loop {o['offered']:.1f}/s") for o in entry["open_loop"]
            ]:
                runs = row["runs"]
                batch = f"{row['mean_batch']:.2f}" if "mean_batch" in row else ""
                lines.append(
                    f"| {entry['label']} | {load} | {row['rate']:.1f} ({_each(runs, 'rate')}) | {row['p50_ms']:.1f} "
                    f"| {row['p99_ms']:.1f} ({_each(runs, 'p99_ms')}) | {row['failed']} | {batch} "
                    f"| {_each(runs, 'load_average')} |"
                )
        lines.append("")
    kill = results.get("kill")
    if kill:
        lines += [
            f"**kill** (2 replicas/nodes, 50 ms batches, {kill['rate']} req/s at a constant rate, "
            f"a fresh connection each, for {kill['duration_s']} s, "
            f"one replica's process SIGKILLed at {kill['kill_at_s']} s)",
            "",
            "| server | sent | 2xx | failed | statuses | p99 ms | replicas after |",
            "|---|---|---|---|---|---|---|",
        ]
        for entry in kill["servers"].values():
            lines.append(
                f"| {entry['label']} | {entry['sent']} | {entry['ok']} | {entry['failed']} | "
                f"{entry['statuses']} | {entry['p99_ms']:.1f} | {entry['replicas_after']} |"
            )
    return "\n".join(lines)


def _each(runs: list[dict[str, Any]], name: str) -> str:
    return ", ".join(f"{run[name]:.1f}" for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ray-serve-app", nargs=3, metavar=("WORKLOAD", "REPLICAS", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=int, default=10, help="Seconds of each load run.")
    parser.add_argument("--scenarios", default="zero,rag,kill", help="Comma-separated: zero, rag, kill.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per server (and rate) of zero and rag.")
    parser.add_argument(
        "--providers", default="local,process,ray", help="gpurag's node providers, each a server of zero and rag."
    )
    parser.add_argument("--kill-providers", default="ray,process", help="gpurag's node providers of kill.")
    args = parser.parse_args()
    if args.ray_serve_app:
        workload, replicas, port = args.ray_serve_app
        ray_serve_app(workload, int(replicas), int(port), 1.0 / int(replicas))
        return
    sys.path.insert(0, str(HERE))
    import ray

    from machine import cpu_model

    avx512 = "avx512f" in Path("/proc/cpuinfo").read_text()
    results: dict[str, Any] = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, avx512f {'yes' if avx512 else 'no'}",
        "ray": ray.__version__,
        "python": sys.version.split()[0],
        "duration_s": args.duration,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    scenarios = args.scenarios.split(",")
    providers = args.providers.split(",")
    if "rag" in scenarios:
        from gpurag_server.serve import prepare_default_corpus
        from gpurag_server.settings import ServerSettings

        prepare_default_corpus(ServerSettings())
    for workload, connections in (("zero", [32, 128]), ("rag", [32])):
        if workload in scenarios:
            print(f"{workload}: every server up, interleaved", flush=True)
            results[workload] = side_by_side(
                workload, providers, connections, [0.25, 0.5, 0.8], args.repeats, args.duration
            )
            write(results)
    if "kill" in scenarios:
        print("a replica killed under load", flush=True)
        results["kill"] = kill_under_load(args.kill_providers.split(","), 100.0, 2 * args.duration, args.duration / 2)
    results["load_average_after"] = os.getloadavg()
    print(write(results))


def write(results: dict[str, Any]) -> str:
    """Write the json and md results (also after each scenario: a later failure keeps the earlier ones)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray_serve_anchor.json").write_text(json.dumps(results, indent=2) + "\n")
    text = f"# gpurag vs Ray Serve {results['ray']}\n\n"
    text += f"{results['machine']}; Python {results['python']}; {results['when']}\n\n"
    text += table(results) + "\n"
    (RESULTS / "ray_serve_anchor.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
