"""CUDA graphs of whole small searches: captured once per search shape, replayed on later calls.

A one-query search is one scan kernel plus a few dozen small launches (decode, shortlist, re-score,
certificate); launched one by one they cost more host time than the scan's 0.4 ms. A graph replays
them in one launch. The graph reads the database tensors in place, so it stays valid while their
storage and row count stay the same (both are in the key); the query goes through a static buffer.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from gpurag.backend import Database
    from gpurag.metrics import TopK

#: Graphs kept per backend (the oldest is dropped first).
MAX_GRAPHS = 8
#: Whether a graph that answers to the host also copies the answer there itself (else a copy is
#: launched after each replay). Off: on an H200 both took the same time within 0.015 ms (W1).
COPY_IN_GRAPH = False
_COPY_IN_GRAPH_FAILED: list[bool] = []

#: (scores, rows, certified or None, overflow, good), as `TritonBackend.device_topk` returns them (the two
#: flags 0-d bool tensors, or bools once read).
Outputs = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor | None", Any, Any]


def _key(q: torch.Tensor, database: Database, k: int, low: bool) -> tuple[Any, ...]:
    from gpurag_triton import launch

    row_data = database.row_data  # (torch.Size is a tuple: equal keys, fewer conversions on every search)
    tensors = (database.vectors, *(row_data[name] for name in sorted(row_data)))
    layout = tuple([(t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors])
    # The kernels' merge is part of what was captured.
    return (q.shape, q.device, k, low, database.metric, database.count, layout, launch.tuning())


#: The backend's attributes that change what a search launches (part of a captured graph's key).
SWITCHES = ("sort_shortlist", "packed_finish", "merge_groups", "few_query_inputs", "l1_codes", "l1_codes_min_queries")


def _switches(backend: Any) -> tuple[Any, ...]:
    return tuple(getattr(backend, name, None) for name in SWITCHES)


class GraphCache:
    """Captured searches by shape; `run` replays one (capturing it first when new)."""

    def __init__(self) -> None:
        self._graphs: collections.OrderedDict[tuple[Any, ...], tuple[Any, torch.Tensor, Outputs]] = (
            collections.OrderedDict()
        )
        #: Graphs whose answer goes to the host (`run_to_host`), by shape.
        self._host_graphs: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs) + len(self._host_graphs)

    def run(self, backend: Any, q: torch.Tensor, database: Database, k: int, low: bool) -> Outputs:
        """``backend.device_topk(q, database, k, low)`` by graph replay; the outputs are fresh tensors."""
        key = (*_key(q, database, k, low), *_switches(backend))
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(backend, q, database, k, low)
                self._graphs[key] = entry
                while len(self._graphs) > MAX_GRAPHS:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            graph, static_q, outputs = entry
            static_q.copy_(q)
            graph.replay()
            scores, rows, certified, overflow, good = outputs
            # Copies taken under the lock (the next replay overwrites the graph's own outputs); reading
            # ``good`` waits for them, the one synchronisation of the search.
            scores, rows = scores.clone(), rows.clone()
            if bool(good):
                return scores, rows, None, False, True
            return scores, rows, None if certified is None else certified.clone(), bool(overflow), False

    def run_to_host(self, backend: Any, q: torch.Tensor, database: Database, k: int, low: bool) -> TopK | None:
        """``backend.device_topk`` by graph replay with the answer copied to the host: one synchronisation.

        The graph also packs (scores, rows, flags) into one int32 buffer (the finish kernel writes it so
        itself with ``backend.packed_finish``) and, where `COPY_IN_GRAPH` holds,
        copies it to page-locked host memory itself. Returns host (scores, int64 rows), or None where
        the search needs more than the shortlist (a failed certificate, float32 overflow, or queries
        that are not finite, which make the overflow test fail): the caller then searches the
        careful way, which also reports non-finite queries.
        """
        import numpy as np
        import torch

        from gpurag.metrics import TopK

        key = ("host", COPY_IN_GRAPH, *_key(q, database, k, low), *_switches(backend))
        with self._lock:
            entry = self._host_graphs.get(key)
            if entry is None:
                entry = self._capture_to_host(backend, q, database, k, low)
                self._host_graphs[key] = entry
                while len(self._host_graphs) > MAX_GRAPHS:
                    self._host_graphs.popitem(last=False)
            else:
                self._host_graphs.move_to_end(key)
            graph, static_q, packed, host, copied = entry
            static_q.copy_(q)
            graph.replay()
            if not copied:
                host.copy_(packed, non_blocking=True)
            torch.cuda.current_stream(q.device).synchronize()
            words = host.numpy()
            count = q.shape[0] * k
            if words[2 * count] != 0:  # queries not answered by the shortlist (or possible overflow)
                return None
            scores = words[:count].view(np.float32).reshape(q.shape[0], k).copy()
            rows = words[count : 2 * count].astype(np.int64).reshape(q.shape[0], k)
            return TopK(scores, rows)

    def _capture_to_host(
        self, backend: Any, q: torch.Tensor, database: Database, k: int, low: bool
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        import torch

        from gpurag_torch.graphs import page_locked

        count = q.shape[0] * k
        host, locked = page_locked(2 * count + 2)

        def stages(static_q: torch.Tensor) -> torch.Tensor:
            packed = backend.packed_topk(static_q, database, k, low)
            if packed is not None:
                return packed  # type: ignore[no-any-return]
            scores, rows, _, overflow, good = backend.device_topk(static_q, database, k, low)
            return torch.cat(
                [
                    scores.reshape(-1).view(torch.int32),
                    rows.reshape(-1).to(torch.int32),
                    (~good).reshape(1).to(torch.int32),
                    overflow.reshape(1).to(torch.int32),
                ]
            )

        if COPY_IN_GRAPH and locked and not _COPY_IN_GRAPH_FAILED:
            try:
                graph, static_q, packed = self._capture_stages(stages, q, host)
                return graph, static_q, packed, host, True
            except RuntimeError:  # this torch cannot capture the copy to the host: copy after each replay
                _COPY_IN_GRAPH_FAILED.append(True)
        graph, static_q, packed = self._capture_stages(stages, q, None)
        return graph, static_q, packed, host, False

    @staticmethod
    def _capture_stages(
        stages: Any, q: torch.Tensor, host: torch.Tensor | None
    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        import torch

        static_q = torch.empty(tuple(q.shape), dtype=q.dtype, device=q.device)  # contiguous whatever q's strides
        static_q.copy_(q)
        side = torch.cuda.Stream(device=q.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(side):  # warm up (compile, allocate) outside the capture
            stages(static_q)
        torch.cuda.current_stream(q.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            packed = stages(static_q)
            if host is not None:
                host.copy_(packed, non_blocking=True)
        torch.cuda.synchronize(q.device)
        return graph, static_q, packed

    @staticmethod
    def _capture(
        backend: Any, q: torch.Tensor, database: Database, k: int, low: bool
    ) -> tuple[Any, torch.Tensor, Outputs]:
        import torch

        static_q = q.clone()
        side = torch.cuda.Stream(device=q.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(side):  # warm up (compile, allocate) outside the capture
            backend.device_topk(static_q, database, k, low)
        torch.cuda.current_stream(q.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = backend.device_topk(static_q, database, k, low)
        return graph, static_q, outputs
