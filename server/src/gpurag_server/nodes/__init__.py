"""Compute nodes and the providers that start, drain and stop them."""

from __future__ import annotations

from gpurag_server.nodes.base import BatchFailed, Node, NodeDied, NodeProvider, NodeState

__all__ = ["BatchFailed", "Node", "NodeDied", "NodeProvider", "NodeState"]
