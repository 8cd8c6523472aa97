"""`gpurag load` against a real server: open and closed loop, statuses, late sends, the plot."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from server_harness import serving

from gpurag.cli import add_plugin_commands, cli
from gpurag_server.load import LoadReport, LoadSpec, _Run, run_load


def _cli() -> object:
    add_plugin_commands()
    return cli


def test_open_loop_sends_on_schedule_and_plots(tmp_path: Path) -> None:
    with serving(workload="zero") as running:
        plot = tmp_path / "load.png"
        report = run_load(LoadSpec(url=running.url, rate=200, arrivals="constant", duration_s=1.5, plot=plot))
        assert report.sent == 299 or report.sent == 300
        assert report.statuses == {"200": report.sent}
        assert report.errors == 0
        assert 0 < report.latency_s["p50"] <= report.latency_s["p99"] <= report.latency_s["max"]
        assert 1.4 <= report.elapsed_s < 5
        assert report.samples
        assert {"t", "queue", "nodes"} <= set(report.samples[0])
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_open_loop_that_cannot_keep_up_counts_late_sends() -> None:
    with serving(workload="zero") as running:
        report = run_load(LoadSpec(url=running.url, rate=5000, arrivals="poisson", duration_s=0.1, max_connections=4))
        assert report.late_sends > 0
        assert sum(report.statuses.values()) + report.errors == report.sent


def test_closed_loop_through_the_command_line() -> None:
    with serving(workload="sleep", sleep_per_batch_s=0.01) as running:
        result = CliRunner().invoke(
            _cli(), ["load", "--url", running.url, "--clients", "4", "--duration", "1", "--json"]
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["mode"] == "closed loop, 4 clients"
        assert report["statuses"]["200"] == report["sent"] > 10


def test_load_needs_exactly_one_of_rate_and_clients() -> None:
    result = CliRunner().invoke(_cli(), ["load", "--duration", "1"])
    assert result.exit_code != 0
    assert "exactly one of --rate" in result.output


def test_phases_fix_a_step_schedule_in_advance() -> None:
    spec = LoadSpec(arrivals="constant", phases=[(1.0, 10.0), (0.5, 100.0), (1.0, 0.0)])
    offsets = spec.schedule()
    assert len([t for t in offsets if t < 1.0]) == 9
    assert len([t for t in offsets if 1.0 <= t < 1.5]) == 49
    assert not [t for t in offsets if t >= 1.5]
    poisson = LoadSpec(arrivals="poisson", phases=[(100.0, 50.0)]).schedule()
    assert 4500 < len(poisson) < 5500


# --- bodies however they are framed: a streamed (chunked) answer is over when its last byte is in --
CHUNKS = [b"data: first\n\n", b"b" * 4095, b"c" * 70_000, b"data: [DONE]\n\n"]  # one past the 64 KiB read buffer
CHUNK_GAP_S = 0.1


@contextmanager
def streaming_server() -> Iterator[str]:
    """uvicorn + Starlette answering every POST with CHUNKS, CHUNK_GAP_S apart (Transfer-Encoding: chunked)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def stream(request: Request) -> StreamingResponse:
        await request.body()

        async def parts() -> AsyncIterator[bytes]:
            for i, chunk in enumerate(CHUNKS):
                if i:
                    await asyncio.sleep(CHUNK_GAP_S)
                yield chunk

        return StreamingResponse(parts(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/rag", stream, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_chunked_streaming_answer_is_read_whole_and_its_connection_reused() -> None:
    with streaming_server() as url:
        report = run_load(LoadSpec(url=url, clients=2, duration_s=1.0))
    # each client sends again on its connection after the whole body: nothing misread, nothing lost
    assert report.errors == 0
    assert report.statuses == {"200": report.sent}
    assert report.sent >= 4
    # an answer is complete after its last chunk, not when its headers arrive
    assert report.latency_s["p50"] >= (len(CHUNKS) - 1) * CHUNK_GAP_S


RAW_RESPONSES = {
    # chunk extensions and a trailer field, as RFC 9112 allows
    "chunked": [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n",
        b"1a\r\n" + b"z" * 26 + b"\r\n0\r\nX-Trailer: done\r\n\r\n",
    ],
    # no length: the body ends when the server closes the connection
    "close-delimited": [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello ", b"world"],
}


@pytest.mark.parametrize("framing", list(RAW_RESPONSES))
def test_bodies_framed_by_chunks_or_by_closing_are_read_whole(framing: str) -> None:
    first, rest = RAW_RESPONSES[framing]
    served: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
                await reader.readexactly(length[0] if length else 0)
                writer.write(first)
                await asyncio.sleep(CHUNK_GAP_S)  # the rest of the body comes later
                writer.write(rest)
                await writer.drain()
                served.append(head.split(b" ")[0])
                if framing == "close-delimited":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def run() -> LoadReport:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await _Run(LoadSpec(url=f"http://127.0.0.1:{port}", clients=2, duration_s=0.5)).run()

    report = asyncio.run(run())
    assert report.errors == 0
    assert report.statuses == {"200": report.sent}
    assert served.count(b"POST") == report.sent >= 4  # (the status sampler's GETs come too)
    assert report.latency_s["p50"] >= CHUNK_GAP_S
