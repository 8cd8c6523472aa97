"""What a compute node runs: a batch of work items in, one outcome per item out.

A `Workload` is built inside the node (thread or process) from `ServerSettings`; it never runs on
the head node's event loop. ``rag`` serves the RAG pipeline; ``zero`` and ``sleep`` are
benchmark-only workloads that answer without work (``sleep`` waits ``sleep_per_batch_s`` a batch).
"""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from gpurag_server.settings import ServerSettings

#: Kinds of work item: the endpoint that made it.
KINDS = ("rag", "search", "embed")


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One request as a node sees it: its kind and its validated payload (plain data, picklable)."""

    kind: str
    payload: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One item's result: ``value`` (plain data) when ``ok``, else ``error`` (a message)."""

    ok: bool
    value: dict[str, Any] | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class WorkloadInfo:
    """What the head node needs to know to validate requests: the corpus's embedder and size."""

    embedder: str
    dim: int | None
    chunks: int


class Workload:
    """Runs batches of `WorkItem` for one node; `run` raises only when the whole batch failed."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.kind = settings.workload
        self.pipeline: Any = None
        if self.kind == "rag":
            from gpurag.rag.pipeline import RAGPipeline

            if settings.corpus is None:
                self.pipeline = RAGPipeline.default(embedder=settings.embedder, generator=settings.generator)
            else:
                self.pipeline = RAGPipeline.from_index(
                    settings.corpus,
                    embedder=settings.embedder,
                    generator=settings.generator,
                    backend=settings.search_backend,
                )

    def info(self) -> WorkloadInfo:
        if self.pipeline is None:
            return WorkloadInfo(embedder="none", dim=None, chunks=0)
        corpus = self.pipeline.corpus
        return WorkloadInfo(embedder=corpus.embedder_name, dim=corpus.embedder_dim, chunks=len(corpus))

    def run(self, items: Sequence[WorkItem]) -> list[Outcome]:
        """One outcome per item, in order; raises if the batch as a whole failed (the head splits it)."""
        started = time.perf_counter()
        if self.pipeline is None:
            if self.kind == "sleep" and self.settings.sleep_per_batch_s > 0:
                time.sleep(self.settings.sleep_per_batch_s)
            outcomes = [_zero(item) for item in items]
        else:
            outcomes = [Outcome(ok=False, error="not run")] * len(items)
            for kind, positions in _group(items).items():
                results = getattr(self, f"_{kind}")([items[i].payload for i in positions])
                for position, result in zip(positions, results, strict=True):
                    outcomes[position] = result
        compute_s = time.perf_counter() - started
        for outcome in outcomes:
            if outcome.ok and outcome.value is not None:
                outcome.value["compute_s"] = compute_s
        return outcomes

    def _rag(self, payloads: list[dict[str, Any]]) -> list[Outcome]:
        outcomes: list[Outcome] = [Outcome(ok=False)] * len(payloads)
        by_k: dict[int | None, list[int]] = {}
        for i, payload in enumerate(payloads):
            by_k.setdefault(payload.get("k"), []).append(i)
        for k, positions in by_k.items():
            answers = self.pipeline.answer_batch([payloads[i]["query"] for i in positions], k)
            for i, answer in zip(positions, answers, strict=True):
                outcomes[i] = Outcome(
                    ok=True,
                    value={
                        "answer": answer.answer,
                        "sources": [dataclasses.asdict(p) for p in answer.sources],
                        "timings": {key: answer.timings[key] for key in ("embed_s", "search_s", "generate_s")},
                    },
                )
        return outcomes

    def _search(self, payloads: list[dict[str, Any]]) -> list[Outcome]:
        corpus = self.pipeline.corpus
        outcomes = []
        for payload in payloads:
            if payload.get("texts") is not None:
                vectors = self.pipeline.embedder.embed_batch(payload["texts"])
            else:
                vectors = np.asarray(payload["vectors"], dtype=np.float32)
            found = corpus.search(vectors, payload["k"])
            outcomes.append(
                Outcome(
                    ok=True,
                    value={
                        "results": [
                            {
                                "ids": [p.id for p in passages],
                                "scores": [p.score for p in passages],
                                "texts": [p.text for p in passages],
                                "sources": [p.source for p in passages],
                            }
                            for passages in found
                        ]
                    },
                )
            )
        return outcomes

    def _embed(self, payloads: list[dict[str, Any]]) -> list[Outcome]:
        texts = [text for payload in payloads for text in payload["input"]]
        vectors = self.pipeline.embedder.embed_batch(texts)
        outcomes, start = [], 0
        for payload in payloads:
            block = np.asarray(vectors[start : start + len(payload["input"])], dtype=np.float32)
            start += len(payload["input"])
            if payload.get("dimensions"):
                block = block[:, : payload["dimensions"]]
                norms = np.linalg.norm(block, axis=1, keepdims=True)
                block = (block / np.where(norms == 0, 1, norms)).astype(np.float32)
            if payload.get("encoding_format") == "base64":
                data: list[Any] = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in block]
            else:
                data = block.tolist()
            outcomes.append(Outcome(ok=True, value={"embeddings": data, "model": self.pipeline.embedder.name}))
        return outcomes


def _zero(item: WorkItem) -> Outcome:
    if item.kind == "rag":
        return Outcome(ok=True, value={"answer": "", "sources": [], "timings": {}})
    if item.kind == "search":
        count = len(item.payload.get("texts") or item.payload.get("vectors") or [])
        return Outcome(ok=True, value={"results": [{"ids": [], "scores": [], "texts": [], "sources": []}] * count})
    return Outcome(ok=True, value={"embeddings": [[] for _ in item.payload["input"]], "model": "none"})


def _group(items: Sequence[WorkItem]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.kind, []).append(i)
    return groups
