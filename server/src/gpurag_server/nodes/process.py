"""The ``process`` provider: each node an OS process talking to the head node over loopback TCP.

Where there are GPUs, node i sees only GPU i mod count (``CUDA_VISIBLE_DEVICES``). A node is dead
when its process exits, its connection breaks, or it misses heartbeats for ``heartbeat_timeout_s``;
its batches then fail with `NodeDiedError` and the batcher puts them back in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from gpurag_server.nodes.base import BatchFailedError, Node, NodeDiedError, NodeProvider, NodeState, TextSink
from gpurag_server.nodes.transport import encode, read_frame
from gpurag_server.nodes.worker_process import PORT_ENV, SETTINGS_ENV, TOKEN_ENV
from gpurag_server.settings import ServerSettings
from gpurag_server.workload import Outcome, WorkItem, WorkloadInfo


def gpu_ids() -> list[str]:
    """The GPUs this host offers: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``; none without any."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in listing.stdout.splitlines() if line.startswith("GPU "))]


class ProcessNode(Node):
    """One worker process and the connection to it."""

    def __init__(self, name: str, token: str, gpu: str | None) -> None:
        super().__init__(name, "process")
        self.token = token
        self.gpu = gpu
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.connected: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        self.ready: asyncio.Future[WorkloadInfo] | None = None
        self.pending: dict[int, asyncio.Future[list[Outcome]]] = {}
        #: Where each streaming batch's ``text`` frames go, by batch id.
        self.streams: dict[int, TextSink] = {}
        self.last_seen = time.monotonic()
        self.death: str | None = None
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def run(self, items: Sequence[WorkItem], on_text: TextSink | None = None) -> list[Outcome]:
        if self.death is not None or self.writer is None:
            raise NodeDiedError(self.death or f"node {self.name} is not connected")
        batch_id = next(self._ids)
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self.pending[batch_id] = future
        if on_text is not None:
            self.streams[batch_id] = on_text
        try:
            self.writer.write(encode(("run", batch_id, list(items), on_text is not None)))
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self.die(f"sending a batch failed: {exc}")
        try:
            return await future
        finally:
            self.pending.pop(batch_id, None)
            self.streams.pop(batch_id, None)

    def die(self, reason: str) -> None:
        """Fail every pending batch with `NodeDiedError` and kill the process."""
        if self.death is not None:
            return
        self.death = f"node {self.name} (pid {self.pid}): {reason}"
        for future in self.pending.values():
            if not future.done():
                future.set_exception(NodeDiedError(self.death))
        for waiting in (self.connected, self.ready):
            if waiting is not None and not waiting.done():
                waiting.set_exception(NodeDiedError(self.death))
                waiting.exception()  # retrieved: whoever awaits it sees it; nobody else must
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        if self.on_death is not None:
            self.on_death(self, self.death)

    async def read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await read_frame(reader)
                self.last_seen = time.monotonic()
                kind = message[0]
                if kind == "text":
                    sink = self.streams.get(message[1])
                    if sink is not None:
                        sink(message[2], message[3])
                elif kind == "result":
                    future = self.pending.get(message[1])
                    if future is not None and not future.done():
                        future.set_result(message[2])
                elif kind == "failed":
                    future = self.pending.get(message[1])
                    if future is not None and not future.done():
                        future.set_exception(BatchFailedError(message[2]))
                elif kind == "ready":
                    if self.ready is not None and not self.ready.done():
                        self.ready.set_result(message[1])
                elif kind == "start_failed" and self.ready is not None and not self.ready.done():
                    self.ready.set_exception(RuntimeError(message[1]))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self.die(f"connection closed ({type(exc).__name__})")

    async def watch(self, timeout_s: float, interval_s: float) -> None:
        """Declare the node dead when its process exits or it stays silent past ``timeout_s``."""
        assert self.process is not None
        while self.death is None:
            if self.process.returncode is not None:
                self.die(f"process exited with status {self.process.returncode}")
                return
            if self.writer is not None and time.monotonic() - self.last_seen > timeout_s:
                self.die(f"no heartbeat for {timeout_s} s")
                return
            await asyncio.sleep(interval_s)


class ProcessProvider(NodeProvider):
    """Worker processes on this host, connected to the head node over 127.0.0.1."""

    name = "process"

    def __init__(self, settings: ServerSettings) -> None:
        super().__init__(settings)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._waiting: dict[str, ProcessNode] = {}
        self._gpus = gpu_ids()
        self._count = 0

    def create(self) -> Node:
        gpu = self._gpus[self._count % len(self._gpus)] if self._gpus else None
        self._count += 1
        return ProcessNode(self.next_name(), secrets.token_hex(16), gpu)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
            self._port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(read_frame(reader), 10)
        except Exception:
            writer.close()
            return
        node = self._waiting.pop(str(hello[1]), None) if hello[0] == "hello" and len(hello) == 2 else None
        if node is None or node.connected is None or node.connected.done():
            writer.close()  # not one of ours
            return
        sock: Any = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        node.connected.set_result((reader, writer))

    async def start(self, node: Node) -> WorkloadInfo:
        assert isinstance(node, ProcessNode)
        await self._listen()
        loop = asyncio.get_running_loop()
        node.connected = loop.create_future()
        node.ready = loop.create_future()
        self._waiting[node.token] = node
        env = dict(os.environ)
        env[SETTINGS_ENV] = self.settings.model_dump_json()
        env[PORT_ENV] = str(self._port)
        env[TOKEN_ENV] = node.token
        if node.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = node.gpu
        try:
            node.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gpurag_server.nodes.worker_process", env=env, stdin=subprocess.DEVNULL
            )
            node.last_seen = time.monotonic()
            settings = self.settings
            node._tasks.append(
                asyncio.create_task(node.watch(settings.heartbeat_timeout_s, settings.heartbeat_interval_s / 2))
            )
            reader, writer = await node.connected
            node.last_seen = time.monotonic()
            node.writer = writer  # heartbeats are awaited from now on
            node._tasks.append(asyncio.create_task(node.read_loop(reader)))
            return await node.ready
        except BaseException:
            self._waiting.pop(node.token, None)
            node.die("it failed to start")
            raise

    async def stop(self, node: Node) -> None:
        assert isinstance(node, ProcessNode)
        self._waiting.pop(node.token, None)
        if node.writer is not None and node.death is None:
            with contextlib.suppress(ConnectionError, OSError):
                node.writer.write(encode(("stop",)))
                await node.writer.drain()
        if node.process is not None and node.process.returncode is None:
            try:
                await asyncio.wait_for(node.process.wait(), 5)
            except TimeoutError:
                node.process.kill()
                await node.process.wait()
        node.death = node.death or "stopped"
        node.state = NodeState.STOPPED if node.state is not NodeState.DEAD else node.state
        for task in node._tasks:
            task.cancel()
        if node.writer is not None:
            node.writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
