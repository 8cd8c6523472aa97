"""The retriever interface, and `ExactRetriever`: every vector scored, chunked under a memory budget."""

from __future__ import annotations

import abc
import operator
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gpurag import storage
from gpurag.arrays import FloatMatrix, IdArray, as_ids, check_k
from gpurag.backend import Database, DistanceBackend
from gpurag.errors import IndexFormatError, InvalidInputError, UnsupportedError
from gpurag.metrics import Metric, SearchResult, TopK
from gpurag.settings import get_settings

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
        self.backend = get_backend(backend, device=device)
        if self.metric not in self.backend.metrics:
            raise UnsupportedError(f"backend {self.backend.name!r} does not support metric {self.metric.value!r}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise InvalidInputError(f"dim must be an integer >= 1; got {dim!r}")
        if memory_budget_bytes is not None and memory_budget_bytes < 1:
            raise InvalidInputError(f"memory_budget_bytes must be >= 1; got {memory_budget_bytes}")
        self.memory_budget_bytes = memory_budget_bytes
        self._dim = dim
        self._ids: IdArray = np.empty(0, dtype=np.int64)
        self._database: Database | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(metric={self.metric.value!r}, backend={self.backend.name!r}, "
            f"dim={self._dim}, count={len(self)})"
        )

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    @property
    def dim(self) -> int | None:
        """Dimension of the vectors, or None until the first add."""
        return self._dim

    @property
    def ids(self) -> IdArray:
        """The ids held, in insertion order (a copy)."""
        return self._ids.copy()

    def vectors(self) -> FloatMatrix:
        """The vectors held, float32 (N, D), in the order of `ids` (a copy)."""
        with self._lock:
            if self._database is None:
                return np.empty((0, self._dim or 0), dtype=np.float32)
            return np.array(self.backend.to_numpy(self._database.vectors), dtype=np.float32, copy=True)

    def add(self, vectors: Any, ids: Any = None) -> IdArray:
        """Add (N, D) ``vectors`` under ``ids`` (distinct int64 >= 0; None: the next free ones); return the ids."""
        with self._lock:
            matrix = self.backend.asarray(vectors, "vectors", dim=self._dim)  # checked once, here
            if isinstance(matrix, np.ndarray) and (matrix is vectors or not matrix.flags.owndata):
                matrix = matrix.copy()  # the index must not change when the caller's array does
            if ids is None:
                start = int(self._ids.max()) + 1 if len(self) else 0
                new_ids = np.arange(start, start + int(matrix.shape[0]), dtype=np.int64)
            else:
                new_ids = as_ids(ids, int(matrix.shape[0]))
                clash = np.isin(new_ids, self._ids)
                if clash.any():
                    raise InvalidInputError(f"ids are already in the index: {new_ids[clash][:5].tolist()}")
            if self._dim is None:
                self._dim = int(matrix.shape[1])
            if self._database is None or len(self) == 0:
                self._database = self.backend.prepare(matrix, self.metric)
            else:
                self._database = self.backend.append(self._database, matrix)
            self._ids = np.concatenate([self._ids, new_ids])
            return new_ids

    def remove(self, ids: Any) -> int:
        """Remove the vectors with these ids; return how many were present and removed (absent ids are ignored)."""
        with self._lock:
            wanted = np.asarray(ids)
            if wanted.ndim == 0:
                wanted = wanted.reshape(1)
            if wanted.size and wanted.dtype.kind not in "iu":
                raise InvalidInputError(f"ids must be integers; got dtype {wanted.dtype}")
            if wanted.ndim != 1:
                raise InvalidInputError(f"ids must be 1-D; got shape {wanted.shape}")
            drop = np.isin(self._ids, wanted)
            removed = int(drop.sum())
            if removed == 0:
                return 0
            keep = np.flatnonzero(~drop)
            self._ids = self._ids[keep]
            if self._database is not None:
                self._database = self.backend.take(self._database, keep)
            return removed

    def search(self, queries: Any, k: int, *, out: str = "numpy") -> SearchResult:
        """The ``k`` nearest vectors to each query: ``(scores float32 (Q, k), ids int64 (Q, k))``, best first.

        Where k exceeds the index size the tail holds id -1 and the metric's worst value (as FAISS).
        An empty index is an `InvalidInputError`. ``out="device"`` returns the backend's own arrays
        (torch tensors on its device, say) for callers that feed another GPU stage: intermediate
        results stay on the device and nothing is copied to the host.
        """
        k = check_k(k)
        if out not in ("numpy", "device"):
            raise InvalidInputError(f"out must be 'numpy' or 'device'; got {out!r}")
        with self._lock:
            if len(self) == 0 or self._database is None:
                raise InvalidInputError("the index is empty; add vectors before searching")
            if self.backend.max_k is not None and min(k, len(self)) > self.backend.max_k:
                raise UnsupportedError(
                    f"k={k} exceeds what backend {self.backend.name!r} supports ({self.backend.max_k})"
                )
            native = self.backend.asarray(queries, "queries", dim=self._dim)
            database, ids = self._database, self._ids
        top = self._chunked_topk(native, database, min(k, database.count))
        if out == "device":
            found_on_device = self.backend.map_ids(ids, top.indices)
            if k > database.count:
                return SearchResult(*self.backend.pad_result(top.scores, found_on_device, k, self.metric.worst))
            return SearchResult(top.scores, found_on_device)
        scores = self.backend.to_numpy(top.scores).astype(np.float32, copy=False)
        positions = self.backend.to_numpy(top.indices).astype(np.int64, copy=False)
        found = ids[positions]
        if k > database.count:
            pad = k - database.count
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=self.metric.worst)
            found = np.pad(found, ((0, 0), (0, pad)), constant_values=-1)
        return SearchResult(np.ascontiguousarray(scores), np.ascontiguousarray(found))

    def _chunked_topk(self, queries: Any, database: Database, k: int) -> TopK:
        budget = self.memory_budget_bytes or get_settings().memory_budget_bytes
        query_count = int(queries.shape[0])
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
        vectors = self.vectors()
        with self._lock:
            ids, dim = self._ids, self._dim
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
        count, dim = manifest.get("count"), manifest.get("dim")
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
        retriever = cls(metric=manifest["metric"], backend=backend, dim=dim)
        if count:
            retriever.add(vectors, ids)
        return retriever
