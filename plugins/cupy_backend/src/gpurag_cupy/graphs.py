"""CUDA graphs of whole few-query searches answered to the host: captured once per search shape, replayed after.

A one-query search is a score pass, two selection launches, the query check and a copy back; launched
one by one from Python they cost more host time than the card's 0.75 ms. A graph replays them in one
launch and ends in a copy to page-locked host memory, so a search is one query copy, one graph launch
and one wait. A search is captured the second time its key (shape, k, database) comes. The graph
reads the database's arrays in place: it stays valid while their addresses, shapes and the row count
stay the same (all in the key); the queries go through a buffer of its own. CuPy refuses cuBLAS calls
during a capture, so only searches the backend's kernels score are captured (`search.kernel_scored`).
CuPy is imported by the functions that use it: the cache's policy (`GraphCache`) imports without it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import warnings
from typing import Any

import numpy as np

#: Graphs kept per backend (the least recently replayed is dropped first): a server's batches of 1 to 16
#: queries at one k fit.
MAX_GRAPHS = 16
#: Search keys remembered as seen once: a search is captured the second time its key comes (a one-off
#: shape is not worth a capture's device synchronisation and instantiation).
MAX_SEEN = 64
#: Most scores (queries times rows) of a search that is captured: its score tile lives as long as the graph.
GRAPH_MAX_SCORES = 1 << 24


def capture_errors() -> tuple[type[BaseException], ...]:
    """Errors of a capture that leave the search to the uncaptured path (with a warning) instead of failing it:
    CUDA refusing it, or CuPy refusing a call during it."""
    import cupy

    return (cupy.cuda.runtime.CUDARuntimeError, cupy.cuda.driver.CUDADriverError, NotImplementedError)


class NotCapturableError(Exception):
    """A search that cannot be captured (a step needs cuBLAS, say): it takes the uncaptured path, silently."""


@dataclasses.dataclass
class HostAnswer:
    """A replayed search's answer on the host: (Q, k) scores and rows, and the queries' largest |q_ij|."""

    scores: np.ndarray[Any, Any]
    rows: np.ndarray[Any, Any]
    largest: float


@dataclasses.dataclass
class SearchGraph:
    """One captured search: its graph, the query buffer it reads, its device buffers and its host copy."""

    graph: Any
    #: The (Q, D) float32 CuPy array the graph reads its queries from.
    queries: Any
    #: The search's device buffers (`search.FewQueryWork`).
    work: Any
    #: Page-locked bytes the graph copies its answer into.
    host: np.ndarray[Any, Any]

    def replay(self, pointer: int) -> HostAnswer:
        """The search of the queries at device address ``pointer`` (copied into `queries` first) on the current
        stream, waited for; its answer copied out of the page-locked buffer (the next replay overwrites it)."""
        import cupy

        stream = cupy.cuda.get_current_stream()
        cupy.cuda.runtime.memcpyAsync(
            self.queries.data.ptr, pointer, self.queries.nbytes, cupy.cuda.runtime.memcpyDeviceToDevice, stream.ptr
        )
        self.graph.launch(stream)
        stream.synchronize()
        n_queries, k = self.work.result.rows.shape
        count = n_queries * k
        rows = self.host[: count * 8].view(np.int64).reshape(n_queries, k).copy()
        scores = self.host[count * 8 : count * 12].view(np.float32).reshape(n_queries, k).copy()
        return HostAnswer(scores, rows, float(self.host[count * 12 : count * 12 + 4].view(np.float32)[0]))


def graph_key(shape: tuple[int, int], database: Any, k: int, tile_rows: int) -> tuple[Any, ...]:
    """What a captured search depends on: query shape, k, tiles, metric, the database arrays' layout, the switches."""
    import cupy

    from gpurag_cupy import search

    arrays = [database.vectors, *(database.row_data[name] for name in sorted(database.row_data))]
    layout = tuple((a.data.ptr, a.shape, a.strides) for a in arrays)
    return (
        cupy.cuda.Device().id, shape, k, tile_rows, database.metric, database.count, layout, search.GRAPH_VEC4,
    )  # fmt: skip


def queue_search(queries: Any, database: Any, k: int, work: Any, host_pointer: int) -> None:
    """The captured sequence into ``work`` (`search.FewQueryWork`): the few-query search, the queries' largest
    magnitude, one copy to ``host_pointer``."""
    import cupy

    from gpurag_cupy import search
    from gpurag_cupy.arrays import queue_largest_magnitude

    stream = cupy.cuda.get_current_stream()
    magnitude = work.result.magnitude
    cupy.cuda.runtime.memsetAsync(magnitude.data.ptr, 0, magnitude.nbytes, stream.ptr)
    search.queue_few_query(queries, database, k, work, kernels_only=True)
    queue_largest_magnitude(queries, magnitude)
    buffer = work.result.buffer
    cupy.cuda.runtime.memcpyAsync(
        host_pointer, buffer.data.ptr, buffer.nbytes, cupy.cuda.runtime.memcpyDeviceToHost, stream.ptr
    )


