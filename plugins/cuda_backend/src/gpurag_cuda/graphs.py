"""CUDA graphs of the cuda backend's small searches: captured once per search shape, replayed later.

A search of a few queries is one scan kernel plus a few dozen small launches (shortlist, re-score,
certificate, flags); launched one by one from Python they cost more host time than the scan itself.
A graph replays them in one launch. It reads the database tensors in place, so the key holds their
storage, shapes and the row count; the queries go through a static buffer.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from gpurag.backend import Database

#: Graphs kept per backend (the oldest is dropped first).
MAX_GRAPHS = 8

Search = Callable[["torch.Tensor"], tuple["torch.Tensor", ...]]


def search_key(q: torch.Tensor, database: Database, *extra: Any) -> tuple[Any, ...]:
    """What a captured search of ``q`` against ``database`` depends on, besides the queries' values."""
    tensors = [database.vectors, *(database.row_data[name] for name in sorted(database.row_data))]
    layout = tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) for t in tensors)
    return (tuple(q.shape), q.dtype, q.device, database.metric, database.count, layout, *extra)


class GraphCache:
    """Captured searches by key; `run` replays one (capturing it first when new)."""

    def __init__(self) -> None:
        self._graphs: collections.OrderedDict[tuple[Any, ...], tuple[Any, torch.Tensor, tuple[torch.Tensor, ...]]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, search: Search, q: torch.Tensor, key: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        """``search(q)`` by graph replay; the outputs are fresh tensors (copies of the graph's own)."""
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(search, q)
                self._graphs[key] = entry
                while len(self._graphs) > MAX_GRAPHS:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            graph, static_q, outputs = entry
            static_q.copy_(q)
            graph.replay()
            # Copies taken under the lock: the next replay overwrites the graph's outputs.
            return tuple(t.clone() for t in outputs)

    @staticmethod
    def _capture(search: Search, q: torch.Tensor) -> tuple[Any, torch.Tensor, tuple[torch.Tensor, ...]]:
        import torch

        static_q = q.clone()
        side = torch.cuda.Stream(device=q.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(side):  # warm up (compile, load, allocate) outside the capture
            search(static_q)
        torch.cuda.current_stream(q.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = search(static_q)
        return graph, static_q, outputs
