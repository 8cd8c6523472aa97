"""The core's own retrievers, registered through the same hook as any plugin's."""

from __future__ import annotations

from gpurag.hookspecs import Register, hookimpl
from gpurag.lsh import LSHRetriever
from gpurag.retriever import ExactRetriever
from gpurag.sharded import ShardedRetriever


@hookimpl
def register_retrievers(register: Register) -> None:
    """Register `ExactRetriever` as ``exact``, `ShardedRetriever` as ``sharded`` and `LSHRetriever` as ``lsh``."""
    register(ExactRetriever, "exact")
    register(ShardedRetriever, "sharded")
    register(LSHRetriever, "lsh")
