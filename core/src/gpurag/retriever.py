"""The retriever interface, and `ExactRetriever`: every vector scored, chunked under a memory budget."""

from __future__ import annotations

import abc
import operator
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gpurag import storage
from gpurag.arrays import FloatMatrix, IdArray, as_id_list, as_ids, check_int, check_k
from gpurag.backend import MIN_CAPACITY, Database, DistanceBackend, RowMoves
from gpurag.errors import IndexFormatError, InvalidInputError, UnsupportedError
from gpurag.locking import ReadWriteLock
from gpurag.metrics import Metric, SearchResult, TopK
from gpurag.settings import get_settings

#: The largest int64 id.
INT64_MAX = int(np.iinfo(np.int64).max)
#: Bytes per score a backend holds while it scores one chunk (float32).
SCORE_BYTES = 4


class Retriever(abc.ABC):
    """A searchable set of vectors with int64 ids: add, remove, search, save, load."""

    #: The name the retriever is registered under; saved in the manifest.
    name: ClassVar[str] = ""

    metric: Metric
    backend: DistanceBackend

    @abc.abstractmethod
    def add(self, vectors: Any, ids: Any = None) -> IdArray:
        """Add (N, D) ``vectors`` under ``ids`` (distinct int64 >= 0; None: the next free ones); return the ids."""

    @abc.abstractmethod
    def remove(self, ids: Any) -> int:
        """Remove the vectors with these ids; return how many were present and removed."""

    @abc.abstractmethod
    def search(self, queries: Any, k: int) -> SearchResult:
        """The ``k`` nearest vectors to each query: ``(scores float32 (Q, k), ids int64 (Q, k))``, best first.

        Where k exceeds the index size the tail holds id -1 and the metric's worst value (as FAISS).
        """

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of vectors held."""

    @property
    @abc.abstractmethod
    def dim(self) -> int | None:
        """Dimension of the vectors, or None until the first add."""

    @abc.abstractmethod
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to directory ``path`` atomically (see `gpurag.storage`)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, path: str | os.PathLike[str], backend: str | DistanceBackend = "auto") -> Retriever:
        """Read an index that `save` wrote, onto ``backend``."""


def plan_chunks(
    queries: int,
    rows: int,
    budget_bytes: int,
    max_query_chunk: int,
    working_scores: Callable[[int, int], int] = operator.mul,
) -> tuple[int, int]:
    """(query chunk, row chunk) sizes for which ``working_scores(q, r)`` float32 scores fit ``budget_bytes``.

    ``working_scores`` is the backend's (`DistanceBackend.working_scores`). Whole rows are favoured
    (at least 1,024 per chunk where the index has them) since each query chunk re-reads the
    database; a budget below one score still gives chunks of one query and one row.
    """
    budget = max(1, budget_bytes // SCORE_BYTES)
    min_rows = min(rows, 1024)
    query_chunk = max(1, min(queries, max_query_chunk))
    while query_chunk > 1 and working_scores(query_chunk, min_rows) > budget:
        query_chunk = max(1, min(query_chunk // 2, budget // max(1, min_rows)))
    if working_scores(query_chunk, rows) <= budget:
        return query_chunk, rows
    low, high = 1, rows  # the largest row chunk that fits, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        if working_scores(query_chunk, mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return query_chunk, low


class ExactRetriever(Retriever):
    """Exact k-nearest-neighbour search over every vector, through a distance backend's `topk`.

    ``metric`` is ``l2`` (squared), ``dot``, ``cosine`` or ``l1``; ``backend`` a name (``"auto"``,
    ``"numpy"``...) or a `DistanceBackend`. Searches are split into chunks of queries and rows whose
    scores fit ``memory_budget_bytes`` (default: the ``memory_budget_bytes`` setting) whatever N and Q
    are, and the partial results are merged.
    """

    name = "exact"

    def __init__(
        self,
        metric: Metric | str = "l2",
        backend: str | DistanceBackend = "auto",
        *,
        dim: int | None = None,
        device: str | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        from gpurag.plugins import get_backend

        self.metric = Metric.parse(metric)
        if dim is not None:
            dim = check_int(dim, "dim", minimum=1)
        if memory_budget_bytes is not None:
            memory_budget_bytes = check_int(memory_budget_bytes, "memory_budget_bytes", minimum=1)
        self.backend = get_backend(backend, device=device, metric=self.metric)
        if self.metric not in self.backend.metrics:
            raise UnsupportedError(f"backend {self.backend.name!r} does not support metric {self.metric.value!r}")
        self.memory_budget_bytes = memory_budget_bytes
        self._dim = dim
        self._id_storage: IdArray = np.empty(0, dtype=np.int64)  # ids by row position; capacity doubles
        self._count = 0
        #: The live ids as one view object, replaced on every change: backends that keep a device
        #: copy for `DistanceBackend.map_ids` key it by this object's identity.
        self._live_ids: IdArray = self._id_storage[:0]
        self._positions: dict[int, int] = {}  # id -> row position
        self._next_id = 0
        self._database: Database | None = None
        self._lock = ReadWriteLock()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(metric={self.metric.value!r}, backend={self.backend.name!r}, "
            f"dim={self._dim}, count={len(self)})"
        )

    def __len__(self) -> int:
        return self._count

    @property
    def dim(self) -> int | None:
        """Dimension of the vectors, or None until the first add."""
        return self._dim

    @property
    def ids(self) -> IdArray:
        """The ids held, in the order of `vectors` (a copy); a removal moves the last rows into its holes."""
        with self._lock.read():
            return self._id_storage[: self._count].copy()

    def vectors(self) -> FloatMatrix:
        """The vectors held, float32 (N, D), in the order of `ids` (a copy)."""
        with self._lock.read():
            return self._vectors_copy()

    def _vectors_copy(self) -> FloatMatrix:
        if self._database is None:
            return np.empty((0, self._dim or 0), dtype=np.float32)
        return np.array(self.backend.to_numpy(self._database.vectors), dtype=np.float32, copy=True)

    def add(self, vectors: Any, ids: Any = None) -> IdArray:
        """Add (N, D) ``vectors`` under ``ids`` (distinct int64 >= 0; None: the next free ones); return the ids.

        Amortised O(N): the rows are appended in place (see `DistanceBackend.append`).
        """
        with self._lock.write():
            matrix = self.backend.asarray(vectors, "vectors", dim=self._dim)  # checked once, here
            if isinstance(matrix, np.ndarray) and (matrix is vectors or not matrix.flags.owndata):
                matrix = matrix.copy()  # the index must not change when the caller's array does
            rows = int(matrix.shape[0])
            if ids is None:
                if self._next_id + rows - 1 > INT64_MAX:
                    raise InvalidInputError(
                        f"ids: the next {rows} automatic ids would pass {INT64_MAX} (2**63 - 1); pass ids explicitly"
                    )
                new_ids = np.arange(self._next_id, self._next_id + rows, dtype=np.int64)
            else:
                new_ids = as_ids(ids, rows)
                clash = [i for i in new_ids.tolist() if i in self._positions]
                if clash:
                    raise InvalidInputError(f"ids are already in the index: {clash[:5]}")
            if self._dim is None:
                self._dim = int(matrix.shape[1])
            if self._database is None or self._count == 0:
                self._database = self.backend.prepare(matrix, self.metric)
            else:
                self._database = self.backend.append(self._database, matrix)
            self._rows_appended(self._count)
            self._append_ids(new_ids)
            return new_ids

    def _rows_appended(self, start: int) -> None:
        """Called under the write lock once the database holds new rows from position ``start`` on.

        A subclass that keeps data aligned with the rows appends its own for those rows here
        (``start`` is 0 when the database was prepared afresh); the default keeps nothing.
        """

    def _rows_moved(self, moves: RowMoves) -> None:
        """Called under the write lock once a removal compacted the database by ``moves``.

        A subclass that keeps data aligned with the rows applies the same moves to it here; the
        default keeps nothing.
        """

    def _append_ids(self, new_ids: IdArray) -> None:
        count, extra = self._count, int(new_ids.shape[0])
        if count + extra > self._id_storage.shape[0]:
            grown = np.empty(max(count + extra, 2 * self._id_storage.shape[0], MIN_CAPACITY), dtype=np.int64)
            grown[:count] = self._id_storage[:count]
            self._id_storage = grown
        self._id_storage[count : count + extra] = new_ids
        self._positions.update(zip(new_ids.tolist(), range(count, count + extra), strict=True))
        self._count = count + extra
        self._live_ids = self._id_storage[: self._count]
        if extra:
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)

    def remove(self, ids: Any) -> int:
        """Remove the vectors with these ids; return how many were present and removed (absent ids are ignored).

        O(ids given): the last rows move into the holes (see `DistanceBackend.move_rows`).
        """
        wanted = as_id_list(ids)
        with self._lock.write():
            positions = [self._positions.pop(i) for i in set(wanted.tolist()) if i in self._positions]
            if not positions:
                return 0
            moves = RowMoves.plan(self._count, np.array(positions, dtype=np.int64))
            if self._database is not None:
                self._database = self.backend.move_rows(self._database, moves)
            self._rows_moved(moves)
            moved_ids = self._id_storage[moves.sources]
            self._id_storage[moves.destinations] = moved_ids
            self._positions.update(zip(moved_ids.tolist(), moves.destinations.tolist(), strict=True))
            self._count = moves.count
            self._live_ids = self._id_storage[: self._count]
            return len(positions)

    def search(self, queries: Any, k: int, *, out: str = "numpy") -> SearchResult:
        """The ``k`` nearest vectors to each query: ``(scores float32 (Q, k), ids int64 (Q, k))``, best first.

        Where k exceeds the index size the tail holds id -1 and the metric's worst value (as FAISS).
        k above the ``max_k`` setting, or an empty index, is an `InvalidInputError`. ``out="device"``
        returns the backend's own arrays (torch tensors on its device, say) for callers that feed
        another GPU stage: intermediate results stay on the device and nothing is copied to the host.
        """
        k = check_k(k, get_settings().max_k)
        self._check_out(out)
        with self._lock.read():
            if self._count == 0 or self._database is None:
                raise InvalidInputError("the index is empty; add vectors before searching")
            database = self._database
            if self.backend.max_k is not None and min(k, database.count) > self.backend.max_k:
                raise UnsupportedError(
                    f"k={k} exceeds what backend {self.backend.name!r} supports ({self.backend.max_k})"
                )
            shape = getattr(queries, "shape", None)
            if out == "numpy" and shape is not None and len(shape) == 2 and self._one_chunk(int(shape[0]), database):
                # One chunk straight to the host: a GPU backend answers it in one device round trip.
                top = self.backend.host_topk(queries, database, min(k, database.count), dim=self._dim)
                return self._result(top, k, out)
            native = self.backend.asarray(queries, "queries", dim=self._dim)
            top = self._chunked_topk(native, database, min(k, database.count))
            return self._result(top, k, out)

    @staticmethod
    def _check_out(out: str) -> None:
        if out not in ("numpy", "device"):
            raise InvalidInputError(f"out must be 'numpy' or 'device'; got {out!r}")

    def _result(self, top: TopK, k: int, out: str) -> SearchResult:
        """``top`` (row positions of the current rows) as ids, padded to ``k``; call under the read lock."""
        count = self._count
        if out == "device":
            found_on_device = self.backend.map_ids(self._live_ids, top.indices)
            if k > count:
                return SearchResult(*self.backend.pad_result(top.scores, found_on_device, k, self.metric.worst))
            return SearchResult(top.scores, found_on_device)
        found = self._id_storage[self.backend.to_numpy(top.indices).astype(np.int64, copy=False)]
        scores = self.backend.to_numpy(top.scores).astype(np.float32, copy=False)
        if k > count:
            scores = np.pad(scores, ((0, 0), (0, k - count)), constant_values=self.metric.worst)
            found = np.pad(found, ((0, 0), (0, k - count)), constant_values=-1)
        return SearchResult(np.ascontiguousarray(scores), np.ascontiguousarray(found))

    def _one_chunk(self, query_count: int, database: Database) -> bool:
        """Whether a search of ``query_count`` queries runs as one chunk (nothing to slice or merge)."""
        if query_count < 1:
            return False
        budget = self.memory_budget_bytes or get_settings().memory_budget_bytes
        if query_count * database.count * SCORE_BYTES <= budget:
            return True  # every score fits
        query_chunk, row_chunk = plan_chunks(
            query_count, database.count, budget, get_settings().max_query_chunk, self.backend.working_scores
        )
        return query_chunk >= query_count and row_chunk >= database.count

    def _chunked_topk(self, queries: Any, database: Database, k: int) -> TopK:
        budget = self.memory_budget_bytes or get_settings().memory_budget_bytes
        query_count = int(queries.shape[0])
        if self._one_chunk(query_count, database):
            return self.backend.topk(queries, database, k)
        query_chunk, row_chunk = plan_chunks(
            query_count, database.count, budget, get_settings().max_query_chunk, self.backend.working_scores
        )
        blocks: list[TopK] = []
        for q0 in range(0, query_count, query_chunk):
            block = queries[q0 : q0 + query_chunk]
            merged: TopK | None = None
            for r0 in range(0, database.count, row_chunk):
                part = self.backend.slice(database, r0, r0 + row_chunk)
                top = self.backend.topk(block, part, min(k, part.count))
                top = TopK(top.scores, top.indices + r0)
                merged = top if merged is None else self.backend.merge_topk(merged, top, k, self.metric)
            assert merged is not None
            blocks.append(merged)
        if len(blocks) == 1:
            return blocks[0]
        return self.backend.concat_topk(blocks)  # on the device: one host copy, at the end

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to directory ``path`` atomically: manifest.json, vectors.npy and ids.npy."""
        with self._lock.read():  # one snapshot: ids and vectors of one moment
            vectors = self._vectors_copy()
            ids, dim = self._id_storage[: self._count].copy(), self._dim
        with storage.atomic_directory(path) as tmp:
            storage.write_array(tmp, "vectors.npy", vectors)
            storage.write_array(tmp, "ids.npy", ids)
            storage.write_manifest(
                tmp,
                {
                    "kind": f"retriever:{self.name}",
                    "metric": self.metric.value,
                    "dim": dim,
                    "dtype": "float32",
                    "count": int(ids.shape[0]),
                },
                files=["vectors.npy", "ids.npy"],
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str], backend: str | DistanceBackend = "auto") -> ExactRetriever:
        """Read an index that `save` wrote, checking every file, onto ``backend``."""
        manifest = storage.read_manifest(path, kind=f"retriever:{cls.name}")
        where = Path(manifest["path"])
        vectors = storage.read_array(manifest, "vectors.npy")
        ids = storage.read_array(manifest, "ids.npy")
        count = storage.manifest_field(manifest, "count", int)
        dim = storage.manifest_field(manifest, "dim", (int, type(None)))
        metric = storage.manifest_field(manifest, "metric", str)
        if count < 0 or (dim is None and count > 0) or (dim is not None and dim < 1):
            raise IndexFormatError(f"{where / storage.MANIFEST} is damaged: count {count} with dim {dim}")
        try:
            metric = Metric.parse(metric)
        except InvalidInputError as exc:
            raise IndexFormatError(f"{where / storage.MANIFEST} is damaged: key 'metric': {exc}") from exc
        vectors_file, ids_file = where / "vectors.npy", where / "ids.npy"
        if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != count:
            expected = f"float32 ({count}, {dim})"
            raise IndexFormatError(
                f"{vectors_file} holds {vectors.dtype} {vectors.shape}, the manifest says {expected}"
            )
        if count and vectors.shape[1] != dim:
            raise IndexFormatError(f"{vectors_file} has dimension {vectors.shape[1]}, the manifest says {dim}")
        if ids.dtype != np.int64 or ids.shape != (count,):
            raise IndexFormatError(f"{ids_file} holds {ids.dtype} {ids.shape}, the manifest says int64 ({count},)")
        retriever = cls(metric=metric, backend=backend, dim=dim)
        if count:
            retriever.add(vectors, ids)
        return retriever
