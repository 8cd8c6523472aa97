"""Compute nodes and the providers that start, drain and stop them."""

from __future__ import annotations

from gpurag_server.nodes.base import BatchFailedError, Node, NodeDiedError, NodeProvider, NodeState

__all__ = ["BatchFailedError", "Node", "NodeDiedError", "NodeProvider", "NodeState"]
