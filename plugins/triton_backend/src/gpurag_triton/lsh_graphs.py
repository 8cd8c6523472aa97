"""CUDA graphs of an LSH search's device stages: a small search costs one graph launch, not dozens of kernels.

A graph is captured per key (query count, candidates, k, and the address and shape of every
tensor the stages read), so a graph only ever replays over the tensors it was captured on; a
database or code array that grows, shrinks or moves gets a new key and a new graph. The few
most recent graphs are kept. Queries go in through one pinned host buffer and one copy; with
`HOST_OUTPUT` that copy is the graph's first node, and the answer (and the stages' failure flags)
comes back by copies the graph itself makes into pinned host buffers, read after one wait: one
launch, no copy kernels, one sync.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpurag.backend import Database
from gpurag.metrics import TopK

#: Largest query count searched through a graph (above it launches are a small share of the time).
GRAPH_MAX_QUERIES = 64
#: Graphs kept (least recently used dropped first).
GRAPHS_KEPT = 32
#: Whether answers come back as host tensors copied out by the graph (off: device tensors, cloned).
HOST_OUTPUT = True


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    staging: torch.Tensor  # pinned host (Q x D' + Q x D,): the codes' words, then the queries
    inputs: torch.Tensor  # device, as ``staging``
    copied: torch.cuda.Event  # the last copy out of ``staging`` is done once this completes
    scores: torch.Tensor
    rows: torch.Tensor
    failed: torch.Tensor | None  # set (any element non-zero) by the stages where their answer must not be used
    host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # pinned scores, rows, failed (HOST_OUTPUT)
    done: torch.cuda.Event  # recorded after a replay: the host buffers are filled once it completes


def host_sign_codes(hashed: np.ndarray[Any, Any], planes: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Packed sign codes (Q, ceil(B / 8)) uint8 of float64 ``hashed`` (Q, D) against float64 ``planes`` (B, D),
    packed as `DistanceBackend.sign_codes` packs them (bit j: bit j % 8 of byte j // 8)."""
    return np.packbits((hashed @ planes.T) > 0, axis=1, bitorder="little")


def as_float_words(codes: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``codes`` (Q, W) uint8 zero-padded to whole 4-byte words and viewed as float32 (Q, ceil(W / 4)): bits
    travel unchanged through the float32 staging buffer (a copy never interprets them)."""
    pad = -codes.shape[1] % 4
    padded = np.ascontiguousarray(np.pad(codes, ((0, 0), (0, pad))) if pad else codes)
    return padded.view(np.float32)


def graph_key(
    hashed: Any, queries: Any, planes: torch.Tensor, codes: torch.Tensor, database: Database, n_candidates: int, k: int
) -> tuple[Any, ...]:
    """What a captured graph depends on: shapes, counts and the address of every tensor it reads."""
    tensors = [planes, codes, database.vectors, *database.row_data.values()]
    return (
        tuple(hashed.shape),
        tuple(queries.shape),
        n_candidates,
        k,
        database.metric,
        database.count,
        *[(t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors if isinstance(t, torch.Tensor)],
    )


class LSHGraphs:
    """Captured `lsh_topk` graphs of one backend, replayed under a lock (their buffers are shared)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._graphs: OrderedDict[tuple[Any, ...], _Graph] = OrderedDict()
        self._lock = threading.Lock()

    def run(
        self,
        stages: Callable[[torch.Tensor, torch.Tensor], tuple[TopK, torch.Tensor | None]],
        hashed: np.ndarray[Any, Any],
        queries: np.ndarray[Any, Any],
        key: tuple[Any, ...],
    ) -> tuple[TopK, bool]:
        """``stages(hashed, queries)`` (device tensors in; TopK and a failure flag or None out) through the graph
        of ``key``: the answer, and whether the stages flagged it as failed (read with a sync where flagged).

        ``hashed`` and ``queries`` are C-contiguous float32 (their bits are copied, never read as numbers).
        """
        width = hashed.shape[1]
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(stages, hashed.shape[0], width, queries.shape[1])
                self._graphs[key] = entry
                while len(self._graphs) > GRAPHS_KEPT:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            if entry.host is None:
                entry.copied.synchronize()  # the previous copy out of the staging buffer has finished
            # (with host output every replay, its copy in included, was waited for before its answer was read)
            staging = entry.staging.numpy().view(np.uint32)  # bits copied as they are (codes ride as words)
            staging[: hashed.size] = hashed.view(np.uint32).reshape(-1)
            staging[hashed.size :] = queries.view(np.uint32).reshape(-1)
            if entry.host is None:
                entry.inputs.copy_(entry.staging, non_blocking=True)
                entry.copied.record()
            entry.graph.replay()
            if entry.host is not None:
                entry.done.record()
                entry.done.synchronize()
                scores, rows, failed = entry.host
                return TopK(scores.clone(), rows.clone()), bool(failed.any())
            top = TopK(entry.scores.clone(), entry.rows.clone())
            return top, entry.failed is not None and bool(entry.failed.any())

    def _capture(
        self,
        stages: Callable[[torch.Tensor, torch.Tensor], tuple[TopK, torch.Tensor | None]],
        n_queries: int,
        width: int,
        dim: int,
    ) -> _Graph:
        staging = torch.zeros(n_queries * (width + dim), dtype=torch.float32, pin_memory=True)
        inputs = torch.zeros(n_queries * (width + dim), dtype=torch.float32, device=self.device)
        split = n_queries * width

        def call() -> tuple[TopK, torch.Tensor | None]:  # both parts contiguous views: no copy kernels
            return stages(inputs[:split].view(n_queries, width), inputs[split:].view(n_queries, dim))

        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            warm, warm_failed = call()  # compiles every kernel before capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        host = None
        if HOST_OUTPUT:
            flag_shape, flag_dtype = ((1,), torch.bool) if warm_failed is None else (
                (warm_failed.numel(),), warm_failed.dtype)  # fmt: skip
            host = (
                torch.empty(tuple(warm.scores.shape), dtype=warm.scores.dtype, pin_memory=True),
                torch.empty(tuple(warm.indices.shape), dtype=warm.indices.dtype, pin_memory=True),
                torch.zeros(flag_shape, dtype=flag_dtype, pin_memory=True),
            )
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            if host is not None:  # the queries' copy in is the graph's first node: one launch less per search
                inputs.copy_(staging, non_blocking=True)
            out, failed = call()
            if host is not None:
                host[0].copy_(out.scores, non_blocking=True)
                host[1].copy_(out.indices, non_blocking=True)
                if failed is not None:
                    host[2].copy_(failed.reshape(-1), non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        return _Graph(graph, staging, inputs, event, out.scores, out.indices, failed, host, done)
