"""gpurag's RAG server: a Starlette head node that queues, batches and dispatches to compute nodes."""

from __future__ import annotations

from gpurag_server.settings import ServerSettings

__all__ = ["ServerSettings"]
