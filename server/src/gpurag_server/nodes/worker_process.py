"""The main of a process node: connect to the head node, build the workload, run batches one at a time.

Started by the ``process`` provider as ``python -m gpurag_server.nodes.worker_process`` with the
settings, head port and token in its environment. A thread sends a heartbeat every
``heartbeat_interval_s``, also while the workload loads or a batch runs.
"""

from __future__ import annotations

import os
import socket
import threading

from gpurag_server.nodes.transport import recv_blocking, send_blocking
from gpurag_server.settings import ServerSettings
from gpurag_server.workload import Workload

SETTINGS_ENV = "GPURAG_NODE_SETTINGS"
PORT_ENV = "GPURAG_NODE_HEAD_PORT"
TOKEN_ENV = "GPURAG_NODE_TOKEN"


def main() -> None:
    settings = ServerSettings.model_validate_json(os.environ[SETTINGS_ENV])
    sock = socket.create_connection(("127.0.0.1", int(os.environ[PORT_ENV])))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lock = threading.Lock()

    def send(message: tuple[object, ...]) -> None:
        with lock:
            send_blocking(sock, message)

    send(("hello", os.environ[TOKEN_ENV]))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(settings.heartbeat_interval_s):
            try:
                send(("hb",))
            except OSError:
                return

    threading.Thread(target=beat, daemon=True, name="heartbeat").start()
    try:
        workload = Workload(settings)
    except Exception as exc:
        send(("start_failed", f"{type(exc).__name__}: {exc}"))
        return
    send(("ready", workload.info()))
    while True:
        try:
            message = recv_blocking(sock)
        except (ConnectionError, OSError):
            break
        if message[0] == "stop":
            break
        _, batch_id, items, stream = message

        def on_text(i: int, text: str, batch_id: int = batch_id) -> None:
            send(("text", batch_id, i, text))

        try:
            outcomes = workload.run(items, on_text if stream else None)
        except Exception as exc:
            send(("failed", batch_id, f"{type(exc).__name__}: {exc}"))
            continue
        send(("result", batch_id, outcomes))
    stop.set()
    sock.close()


if __name__ == "__main__":
    main()
