"""`gpurag load`: an open- or closed-loop HTTP load generator that does not hide queueing.

Open loop: send times are fixed before the run (constant or Poisson arrivals); each request is
its own task, its latency counts from its intended send time into an HDR histogram, and a send
that starts more than 1 ms late is counted, never dropped. Closed loop: N clients, each sending
its next request when the previous one is answered. A small keep-alive HTTP/1.1 client on raw
asyncio streams keeps the generator's own cost low; `/v1/status` is sampled for the plot.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time
import urllib.parse
from pathlib import Path
from typing import Any

import orjson

#: A send this much past its intended time counts as late.
LATE_S = 0.001
#: An idle connection older than this is not reused (uvicorn closes idle ones after 5 s).
KEEP_ALIVE_S = 3.0
DEFAULT_QUERIES = (
    "What does the with statement do?",
    "How does a try statement handle exceptions?",
    "What is a generator expression?",
    "How are default argument values evaluated?",
    "What does the global statement do?",
    "How does a for loop work?",
)


@dataclasses.dataclass
class LoadSpec:
    """What to send: open loop at ``rate`` requests/s, or closed loop with ``clients``."""

    url: str = "http://127.0.0.1:8000"
    route: str = "/v1/rag"
    rate: float | None = None
    arrivals: str = "poisson"
    clients: int | None = None
    duration_s: float = 10.0
    queries: list[str] | None = None
    k: int = 3
    api_key: str | None = None
    max_connections: int = 256
    plot: Path | None = None
    sample_interval_s: float = 0.25
    #: Route sampled every ``sample_interval_s`` for the plot (gpurag's status); None samples nothing,
    #: for servers that have no such route.
    status_route: str | None = "/v1/status"
    seed: int = 0
    #: Open loop in steps: (seconds, requests/s) one after another; overrides rate and duration_s.
    phases: list[tuple[float, float]] | None = None

    def schedule(self) -> list[float]:
        """Every intended send time, in seconds from the start, fixed before the run."""
        rng = random.Random(self.seed)
        phases = self.phases or [(self.duration_s, self.rate or 0.0)]
        offsets: list[float] = []
        begin = 0.0
        for seconds, rate in phases:
            end, t, n = begin + seconds, begin, 0
            while rate > 0:
                n += 1
                t = t + rng.expovariate(rate) if self.arrivals == "poisson" else begin + n / rate
                if t >= end - 1e-9:
                    break
                offsets.append(t)
            begin = end
        return offsets


@dataclasses.dataclass
class LoadReport:
    """What happened: counts by status, throughput, latency percentiles (seconds), late sends, samples."""

    mode: str
    sent: int
    statuses: dict[str, int]
    errors: int
    late_sends: int
    elapsed_s: float
    throughput: float
    latency_s: dict[str, float]
    samples: list[dict[str, float]]
    completions: list[tuple[float, float, int]] = dataclasses.field(repr=False, default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("completions")
        return data

    def describe(self) -> str:
        lat = self.latency_s
        lines = [
            f"{self.mode}: sent {self.sent} in {self.elapsed_s:.1f} s, {self.throughput:.1f} responses/s",
            "statuses: "
            + ", ".join(f"{code}: {count}" for code, count in sorted(self.statuses.items()))
            + (f", connection errors: {self.errors}" if self.errors else ""),
            "latency ms: "
            + "  ".join(f"{name} {lat[name] * 1000:.2f}" for name in ("p50", "p90", "p99", "p99.9", "max")),
        ]
        if self.mode.startswith("open"):
            lines.append(f"late sends (> {LATE_S * 1000:.0f} ms): {self.late_sends}")
        return "\n".join(lines)


class _Connection:
    """One keep-alive HTTP/1.1 connection; a response body is read whole, however it is framed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()
        #: False once a response said ``Connection: close`` or ran to the end of the stream.
        self.reusable = True

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send ``raw``; return the status and the whole body (Content-Length, chunked or close-delimited)."""
        self.writer.write(raw)
        while True:
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            if not 100 <= status < 200:
                break  # an interim response (100 Continue) has no body: the real one follows
        length: int | None = None
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.split(b",")[-1].strip() == b"chunked"
            elif name == b"connection" and b"close" in value:
                self.reusable = False
        if chunked:
            body = await self._read_chunks()
        elif length is not None:
            body = await self.reader.readexactly(length) if length else b""
        elif status in (204, 304):
            body = b""
        else:
            body = await self.reader.read()  # no length given: the body ends when the server closes
            self.reusable = False
        return status, body

    async def _read_chunks(self) -> bytes:
        """A ``Transfer-Encoding: chunked`` body: sized chunks up to the zero chunk, then the trailers."""
        parts = []
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)  # a chunk extension follows ';'
            if size == 0:
                break
            parts.append(await self.reader.readexactly(size))
            if await self.reader.readexactly(2) != b"\r\n":
                raise ValueError("a chunk did not end with CRLF")
        while await self.reader.readuntil(b"\r\n") != b"\r\n":
            pass  # trailer fields, up to the empty line
        return b"".join(parts)

    def close(self) -> None:
        self.writer.close()


class _Client:
    """A pool of keep-alive HTTP/1.1 connections to one host."""

    def __init__(self, url: str, api_key: str | None, max_connections: int) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80
        self.auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(max_connections)  # wakes one waiter a release, in order

    def post(self, route: str, body: bytes) -> bytes:
        return (
            f"POST {route} HTTP/1.1\r\nHost: {self.host}\r\n{self.auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    def get(self, route: str) -> bytes:
        return f"GET {route} HTTP/1.1\r\nHost: {self.host}\r\n{self.auth}\r\n".encode()

    async def acquire(self) -> _Connection:
        await self.slots.acquire()
        while self.idle:
            connection = self.idle.pop()
            if time.monotonic() - connection.last_used < KEEP_ALIVE_S:
                return connection
            connection.close()  # the server may have closed it already
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            self.slots.release()
            raise
        return _Connection(reader, writer)

    def release(self, connection: _Connection, healthy: bool) -> None:
        if healthy:
            connection.last_used = time.monotonic()
            self.idle.append(connection)
        else:
            connection.close()
        self.slots.release()

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        connection = await self.acquire()
        try:
            result = await connection.request(raw)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.release(connection, healthy=False)
            raise
        self.release(connection, healthy=connection.reusable)
        return result

    def close(self) -> None:
        for connection in self.idle:
            connection.close()


class _Run:
    def __init__(self, spec: LoadSpec) -> None:
        from hdrh.histogram import HdrHistogram

        self.spec = spec
        self.histogram = HdrHistogram(1, 120_000_000, 3)  # microseconds, up to 2 minutes
        self.statuses: collections.Counter[str] = collections.Counter()
        self.errors = 0
        self.late = 0
        self.sent = 0
        self.completions: list[tuple[float, float, int]] = []  # (seconds since start, latency, status)
        self.samples: list[dict[str, float]] = []
        queries = spec.queries or list(DEFAULT_QUERIES)
        self.bodies = [orjson.dumps({"query": q, "k": spec.k}) for q in queries]
        self.client = _Client(spec.url, spec.api_key, spec.max_connections)
        self.start = 0.0

    def record(self, intended: float, status: int) -> None:
        now = time.perf_counter()
        latency = now - intended
        self.histogram.record_value(max(int(latency * 1e6), 1))
        self.completions.append((now - self.start, latency, status))

    async def one(self, intended: float, body: bytes) -> None:
        self.sent += 1
        if time.perf_counter() - intended > LATE_S:
            self.late += 1
        try:
            status, _ = await self.client.send(self.client.post(self.spec.route, body))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.errors += 1
            return
        self.statuses[str(status)] += 1
        self.record(intended, status)

    async def open_loop(self) -> None:
        offsets = self.spec.schedule()
        tasks = []
        for i, offset in enumerate(offsets):
            intended = self.start + offset
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.one(intended, self.bodies[i % len(self.bodies)])))
        if self.spec.phases:  # a quiet last phase still counts: the sampler watches it
            await asyncio.sleep(max(self.start + sum(p[0] for p in self.spec.phases) - time.perf_counter(), 0))
        await asyncio.gather(*tasks)

    async def closed_loop(self) -> None:
        spec = self.spec
        assert spec.clients is not None
        assert spec.clients > 0
        stop = self.start + spec.duration_s

        async def client(number: int) -> None:
            i = number
            while time.perf_counter() < stop:
                await self.one(time.perf_counter(), self.bodies[i % len(self.bodies)])
                i += spec.clients or 1

        await asyncio.gather(*(client(n) for n in range(spec.clients)))

    async def sample_status(self) -> None:
        client = _Client(self.spec.url, self.spec.api_key, 1)
        try:
            while True:
                try:
                    status, body = await client.send(client.get(self.spec.status_route or "/v1/status"))
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status, body = 0, b""
                if status == 200:
                    data = orjson.loads(body)
                    self.samples.append(
                        {
                            "t": time.perf_counter() - self.start,
                            "queue": data["queue"]["length"],
                            "nodes": sum(1 for n in data["nodes"] if n["state"] == "ready"),
                            "nodes_all": len(data["nodes"]),
                        }
                    )
                await asyncio.sleep(self.spec.sample_interval_s)
        finally:
            client.close()

    async def run(self) -> LoadReport:
        self.start = time.perf_counter()
        sampler = asyncio.create_task(self.sample_status() if self.spec.status_route else asyncio.sleep(0))
        if self.spec.phases:
            await self.open_loop()
            steps = ", ".join(f"{rate:g} req/s for {seconds:g} s" for seconds, rate in self.spec.phases)
            mode = f"open loop, {self.spec.arrivals}: {steps}"
        elif self.spec.rate is not None:
            await self.open_loop()
            mode = f"open loop, {self.spec.arrivals} {self.spec.rate:g} req/s"
        else:
            await self.closed_loop()
            mode = f"closed loop, {self.spec.clients} clients"
        elapsed = time.perf_counter() - self.start
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        self.client.close()
        h = self.histogram
        latency = {
            name: h.get_value_at_percentile(p) / 1e6 if h.get_total_count() else 0.0
            for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))
        }
        latency["max"] = h.get_max_value() / 1e6 if h.get_total_count() else 0.0
        done = sum(self.statuses.values())
        return LoadReport(
            mode=mode,
            sent=self.sent,
            statuses=dict(self.statuses),
            errors=self.errors,
            late_sends=self.late,
            elapsed_s=elapsed,
            throughput=done / elapsed if elapsed else 0.0,
            latency_s=latency,
            samples=self.samples,
            completions=self.completions,
        )


def run_load(spec: LoadSpec) -> LoadReport:
    """Run the load described by ``spec`` (blocking) and return its report; write the plot if asked."""
    import uvloop

    if (spec.rate is None and not spec.phases) == (spec.clients is None):
        raise ValueError("give exactly one of rate (open loop) and clients (closed loop)")
    report = uvloop.run(_Run(spec).run())
    if spec.plot is not None:
        plot_report(report, spec.plot)
    return report


def plot_report(report: LoadReport, path: Path, title: str | None = None) -> None:
    """A PNG of latency (p50 and p99 per second), queue length and node count over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (ax_latency, ax_queue, ax_nodes) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    if report.completions:
        ends = np.array([c[0] for c in report.completions])
        latencies = np.array([c[1] for c in report.completions]) * 1000
        seconds = np.floor(ends).astype(int)
        buckets = sorted(set(seconds.tolist()))
        p50 = [np.percentile(latencies[seconds == b], 50) for b in buckets]
        p99 = [np.percentile(latencies[seconds == b], 99) for b in buckets]
        ax_latency.plot(np.array(buckets) + 0.5, p50, label="p50")
        ax_latency.plot(np.array(buckets) + 0.5, p99, label="p99")
        ax_latency.legend()
    ax_latency.set_ylabel("latency (ms)")
    times = [s["t"] for s in report.samples]
    ax_queue.plot(times, [s["queue"] for s in report.samples], color="tab:orange")
    ax_queue.set_ylabel("queue length")
    ax_nodes.step(times, [s["nodes"] for s in report.samples], where="post", label="ready")
    ax_nodes.step(times, [s["nodes_all"] for s in report.samples], where="post", linestyle="--", label="all")
    ax_nodes.set_ylabel("nodes")
    ax_nodes.set_xlabel("seconds")
    ax_nodes.legend()
    figure.suptitle(title or report.mode)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
