"""The body of a Ray compute node: one pipeline replica (embedder, index, generator) in a Ray actor.

`NodeActor` is a plain class; the ``ray`` provider wraps it with ``ray.remote`` so that this module
imports without Ray. The corpus index comes either from Ray's object store (`CorpusIndex` put once
by the head node, read zero-copy by every actor on a host) or from the path in the settings.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

from gpurag_server.settings import ServerSettings
from gpurag_server.workload import Outcome, WorkItem, Workload, WorkloadInfo


class CorpusWorkload(Workload):
    """A ``rag`` workload over a corpus index already in memory (no load from disk, no re-embedding)."""

    def __init__(self, settings: ServerSettings, corpus: Any) -> None:
        super().__init__(settings.model_copy(update={"workload": "zero"}))  # builds nothing
        from gpurag.rag.embedders import get_embedder
        from gpurag.rag.generators import get_generator
        from gpurag.rag.pipeline import RAGPipeline

        self.settings = settings
        self.kind = settings.workload
        embedder = get_embedder(settings.embedder or corpus.embedder_name)
        self.pipeline = RAGPipeline(corpus, embedder, get_generator(settings.generator))


class NodeActor:
    """Builds its workload on construction; `run` answers one batch at a time."""

    def __init__(self, settings_json: str, corpus: Any = None) -> None:
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
