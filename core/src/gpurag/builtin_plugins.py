"""The core's own retrievers, registered through the same hook as any plugin's."""

from __future__ import annotations

from gpurag.hookspecs import Register, hookimpl
from gpurag.retriever import ExactRetriever
from gpurag.sharded import ShardedRetriever


@hookimpl
def register_retrievers(register: Register) -> None:
    """Register `ExactRetriever` as ``exact``."""
    register(ExactRetriever, "exact")
    register(ShardedRetriever, "sharded")