def capture(shape: tuple[int, int], database: Any, k: int, tile_rows: int) -> SearchGraph:
    """A search of ``shape`` queries captured on a stream of its own, after one run outside the capture
    (kernels loaded, its answer discarded); `NotCapturableError` where a step needs cuBLAS."""
    import cupy

    from gpurag_cupy import search

    queries = cupy.zeros(shape, dtype=cupy.float32)
    work = search.FewQueryWork.allocate(shape[0], database.count, k, tile_rows, zeroed=False)
    nbytes = work.result.buffer.nbytes
    host = np.ndarray((nbytes,), dtype=np.uint8, buffer=cupy.cuda.alloc_pinned_memory(nbytes))  # holds its memory
    cupy.cuda.Device().synchronize()  # the database and the buffers are ready before the side stream reads them
    side = cupy.cuda.Stream(non_blocking=True)
    with side:
        try:
            queue_search(queries, database, k, work, host.ctypes.data)
        except search.LibraryCallError as exc:
            raise NotCapturableError(str(exc)) from exc
        side.synchronize()
        side.begin_capture()
        try:
            queue_search(queries, database, k, work, host.ctypes.data)
        finally:
            graph = side.end_capture()
    return SearchGraph(graph, queries, work, host)


class GraphCache:
    """Captured searches by key; `run` replays one (capturing it first where new)."""

    def __init__(self) -> None:
        self._graphs: collections.OrderedDict[tuple[Any, ...], SearchGraph | None] = collections.OrderedDict()
        self._seen: collections.OrderedDict[tuple[Any, ...], None] = collections.OrderedDict()
        self._lock = threading.Lock()
        #: Replays made (a count for tests and benchmarks: which path answered).
        self.replays = 0
        #: Captures made.
        self.captures = 0
        #: Why captures failed (the search then took the uncaptured path).
        self.failures: list[str] = []

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (and forget the keys seen)."""
        with self._lock:
            self._graphs.clear()
            self._seen.clear()

    def run(self, pointer: int, shape: tuple[int, int], database: Any, k: int, tile_scores: int) -> HostAnswer | None:
        """The search of the C-contiguous float32 queries at device address ``pointer`` by graph replay on the
        current stream, answered on the host; None where it is not captured (see `capturable`), and the first
        time a key comes (it is captured the second time)."""
        tile_rows = capturable(shape, database, k, tile_scores)
        if tile_rows is None:
            return None
        key = graph_key(shape, database, k, tile_rows)
        with self._lock:
            if key in self._graphs:
                entry = self._graphs[key]
                self._graphs.move_to_end(key)
            elif key not in self._seen:
                self._seen[key] = None
                while len(self._seen) > MAX_SEEN:
                    self._seen.popitem(last=False)
                return None  # the first of its kind: answered uncaptured
            else:
                try:
                    entry = capture(shape, database, k, tile_rows)
                    self.captures += 1
                except NotCapturableError:
                    entry = None  # remembered: this key takes the uncaptured path
                except Exception as exc:
                    if not isinstance(exc, capture_errors()):
                        raise
                    entry = None  # a capture this driver or CuPy refuses: remembered, the uncaptured path
                    self.failures.append(f"{shape} k={k}: {exc}")
                    warnings.warn(f"gpurag-cupy: a search could not be captured, answered without a graph ({exc})",
                                  RuntimeWarning, stacklevel=3)  # fmt: skip
                self._graphs[key] = entry
                while len(self._graphs) > MAX_GRAPHS:
                    self._graphs.popitem(last=False)
            if entry is None:
                return None
            answer = entry.replay(pointer)
            self.replays += 1
            return answer


def capturable(shape: tuple[int, int], database: Any, k: int, tile_scores: int) -> int | None:
    """Rows per tile of a captured search of ``shape`` queries, or None where none is captured: past
    `GRAPH_MAX_SCORES`, off the few-query path, or scored through cuBLAS."""
    from gpurag_cupy import search

    n_queries, dim = shape
    if n_queries * database.count > GRAPH_MAX_SCORES or not search.kernel_scored(n_queries, dim, database.metric):
        return None
    return search.few_query_tile_rows(n_queries, database.count, k, tile_scores)
