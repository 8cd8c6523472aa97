"""The batch transport between the head node and a process node: length-prefixed pickle frames over
one loopback TCP connection (one frame a batch, protocol 5, TCP_NODELAY).

Frames, as tuples: head -> node ``("run", batch_id, items, stream)``, ``("stop",)``; node -> head
``("hello", token)``, ``("ready", info)``, ``("start_failed", message)``, ``("hb",)``,
``("text", batch_id, index, text)`` (a streaming batch's new answer text, before its result),
``("result", batch_id, outcomes)``, ``("failed", batch_id, message)``.
Only a peer that presents the node's random token in its first frame is talked to.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 1 << 30


def encode(message: tuple[Any, ...]) -> bytes:
    payload = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    """The next frame; `asyncio.IncompleteReadError` when the peer closed the connection."""
    header = await reader.readexactly(HEADER.size)
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise ConnectionError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    message: tuple[Any, ...] = pickle.loads(await reader.readexactly(size))
    return message


def send_blocking(sock: socket.socket, message: tuple[Any, ...]) -> None:
    sock.sendall(encode(message))


def recv_blocking(sock: socket.socket) -> tuple[Any, ...]:
    """The next frame from a blocking socket; `ConnectionError` when the peer closed it."""
    (size,) = HEADER.unpack(_exactly(sock, HEADER.size))
    message: tuple[Any, ...] = pickle.loads(_exactly(sock, size))
    return message


def _exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = sock.recv(min(size - len(buffer), 1 << 20))
        if not chunk:
            raise ConnectionError("the head node closed the connection")
        buffer += chunk
    return bytes(buffer)
