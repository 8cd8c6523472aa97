"""CUDA graphs of small searches: captured once per search shape, replayed later (any torch-based GPU backend).

A search of a few queries is one scan kernel plus a few dozen small launches (shortlist, re-score,
certificate, flags); launched one by one from Python they cost more host time than the scan itself.
A graph replays them in one launch. It reads the database tensors in place, so the key holds their
storage, shapes and the row count; the queries go through a static buffer.

`GraphCache.run` returns the search's device tensors; `GraphCache.run_to_host` replays a search that
ends in one packed int32 buffer and copies that buffer to page-locked host memory: one replay, one
copy and one synchronisation per search.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gpurag.backend import Database

#: Graphs kept per backend and kind (the oldest is dropped first).
MAX_GRAPHS = 8

Search = Callable[["torch.Tensor"], tuple["torch.Tensor", ...]]
#: A search whose answer is one int32 device tensor (`pack_answer`).
PackedSearch = Callable[["torch.Tensor"], "torch.Tensor"]
HostGraph = tuple[Any, "torch.Tensor", "torch.Tensor", "torch.Tensor"]


def search_key(q: torch.Tensor, database: Database, *extra: Any) -> tuple[Any, ...]:
    """What a captured search of ``q`` against ``database`` depends on, besides the queries' values."""
    tensors = [database.vectors, *(database.row_data[name] for name in sorted(database.row_data))]
    layout = tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) for t in tensors)
    return (tuple(q.shape), q.dtype, q.device, database.metric, database.count, layout, *extra)


def pack_answer(scores: torch.Tensor, rows: torch.Tensor, failed: torch.Tensor) -> torch.Tensor:
    """(Q, k) float32 ``scores``, (Q, k) integer ``rows`` and a 0-d bool ``failed`` as one int32 tensor:
    the scores' bits, the rows, then 1 where the answer must not be used (`unpack_answer`)."""
    import torch

    return torch.cat([scores.reshape(-1).view(torch.int32), rows.reshape(-1).to(torch.int32),
                      failed.reshape(1).to(torch.int32)])  # fmt: skip


def unpack_answer(words: np.ndarray[Any, Any], n_queries: int, k: int) -> tuple[Any, Any] | None:
    """Host (float32 scores, int64 rows) of `pack_answer`'s words, or None where its flag is set."""
    import numpy as np

    count = n_queries * k
    if words[2 * count] != 0:
        return None
    scores = words[:count].view(np.float32).reshape(n_queries, k).copy()
    rows = words[count : 2 * count].astype(np.int64).reshape(n_queries, k)
    return scores, rows


class GraphCache:
    """Captured searches by key; `run` replays one (capturing it first when new), `run_to_host` likewise
    for a search answered into page-locked host memory."""

    def __init__(self) -> None:
        self._graphs: collections.OrderedDict[tuple[Any, ...], tuple[Any, torch.Tensor, tuple[torch.Tensor, ...]]] = (
            collections.OrderedDict()
        )
        #: Graphs answering to the host: (graph, static queries, packed answer, host buffer).
        self._host_graphs: collections.OrderedDict[tuple[Any, ...], HostGraph] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs) + len(self._host_graphs)

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

    def run_to_host(self, search: PackedSearch, q: torch.Tensor, key: tuple[Any, ...]) -> np.ndarray[Any, Any]:
        """``search(q)`` (one int32 tensor) by graph replay, copied to the host after it: a NumPy copy of its words."""
        import torch

        with self._lock:
            entry = self._host_graphs.get(key)
            if entry is None:
                graph, static_q, outputs = self._capture(lambda static: (search(static),), q)
                host, _ = page_locked(int(outputs[0].numel()))
                entry = (graph, static_q, outputs[0], host)
                self._host_graphs[key] = entry
                while len(self._host_graphs) > MAX_GRAPHS:
                    self._host_graphs.popitem(last=False)
            else:
                self._host_graphs.move_to_end(key)
            graph, static_q, packed, host = entry
            static_q.copy_(q)
            graph.replay()
            host.copy_(packed, non_blocking=True)
            torch.cuda.current_stream(q.device).synchronize()
            return host.numpy().copy()

    @staticmethod
    def _capture(search: Search, q: torch.Tensor) -> tuple[Any, torch.Tensor, tuple[torch.Tensor, ...]]:
        import torch

        static_q = torch.empty(tuple(q.shape), dtype=q.dtype, device=q.device)  # contiguous whatever q's strides
        static_q.copy_(q)
        side = torch.cuda.Stream(device=q.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(side):  # warm up (compile, load, allocate) outside the capture
            search(static_q)
        torch.cuda.current_stream(q.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = search(static_q)
        return graph, static_q, outputs


def page_locked(words: int) -> tuple[torch.Tensor, bool]:
    """An int32 host tensor of ``words``, and whether it is page-locked (registered with CUDA on whole pages
    of its own, outside torch's caching allocator; unregistered when freed). Where registering fails it
    is ordinary memory (False)."""
    import mmap
    import weakref

    import numpy as np
    import torch

    page = mmap.PAGESIZE
    nbytes = -(-words * 4 // page) * page
    raw = np.zeros(nbytes + page, dtype=np.uint8)
    offset = -raw.ctypes.data % page
    array = raw[offset : offset + nbytes].view(np.int32)[:words]
    pointer = raw.ctypes.data + offset
    try:
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        code = cudart.cudaHostRegister(pointer, nbytes, 0)
    except (AttributeError, RuntimeError):  # a torch without the runtime's registration call
        return torch.from_numpy(array), False
    if int(getattr(code, "value", code)) != 0:
        return torch.from_numpy(array), False
    weakref.finalize(raw, cudart.cudaHostUnregister, pointer)
    return torch.from_numpy(array), True
