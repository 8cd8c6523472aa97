"""What a compute node runs: a batch of work items in, one outcome per item out.

A `Workload` is built inside the node (thread or process) from `ServerSettings`; it never runs on
the head node's event loop. ``rag`` serves the RAG pipeline; ``zero`` and ``sleep`` are
benchmark-only workloads that answer without work (``sleep`` waits ``sleep_per_batch_s`` a batch).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
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


def model_threads(setting: int) -> int:
    """Threads a node's models get: ``setting``, or for 0 one fewer than the cores (at least 1)."""
    return setting if setting > 0 else max(1, (os.cpu_count() or 1) - 1)


def limit_model_threads(setting: int) -> None:
    """Cap torch's intra-op threads for this process, so models never starve the head node's event loop.

    torch's OpenMP pool defaults to one thread a core; beside a busy event loop on the same cores its
    spinning threads slowed the default pipeline about 17x on a 2-core machine (4.8 against 83.9
    requests/s, wrk 32 connections, 2026-11-30). `limit_blas_threads` does the same for BLAS.
    """
    try:
        import torch
    except ImportError:  # a workload without models
        return
    torch.set_num_threads(model_threads(setting))


def limit_blas_threads(setting: int) -> None:
    """Cap the threads of every BLAS library loaded in this process (NumPy's and SciPy's OpenBLAS).

    OpenBLAS starts a thread a core and spins them after each call; beside the node's model thread
    they halved the default pipeline's throughput from batches of 4 questions up (58.1 against 126.7
    requests/s for a process node, `benchmarks/results/ray_serve_anchor_blas_threads.md`). Call it
    once the pipeline is built: only libraries loaded by then are capped.
    """
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    threadpool_limits(limits=model_threads(setting), user_api="blas")


class Workload:
    """Runs batches of `WorkItem` for one node; `run` raises only when the whole batch failed."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.kind = settings.workload
        self.pipeline: Any = None
        if self.kind == "rag":
            from gpurag.rag.pipeline import RAGPipeline

            limit_model_threads(settings.node_threads)

            if settings.corpus is None:
                self.pipeline = RAGPipeline.default(embedder=settings.embedder, generator=settings.generator)
            else:
                self.pipeline = RAGPipeline.from_index(
                    settings.corpus,
                    embedder=settings.embedder,
                    generator=settings.generator,
                    backend=settings.search_backend,
                )
            limit_blas_threads(settings.node_threads)

    def info(self) -> WorkloadInfo:
        if self.pipeline is None:
            return WorkloadInfo(embedder="none", dim=None, chunks=0)
        corpus = self.pipeline.corpus
        return WorkloadInfo(embedder=corpus.embedder_name, dim=corpus.embedder_dim, chunks=len(corpus))

    def run(self, items: Sequence[WorkItem], on_text: Callable[[int, str], None] | None = None) -> list[Outcome]:
        """One outcome per item, in order; raises if the batch as a whole failed (the head splits it).

        With ``on_text``, each ``rag`` item whose payload asks to ``stream`` has its answer's text
        passed to ``on_text(position in items, text)`` as it is generated (from this thread).
        """
        started = time.perf_counter()
        if self.pipeline is None:
            if self.kind == "sleep" and self.settings.sleep_per_batch_s > 0:
                time.sleep(self.settings.sleep_per_batch_s)
            outcomes = [_zero(item) for item in items]
        else:
            outcomes = [Outcome(ok=False, error="not run")] * len(items)
            for kind, positions in _group(items).items():
                payloads = [items[i].payload for i in positions]
                if kind == "rag":
                    results = self._rag(payloads, _positions_sink(on_text, positions, payloads))
                else:
                    results = getattr(self, f"_{kind}")(payloads)
                for position, result in zip(positions, results, strict=True):
                    outcomes[position] = result
        compute_s = time.perf_counter() - started
        for outcome in outcomes:
            if outcome.ok and outcome.value is not None:
                outcome.value["compute_s"] = compute_s
        return outcomes

    def _rag(self, payloads: list[dict[str, Any]], on_text: Callable[[int, str], None] | None = None) -> list[Outcome]:
        outcomes: list[Outcome] = [Outcome(ok=False)] * len(payloads)
        by_k: dict[int | None, list[int]] = {}
        for i, payload in enumerate(payloads):
            by_k.setdefault(payload.get("k"), []).append(i)
        for k, positions in by_k.items():
            sink = _positions_sink(on_text, positions, [payloads[i] for i in positions])
            answers = self.pipeline.answer_batch([payloads[i]["query"] for i in positions], k, on_text=sink)
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


def _positions_sink(
    on_text: Callable[[int, str], None] | None, positions: list[int], payloads: list[dict[str, Any]]
) -> Callable[[int, str], None] | None:
    """``on_text`` for a sub-batch: its index ``i`` is ``positions[i]`` outside; only payloads that ``stream``."""
    if on_text is None or not any(payload.get("stream") for payload in payloads):
        return None
    streaming = [bool(payload.get("stream")) for payload in payloads]

    def sink(i: int, text: str) -> None:
        if streaming[i]:
            on_text(positions[i], text)

    return sink


def _group(items: Sequence[WorkItem]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.kind, []).append(i)
    return groups
