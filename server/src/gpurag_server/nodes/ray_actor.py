"""The body of a Ray compute node: one pipeline replica (embedder, index, generator) in a Ray actor.

`NodeActor` is a plain class; the ``ray`` provider wraps it with ``ray.remote`` so that this module
imports without Ray. The corpus index comes either from Ray's object store (a `CorpusPayload` put
once by the head node, its arrays read zero-copy by every actor on a host) or from the path in the settings.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np

from gpurag.errors import UnsupportedError
from gpurag_server.settings import ServerSettings
from gpurag_server.workload import Outcome, WorkItem, Workload, WorkloadInfo


@dataclasses.dataclass(frozen=True)
class CorpusPayload:
    """A corpus index as plain data for Ray's object store: arrays (read zero-copy) and chunks."""

    retriever: str
    metric: str
    vectors: np.ndarray[Any, Any]
    ids: np.ndarray[Any, Any]
    chunks: list[Any]
    embedder_name: str
    embedder_dim: int
    metadata: dict[str, Any]

    @classmethod
    def of(cls, corpus: Any) -> CorpusPayload:
        """The payload of a loaded `CorpusIndex` whose retriever keeps its vectors (``exact``)."""
        retriever = corpus.retriever
        if not hasattr(retriever, "vectors"):
            raise UnsupportedError(
                f"retriever {retriever.name!r} cannot be sent through Ray's object store; "
                "set GPURAG_RAY_CORPUS_TRANSFER=path and keep the index on storage every host sees"
            )
        return cls(
            retriever=retriever.name,
            metric=retriever.metric.value,
            vectors=retriever.vectors(),
            ids=retriever.ids,
            chunks=corpus.chunks,
            embedder_name=corpus.embedder_name,
            embedder_dim=corpus.embedder_dim,
            metadata=corpus.metadata,
        )

    def corpus(self, backend: str | None) -> Any:
        """A `CorpusIndex` over this payload on ``backend`` (None: the ``backend`` setting)."""
        from gpurag.plugins import lookup
        from gpurag.rag.corpus import CorpusIndex
        from gpurag.settings import get_settings

        retriever = lookup("retrievers", self.retriever)(metric=self.metric, backend=backend or get_settings().backend)
        retriever.add(self.vectors, self.ids)
        return CorpusIndex(retriever, self.chunks, self.embedder_name, self.embedder_dim, self.metadata)


class CorpusWorkload(Workload):
    """A ``rag`` workload over a corpus index already in memory (no load from disk, no re-embedding)."""

    def __init__(self, settings: ServerSettings, payload: CorpusPayload) -> None:
        super().__init__(settings.model_copy(update={"workload": "zero"}))  # builds nothing
        from gpurag.rag.embedders import get_embedder
        from gpurag.rag.generators import get_generator
        from gpurag.rag.pipeline import RAGPipeline

        self.settings = settings
        self.kind = settings.workload
        corpus = payload.corpus(settings.search_backend)
        embedder = get_embedder(settings.embedder or corpus.embedder_name)
        self.pipeline = RAGPipeline(corpus, embedder, get_generator(settings.generator))


class NodeActor:
    """Builds its workload on construction; `run` answers one batch at a time."""

    def __init__(self, settings_json: str, corpus: CorpusPayload | None = None) -> None:
        settings = ServerSettings.model_validate_json(settings_json)
        if corpus is not None and settings.workload == "rag":
            self.workload: Workload = CorpusWorkload(settings, corpus)
        else:
            self.workload = Workload(settings)

    def ready(self) -> tuple[WorkloadInfo, int, str]:
        """What the node serves, its process id and its host name."""
        return self.workload.info(), os.getpid(), socket.gethostname()

    def run(self, items: Sequence[WorkItem]) -> list[Outcome]:
        return self.workload.run(items)

    def ping(self) -> int:
        """Answered from the ``control`` concurrency group, also while a batch runs."""
        return os.getpid()
