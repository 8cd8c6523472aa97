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

#: Graphs kept per backend (the oldest is dropped first).
MAX_GRAPHS = 8

#: (scores, rows, certified or None, overflow, good), as `TritonBackend.device_topk` returns them (the two
#: flags 0-d bool tensors, or bools once read).
Outputs = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor | None", Any, Any]


def _key(q: torch.Tensor, database: Database, k: int, low: bool) -> tuple[Any, ...]:
    tensors = [database.vectors, *(database.row_data[name] for name in sorted(database.row_data))]
    layout = tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) for t in tensors)
    return (tuple(q.shape), q.device, k, low, database.metric, database.count, layout)


class GraphCache:
    """Captured searches by shape; `run` replays one (capturing it first when new)."""

    def __init__(self) -> None:
        self._graphs: collections.OrderedDict[tuple[Any, ...], tuple[Any, torch.Tensor, Outputs]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, backend: Any, q: torch.Tensor, database: Database, k: int, low: bool) -> Outputs:
        """``backend.device_topk(q, database, k, low)`` by graph replay; the outputs are fresh tensors."""
        key = _key(q, database, k, low)
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
