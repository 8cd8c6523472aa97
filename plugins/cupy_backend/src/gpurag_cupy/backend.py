"""The CuPy distance backend: exact l2, dot, cosine and l1 search, any k, and the LSH primitives, on CUDA.

cupy is imported inside the methods, never when this module is imported (the plugin registry
imports it at lookup), so a machine without cupy or without a CUDA driver lists the backend as
unavailable with the reason instead of failing.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.util
import math
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from gpurag.backend import Availability, Boundaries, Database, DistanceBackend, RowMoves
from gpurag.errors import BackendUnavailableError, InvalidInputError
from gpurag.metrics import Metric, TopK
from gpurag.settings import get_settings

#: Largest |q| + |x| (l1: Σ|q| + Σ|x|, compared with its square) for which no float32 product,
#: difference or partial sum of a search can overflow; past it the search runs in float64.
FLOAT32_SAFE_REACH = float(np.sqrt(np.finfo(np.float32).max)) / 2
#: Arrays of at most this many rows are remembered by `asarray` with their largest magnitude.
CHECKED_ROWS = 65536
#: Keys one block of a selection pass reads at least (see `gpurag_cupy.select.KEYS_PER_BLOCK`).
SELECTION_BLOCK_KEYS = 8192
#: The CUDA driver's library, whose presence makes the backend available before cupy is imported.
CUDA_DRIVER_LIBRARY = "libcuda.so.1"
#: The value of bit j % 8 within its byte: little bit order, as np.packbits(..., bitorder="little").
BIT_WEIGHTS = np.array([1, 2, 4, 8, 16, 32, 64, 128], dtype=np.uint8)
#: Whether `asarray` leaves the finiteness check of device arrays named in `DEFERRED_CHECK_NAMES` queued on
#: the card, for `topk` to read once the search is queued behind it (no wait before the score pass).
DEFER_QUERY_CHECK = True
#: The names under which `asarray` defers a device array's check: the retriever's queries, which `topk`
#: is handed next (any other use of the array through the backend reads the check first).
DEFERRED_CHECK_NAMES = frozenset({"queries"})
#: The install line named when cupy is missing.
INSTALL_HINT = "pip install 'gpurag-cupy[cuda12]' or 'gpurag-cupy[cuda13]'"


@functools.cache
def cupy_availability() -> Availability:
    """Whether cupy is installed and a CUDA driver is there; why not, when not (cached).

    Answered without importing cupy or starting CUDA (a lookup must stay light, and a process that
    forks must not have touched the driver): cupy is found by its spec, the driver by loading
    ``libcuda``. Where cupy is already imported its own device count decides. A card cupy cannot use
    after all is refused with the reason when the backend is made (`cupy_device_count`).
    """
    if importlib.util.find_spec("cupy") is None:
        return Availability(False, f"cupy is not installed ({INSTALL_HINT})")
    if "cupy" in sys.modules:
        try:
            cupy_device_count()
        except BackendUnavailableError as exc:
            return Availability(False, str(exc))
        return Availability(True)
    try:
        ctypes.CDLL(CUDA_DRIVER_LIBRARY)
    except OSError as exc:
        return Availability(False, f"no CUDA driver ({CUDA_DRIVER_LIBRARY} cannot be loaded: {exc})")
    return Availability(True)


def cupy_device_count() -> int:
    """The CUDA devices cupy sees; a `BackendUnavailableError` with the reason where it sees none or fails."""
    try:
        import cupy

        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # no driver, a driver too old, a broken install: unavailable, with the reason
        raise BackendUnavailableError(f"no CUDA driver or device for cupy ({type(exc).__name__}: {exc})") from exc
    if count < 1:
        raise BackendUnavailableError("cupy sees no CUDA device")
    return count


class CupyBackend(DistanceBackend):
    """Exact search with CuPy on ``cuda[:n]``: l2, dot, cosine and l1, any k up to the row count.

    Scores come in tiles of at most ``tile_scores`` float32 values (default: the
    ``memory_budget_bytes`` setting / 4): cuBLAS ``gemmEx`` in float32 (TF32 off) for l2, dot and
    cosine, a CUDA kernel for l1. Each tile is narrowed to each query's best k by a radix select
    (``kernels/select.cu``), and the k rows finally chosen are scored again directly. Up to
    `search.FEW_MAX_QUERIES` queries take the few-query path (``kernels/small.cu``: per-chunk
    selection in shared memory, one merge). Torch CUDA tensors are read without a copy and the work
    runs on torch's current stream.
    """

    name = "cupy"
    device_kinds = ("cuda",)
    metrics = frozenset(Metric)
    max_k = None

    def __init__(self, device: str | None = None, *, tile_scores: int | None = None) -> None:
        super().__init__(device)
        self.device_index = int(self.device.split(":")[1])
        if tile_scores is not None and (isinstance(tile_scores, bool) or tile_scores < 1):
            raise InvalidInputError(f"tile_scores must be an integer >= 1; got {tile_scores!r}")
        self._tile_scores = tile_scores
        self._device_ids: tuple[np.ndarray[Any, Any], Any] | None = None
        #: Per thread, the last small array `asarray` returned and its largest magnitude.
        self._checked = threading.local()
        #: Per thread, host copies of the last `topk`'s answer made with its check ({id: (array, copy)}).
        self._fetched = threading.local()
        #: Whether `host_topk` of a few queries replays a captured CUDA graph (`gpurag_cupy.graphs`).
        self.use_graphs = True
        self._graphs: Any = None

    @classmethod
    def availability(cls) -> Availability:
        """Available where cupy is installed and sees a CUDA device; otherwise the reason."""
        return cupy_availability()

    @classmethod
    def devices(cls) -> tuple[str, ...]:
        """Each CUDA device cupy sees (``cuda:0``, ``cuda:1``...); none where cupy cannot run."""
        if not cupy_availability():
            return ()
        return tuple(f"cuda:{index}" for index in range(cupy_device_count()))

    @classmethod
    def normalize_device(cls, device: str | None) -> str:
        """As `DistanceBackend.normalize_device`; where cupy cannot run, a `BackendUnavailableError` saying why."""
        availability = cupy_availability()
        if not availability:
            raise BackendUnavailableError(f"backend {cls.name!r} is unavailable: {availability.reason}")
        return super().normalize_device(device)

    @property
    def tile_scores(self) -> int:
        """Most float32 scores one tile of a search holds."""
        return self._tile_scores or max(1024, get_settings().memory_budget_bytes // 4)

    @contextlib.contextmanager
    def _on_device(self, like: Any = None) -> Iterator[None]:
        """Work on this backend's card, on torch's current stream when ``like`` is a torch CUDA tensor."""
        import cupy

        from gpurag_cupy.arrays import torch_stream

        with cupy.cuda.Device(self.device_index), torch_stream(like):
            yield

    # --- conversion at the edges ---------------------------------------------------------------
    def asarray(self, x: Any, name: str, *, dim: int | None = None) -> Any:
        """``x`` as a float32 (rows, dim) CuPy array on this card: zero-copy for device arrays already float32 there."""
        from gpurag_cupy.arrays import PendingCheck, as_device_matrix

        self._resolve_pending()
        defer = DEFER_QUERY_CHECK and name in DEFERRED_CHECK_NAMES
        with self._on_device(x):
            array, largest = as_device_matrix(x, name, dim=dim, defer_check=defer)
            if isinstance(largest, PendingCheck) and array.shape[0] > CHECKED_ROWS:
                largest = largest.resolve()  # too many rows to remember: checked now
        if largest is not None and array.shape[0] <= CHECKED_ROWS:
            self._checked.last = (array, largest)  # `topk` bounds these queries' norms without a wait
        return array

    def _largest_magnitude(self, queries: Any) -> Any:
        """What `asarray` measured of ``queries`` (this very array): its largest |q_ij|, or the `PendingCheck`
        that will tell; None where it did not come through `asarray` (or was not remembered)."""
        last = getattr(self._checked, "last", None)
        return last[1] if last is not None and last[0] is queries else None

    def _resolve_pending(self) -> None:
        """Read the check `asarray` last deferred on this thread, if unread (an `InvalidInputError` if not finite).

        Called before any other use of an array through the backend than the `topk` it was deferred for,
        so every device array handed in is checked before its answer is returned.
        """
        from gpurag_cupy.arrays import PendingCheck

        last = getattr(self._checked, "last", None)
        if last is not None and isinstance(last[1], PendingCheck):
            self._checked.last = None  # read once, even where it raises
            with last[1].stream:
                self._checked.last = (last[0], last[1].resolve())

    def to_numpy(self, x: Any) -> np.ndarray[Any, Any]:
        """A host NumPy copy of a CuPy array (other arrays pass through `gpurag.arrays.to_host`).

        The scores and rows of this thread's last `topk` of device queries were copied already, with
        their check (one copy for the search): each is handed out once from there.
        """
        from gpurag_cupy.arrays import to_numpy

        copies = getattr(self._fetched, "copies", None)
        if copies:
            found = copies.pop(id(x), None)
            if found is not None and found[0] is x:
                return found[1]  # type: ignore[no-any-return]
        return to_numpy(x)

    def _matrix(self, x: Any, name: str, *, resolve: bool = True) -> Any:
        import cupy

        if (
            isinstance(x, cupy.ndarray)
            and x.dtype == cupy.float32
            and x.flags.c_contiguous
            and x.device.id == self.device_index
        ):
            if resolve:
                self._resolve_pending()
            return x
        array = self.asarray(x, name)
        if resolve:
            self._resolve_pending()
        return array

    def empty_rows(self, like: Any, shape: tuple[int, ...]) -> Any:
        """An uninitialised CuPy array of ``shape`` and ``like``'s dtype on this card."""
        import cupy

        if isinstance(like, cupy.ndarray):
            with cupy.cuda.Device(self.device_index):
                return cupy.empty(shape, dtype=like.dtype)
        return super().empty_rows(like, shape)

    # --- the database --------------------------------------------------------------------------
    def prepare(self, vectors: Any, metric: Metric) -> Database:
        """A copy of ``vectors`` on this card, with what ``metric`` ranks by (row norms, -|x|², 1/|x|)."""
        from gpurag_cupy.arrays import foreign_device_array
        from gpurag_cupy.database import prepare_rows

        metric = Metric.parse(metric)
        with self._on_device(vectors):
            rows = self._matrix(vectors, "vectors")
            source = foreign_device_array(vectors)
            if source is not None and source.data.ptr == rows.data.ptr:
                rows = rows.copy()  # never keep the caller's memory
            return prepare_rows(rows, metric)

    def _own(self, database: Database) -> Any:
        import cupy

        from gpurag_cupy.database import CupyDatabase, required_keys

        if (
            isinstance(database, CupyDatabase)
            and isinstance(database.vectors, cupy.ndarray)
            and required_keys(database.metric) <= set(database.row_data)
        ):
            return database
        return self.prepare(database.vectors, database.metric)  # prepared elsewhere

    def append(self, database: Database, vectors: Any) -> Database:
        """``database`` with ``vectors`` added as its last rows, in place on the card (`DistanceBackend.append`)."""
        with self._on_device(vectors):
            own = self._own(database)
            added = self.prepare(self._matrix(vectors, "vectors"), own.metric)
            if added.dim != own.dim:
                raise InvalidInputError(f"vectors must be (rows, {own.dim}); got shape {tuple(added.vectors.shape)}")
            grown: Any = self.append_prepared(own, added)
            grown.max_norm = max(own.max_norm, getattr(added, "max_norm", math.inf))
            return grown  # type: ignore[no-any-return]

    def move_rows(self, database: Database, moves: RowMoves) -> Database:
        """``database`` compacted in place on the card (`DistanceBackend.move_rows`): a gather and scatter per array."""
        import cupy

        with self._on_device():
            own = self._own(database)
            if moves.sources.size:
                sources = cupy.asarray(np.ascontiguousarray(moves.sources, dtype=np.int64))
                holes = cupy.asarray(np.ascontiguousarray(moves.destinations, dtype=np.int64))
                for array in (own.storage or own.row_arrays()).values():
                    array[holes] = array[sources]
            empty = RowMoves(moves.sources[:0], moves.destinations[:0], moves.count)
            return super().move_rows(own, empty)  # shrinks the storage when it is mostly empty

    def take(self, database: Database, positions: np.ndarray[Any, Any]) -> Database:
        """A database of the rows at ``positions`` (host int64), in that order, gathered on the card."""
        import cupy

        with self._on_device():
            own = self._own(database)
            index = cupy.asarray(np.asarray(positions, dtype=np.int64))
            taken: Database = dataclasses.replace(
                own,
                vectors=own.vectors[index],
                row_data={key: value[index] for key, value in own.row_data.items()},
                storage={},
            )
            return taken

    def slice(self, database: Database, start: int, stop: int) -> Database:
        """Rows ``start:stop`` of ``database``, as views."""
        own = self._own(database)
        part: Database = dataclasses.replace(
            own,
            vectors=own.vectors[start:stop],
            row_data={key: value[start:stop] for key, value in own.row_data.items()},
            storage={},
        )
        return part

    # --- distances and selection ---------------------------------------------------------------
    def boundaries(self, metric: Metric, queries: int, dim: int) -> Boundaries:
        """Rows: a tile (`tile_scores` / Q rows), the candidate buffer's compaction (eight tiles), a
        selection block's share of keys, and the few-query path's chunk and tile; queries: CUDA's grid
        limit."""
        from gpurag_cupy.search import CHUNK_KEYS, MAX_GRID_QUERIES, few_query_tile
        from gpurag_cupy.select import CANDIDATE_FACTOR

        tile = max(1, self.tile_scores // max(1, queries))
        rows = {tile, tile * (CANDIDATE_FACTOR + 1), SELECTION_BLOCK_KEYS, CHUNK_KEYS}
        few_tile = few_query_tile(max(1, queries), self.tile_scores)
        if few_tile >= CHUNK_KEYS:
            rows.add(few_tile)
        return Boundaries(rows=tuple(sorted(rows)), queries=(MAX_GRID_QUERIES,))

    def working_scores(self, queries: int, rows: int) -> int:
        """Scores one `topk` holds at once: it tiles rows itself, so at most `tile_scores`."""
        return min(queries * rows, self.tile_scores)

    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        """The ``k`` best rows of ``database`` for each query, best first (any k up to the row count).

        Scores are float32 values computed directly for the rows returned (float64 sums); indices
        int64 row positions. Rows are ranked by float32 scores; where norms are large enough that a
        float32 term could overflow, the search is answered in float64.
        """
        from gpurag_cupy import search
        from gpurag_cupy.arrays import PendingCheck
        from gpurag_cupy.database import row_norms

        self._fetched.copies = {}
        with self._on_device(queries):
            own = self._own(database)
            n_rows = own.count
            if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n_rows:
                raise InvalidInputError(f"k must be an integer in 1..{n_rows} (the database's rows); got {k!r}")
            k = int(k)
            q = self._matrix(queries, "queries", resolve=False)
            if q.shape[1] != own.dim:
                raise InvalidInputError(f"queries must be (Q, {own.dim}); got shape {tuple(q.shape)}")
            largest = self._largest_magnitude(q)
            if largest is None:
                self._resolve_pending()  # say, of the array these queries are a slice of
            if isinstance(largest, PendingCheck):  # the search, then the check, on its stream; then one wait
                with largest.stream:
                    self._checked.last = None  # read once, even where it raises
                    few = search.few_query_search(q, own, k, self.tile_scores, largest)
                    if few is not None:  # answer and check come back in one copy
                        host_scores, host_rows, measured = few.fetch()
                        scores, rows = few.scores, few.rows
                        largest.resolve(measured)  # an InvalidInputError where a query is not finite
                        self._fetched.copies = {id(scores): (scores, host_scores), id(rows): (rows, host_rows)}
                    else:
                        scores, rows = search.float32_topk(q, own, k, self.tile_scores)
                        measured = largest.resolve()
                    self._checked.last = (q, measured)
                    if self._overflows(self._query_reach(measured, q.shape[1], own.metric), own):
                        self._fetched.copies = {}
                        return TopK(*search.float64_topk(q, own.vectors, k, own.metric))
                    return TopK(scores, rows)
            if largest is not None:  # decided before scoring
                if self._overflows(self._query_reach(largest, q.shape[1], own.metric), own):
                    return TopK(*search.float64_topk(q, own.vectors, k, own.metric))
                return TopK(*search.float32_topk(q, own, k, self.tile_scores))
            scores, rows = search.float32_topk(q, own, k, self.tile_scores)  # queued, not waited for
            reach = row_norms(q, own.metric).max()
            if self._overflows(float(reach), own):  # the one wait of such a search
                scores, rows = search.float64_topk(q, own.vectors, k, own.metric)
            return TopK(scores, rows)

    def host_topk(self, queries: Any, database: Database, k: int, *, dim: int | None = None) -> TopK:
        """As `DistanceBackend.host_topk`; a few float32 queries on this card (or on the host) cost one query copy,
        one replay of a captured CUDA graph and one wait (`graphs.GraphCache.run`), their check in the graph."""
        from gpurag_cupy.search import FEW_MAX_QUERIES

        if self.use_graphs:
            if isinstance(queries, np.ndarray) and queries.ndim == 2 and 1 <= queries.shape[0] <= FEW_MAX_QUERIES:
                queries = self.asarray(queries, "queries", dim=dim)  # checked on the host, copied up once
            found = self._graph_topk(queries, database, k, dim)
            if found is not None:
                return found
        return super().host_topk(queries, database, k, dim=dim)

    def _graph_topk(self, queries: Any, database: Database, k: Any, dim: int | None) -> TopK | None:
        """`host_topk` by graph replay, or None where it does not apply or the answer needs the careful path
        (queries not finite, float32 terms that may overflow): that path then answers or raises."""
        from gpurag_cupy import graphs
        from gpurag_cupy.arrays import device_matrix_pointer

        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            return None
        self._resolve_pending()
        with self._on_device(queries):
            found = device_matrix_pointer(queries, self.device_index)
            if found is None:
                return None
            pointer, shape = found
            own = self._own(database)
            if shape[1] != own.dim or (dim is not None and dim != own.dim) or k > own.count:
                return None
            if self._graphs is None:
                self._graphs = graphs.GraphCache()
            answer = self._graphs.run(pointer, shape, own, k, self.tile_scores)
        if answer is None or self._overflows(self._query_reach(answer.largest, shape[1], own.metric), own):
            return None  # not finite (the careful path names the entry) or possibly overflowing
        return TopK(answer.scores, answer.rows)

    @staticmethod
    def _query_reach(largest: float, dim: int, metric: Metric) -> float:
        """A bound of the queries' norms from their largest |q_ij|: |q| <= sqrt(D) max, Σ|q| <= D max (l1)."""
        return largest * (dim if metric is Metric.L1 else math.sqrt(dim))

    @staticmethod
    def _overflows(query_reach: float, database: Any) -> bool:
        """Whether float32 terms of a search may overflow: norms past `FLOAT32_SAFE_REACH` (or infinite)."""
        reach = query_reach + database.max_norm
        if database.metric is Metric.L1:
            reach = math.sqrt(reach) if reach >= 0 else reach
        return not math.isfinite(reach) or reach > FLOAT32_SAFE_REACH

    def concat_topk(self, blocks: list[TopK]) -> TopK:
        """Query blocks stacked on the card (blocks merged on the host are copied up)."""
        import cupy

        with self._on_device():
            return TopK(
                cupy.concatenate([cupy.asarray(b.scores) for b in blocks]),
                cupy.concatenate([cupy.asarray(b.indices) for b in blocks]),
            )

    def map_ids(self, ids: np.ndarray[Any, Any], positions: Any) -> Any:
        """``ids[positions]`` on the card; the ids go up once per ids array (the retriever replaces it on change)."""
        import cupy

        with self._on_device():
            cached = self._device_ids
            if cached is None or cached[0] is not ids:
                cached = (ids, cupy.asarray(np.ascontiguousarray(ids, dtype=np.int64)))
                self._device_ids = cached
            return cached[1][cupy.asarray(positions)]

    def pad_result(self, scores: Any, ids: Any, width: int, worst: float) -> tuple[Any, Any]:
        """(scores, ids) padded on the card to ``width`` columns with ``worst`` and id -1."""
        import cupy

        with self._on_device():
            pad = ((0, 0), (0, width - int(scores.shape[1])))
            return (
                cupy.pad(cupy.asarray(scores), pad, constant_values=worst),
                cupy.pad(cupy.asarray(ids), pad, constant_values=-1),
            )

    def pairwise(self, queries: Any, vectors: Any, metric: Metric) -> Any:
        """The (Q, N) float32 matrix of ``metric``, each entry summed directly in float64."""
        from gpurag_cupy import search

        metric = Metric.parse(metric)
        with self._on_device(queries):
            q = self._matrix(queries, "queries")
            x = self._matrix(vectors, "vectors")
            if q.shape[1] != x.shape[1]:
                raise InvalidInputError(
                    f"queries and vectors must share a dimension; got {q.shape[1]} and {x.shape[1]}"
                )
            return search.pairwise(q, x, metric)

    # --- LSH primitives ------------------------------------------------------------------------
    def sign_codes(self, vectors: Any, planes: Any) -> Any:
        """Packed sign bits, uint8 (N, ceil(B / 8)), little bit order; projections summed in float64."""
        import cupy

        with self._on_device(vectors):
            x = self._matrix(vectors, "vectors")
            p = self._matrix(planes, "planes")
            if x.shape[1] != p.shape[1]:
                raise InvalidInputError(
                    f"vectors (N, D) and planes (B, D) must share D; got {tuple(x.shape)} and {tuple(p.shape)}"
                )
            bits = (x.astype(cupy.float64) @ p.astype(cupy.float64).T) > 0
            n_rows, n_bits = bits.shape
            width = (n_bits + 7) // 8
            padded = cupy.zeros((n_rows, width * 8), dtype=cupy.uint8)  # cupy.packbits has no axis
            padded[:, :n_bits] = bits
            weights = cupy.asarray(BIT_WEIGHTS)
            return (padded.reshape(n_rows, width, 8) * weights).sum(axis=2, dtype=cupy.uint8)

    def hamming_topk(self, codes: Any, database_codes: Any, k: int) -> TopK:
        """The ``k`` database codes nearest each code, nearest first; int32 distances, int64 rows."""
        from gpurag_cupy import search
        from gpurag_cupy.arrays import as_device_codes

        with self._on_device(codes):
            a = as_device_codes(codes, "codes")
            b = as_device_codes(database_codes, "database_codes")
            if a.shape[1] != b.shape[1]:
                raise InvalidInputError(
                    f"codes must be (Q, W) and (N, W) with one W; got {tuple(a.shape)} and {tuple(b.shape)}"
                )
            n_rows = b.shape[0]
            if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n_rows:
                raise InvalidInputError(f"k must be an integer in 1..{n_rows} (the database codes); got {k!r}")
            distances, rows = search.hamming_topk(a, b, int(k), self.tile_scores)
            return TopK(distances, rows)
