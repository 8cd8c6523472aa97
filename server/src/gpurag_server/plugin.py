"""gpurag-server's plugin: its dispatchers, node providers and the ``serve`` and ``load`` commands."""

from __future__ import annotations

from typing import Any

from gpurag.hookspecs import Register, hookimpl
from gpurag_server.dispatch import register_dispatchers


@hookimpl
def register_node_providers(register: Register) -> None:
    """Register ``local`` (threads in the server) and ``process`` (OS processes on loopback)."""
    from gpurag_server.nodes.local import LocalProvider
    from gpurag_server.nodes.process import ProcessProvider

    register(LocalProvider, "local")
    register(ProcessProvider, "process")


@hookimpl
def register_commands(cli: Any) -> None:
    """Add ``gpurag serve`` and ``gpurag load``."""
    from gpurag_server.commands import load_command, serve_command

    cli.add_command(serve_command)
    cli.add_command(load_command)


__all__ = ["register_commands", "register_dispatchers", "register_node_providers"]
