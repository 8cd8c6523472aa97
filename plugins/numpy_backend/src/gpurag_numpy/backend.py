"""The NumPy distance backend: exact l2, dot, cosine and l1 search and the LSH primitives on the CPU.

Search is exact in the sense of `gpurag.testing.reference`: a fast pass (float32 GEMM; for l1,
16-bit integer codes) only shortlists, behind a threshold widened by a bound on its own error; the
rows it keeps are scored again directly (float64 sums), the answer is chosen on those scores, and
ties go to the lower position.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpurag.arrays import check_int
from gpurag.backend import Availability, Boundaries, Database, DistanceBackend
from gpurag.errors import InvalidInputError
from gpurag.metrics import Metric, TopK
from gpurag.settings import get_settings
from gpurag_numpy import lsh
from gpurag_numpy.database import (
    ROW_DATA,
    NumpyDatabase,
    l1_levels,
    l1_scale_for,
    row_data_for,
    row_max,
    set_l1_codes,
)
from gpurag_numpy.numerics import CHUNK_ELEMENTS, F32, F64, I64, U8
from gpurag_numpy.pairwise import pairwise_matrix
from gpurag_numpy.scorers import make_scorer, scan_query_boundaries, scan_shape
from gpurag_numpy.selection import SMALL_SEARCH_SCORES, search_chunk, search_one_dot, search_small
from gpurag_numpy.threads import BLAS_ONE_THREAD, MIN_PARALLEL_WORK, thread_count


class NumpyBackend(DistanceBackend):
    """Exact search with NumPy and its BLAS on the CPU: l2, dot, cosine and l1, any k, any size.

    Threads: ``GPURAG_NUMPY_THREADS`` (0: one per available core); rows per GEMM block:
    ``GPURAG_NUMPY_BLOCK_ROWS``.
    """

    name = "numpy"
    device_kinds = ("cpu",)
    metrics = frozenset(Metric)
    max_k = None

    @classmethod
    def availability(cls) -> Availability:
        """Always available: NumPy is a dependency."""
        return Availability(True)

    # --- the database --------------------------------------------------------------------------
    def prepare(self, vectors: Any, metric: Metric) -> NumpyDatabase:
        """``vectors`` (float32, rows x dim) and what ``metric`` needs precomputed; the rows are not copied."""
        metric = Metric.parse(metric)
        x = np.ascontiguousarray(self.to_numpy(vectors), dtype=np.float32)
        if x.ndim != 2:
            raise InvalidInputError(f"vectors must be 2-D (rows, dim); got shape {x.shape}")
        database = NumpyDatabase(metric=metric, vectors=x)
        database.row_data.update(row_data_for(x, metric))
        if metric is Metric.L1:
            scale = l1_scale_for(float(np.max(np.abs(x), initial=0.0)), x.shape[1])
            set_l1_codes(database, x, scale)
        return database

    def append(self, database: Database, vectors: Any) -> Database:
        """``database`` with ``vectors`` added as its last rows, in place past ``count`` (amortised O(new rows)).

        l1 rows are encoded at the database's scale; rows too large for it re-encode every row at a
        new (at least twice as large) scale.
        """
        new = np.ascontiguousarray(self.to_numpy(vectors), dtype=np.float32)
        if new.ndim != 2 or new.shape[1] != database.dim:
            raise InvalidInputError(f"vectors must be (rows, {database.dim}); got shape {new.shape}")
        if not isinstance(database, NumpyDatabase) or not set(ROW_DATA[database.metric]) <= set(database.row_data):
            return self.prepare(np.concatenate([self.to_numpy(database.vectors), new]), database.metric)
        if database.metric is not Metric.L1:
            return self.append_prepared(database, self.prepare(new, database.metric))
        scale = database.l1_scale
        if database.l1_codes is None or float(np.max(np.abs(new), initial=0.0)) > l1_levels(new.shape[1]) * scale:
            return self.prepare(np.concatenate([database.vectors, new]), database.metric)  # a new scale
        added = NumpyDatabase(metric=database.metric, vectors=new)
        set_l1_codes(added, new, scale)
        return self.append_prepared(database, added)

    def take(self, database: Database, positions: np.ndarray[Any, Any]) -> NumpyDatabase:
        """A new database of the rows at ``positions`` (host int64), in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        codes = database.l1_codes if isinstance(database, NumpyDatabase) else None
        return NumpyDatabase(
            metric=database.metric,
            vectors=np.ascontiguousarray(database.vectors[positions]),
            row_data={key: value[positions] for key, value in database.row_data.items()},
            l1_codes=None if codes is None else np.ascontiguousarray(codes[:, positions]),
            l1_scale=database.l1_scale if isinstance(database, NumpyDatabase) else 0.0,
        )

    def slice(self, database: Database, start: int, stop: int) -> NumpyDatabase:
        """Rows ``start:stop`` of ``database``, as views."""
        codes = database.l1_codes if isinstance(database, NumpyDatabase) else None
        return NumpyDatabase(
            metric=database.metric,
            vectors=database.vectors[start:stop],
            row_data={key: value[start:stop] for key, value in database.row_data.items()},
            l1_codes=None if codes is None else codes[:, start:stop],
            l1_scale=database.l1_scale if isinstance(database, NumpyDatabase) else 0.0,
        )

    # --- search --------------------------------------------------------------------------------
    def working_scores(self, queries: int, rows: int) -> int:
        """Scores (float32-sized values) one `topk` holds at once: each thread's tiles, not the whole block."""
        # Per thread, the largest temporary is a float64 chunk of CHUNK_ELEMENTS (two float32 each).
        return min(queries * rows, thread_count() * 2 * CHUNK_ELEMENTS)

    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        """The ``k`` best rows of ``database`` for each query, best first; ties go to the lower row.

        Scores are float32 values of the metric computed directly for the rows returned (no norm
        expansion; sums in float64); indices are int64 row positions. ``1 <= k <= database.count``.
        """
        q = np.ascontiguousarray(self.to_numpy(queries), dtype=np.float32)
        n_rows = database.count
        k = check_int(k, "k (at most the database's rows)", minimum=1, maximum=n_rows)
        if q.ndim != 2 or q.shape[1] != database.dim:
            raise InvalidInputError(f"queries must be (Q, {database.dim}); got shape {q.shape}")
        if not database.row_data.keys() >= set(ROW_DATA[database.metric]) or (
            database.metric is Metric.L1 and not (isinstance(database, NumpyDatabase) and database.l1_codes is not None)
        ):
            database = self.prepare(database.vectors, database.metric)  # not prepared by this backend
        n_queries = q.shape[0]
        zero = None
        if database.metric in (Metric.DOT, Metric.COSINE):
            # A zero query scores 0 against every row: the first k rows, in order.
            zero = None if (q.any() if n_queries == 1 else q.any(axis=1).all()) else ~q.any(axis=1)
        if zero is None:
            values, rows = self._search(q, database, k)
            if values.dtype == np.float32:
                return TopK(values, rows)
            with np.errstate(over="ignore"):  # a score beyond float32's range is inf
                return TopK(values.astype(np.float32), rows)
        scores = np.zeros((n_queries, k), dtype=np.float32)
        indices = np.empty((n_queries, k), dtype=np.int64)
        indices[zero] = np.arange(k)
        active = np.flatnonzero(~zero)
        if active.size:
            values, rows = self._search(q[active], database, k)
            with np.errstate(over="ignore"):
                scores[active] = values
            indices[active] = rows
        return TopK(scores, indices)

    @staticmethod
    def _threads(metric: Metric) -> int:
        """Threads a large search for ``metric`` splits over (1 where BLAS runs its own threads)."""
        if metric is not Metric.L1 and not BLAS_ONE_THREAD.available:
            return 1
        return thread_count()

    @staticmethod
    def _query_chunk(k: int, block_rows: int) -> int:
        """Queries searched at once: candidates take about 32 bytes each, within the memory budget."""
        return max(1, get_settings().memory_budget_bytes // (32 * (k + block_rows)))

    def boundaries(self, metric: Metric, queries: int, dim: int) -> Boundaries:
        """Blocks of rows and tiles of queries of the scan, thread splits by rows or by queries, query chunks."""
        block_rows, tile_queries = scan_shape(metric, queries)
        threads = self._threads(metric)
        rows = [block_rows]
        query_counts = [tile_queries, self._query_chunk(1, block_rows), *scan_query_boundaries(metric)]
        if threads > 1:
            rows.append(-(-MIN_PARALLEL_WORK // max(1, queries * dim)))  # threads start here
            query_counts.append(4 * threads)  # split by queries from here, by rows below
        return Boundaries(rows=tuple(rows), queries=tuple(query_counts))

    def _search(self, queries: F32, database: Database, k: int) -> tuple[F64 | F32, I64]:
        if queries.shape[0] == 1 and database.metric is Metric.DOT and database.count <= SMALL_SEARCH_SCORES:
            found = search_one_dot(queries[0], database.vectors, row_max(database, "norms"), k)
            if found is not None:
                return found
        scorer = make_scorer(queries, database)
        n_queries, n_rows = queries.shape[0], database.count
        if n_queries * n_rows <= SMALL_SEARCH_SCORES and n_rows <= scorer.block_rows:
            return search_small(scorer, k)
        uses_blas = database.metric is not Metric.L1
        threads = self._threads(database.metric)
        if n_queries * n_rows * queries.shape[1] < MIN_PARALLEL_WORK:
            threads = 1
        chunk = self._query_chunk(k, scorer.block_rows)
        values = np.empty((n_queries, k), dtype=np.float64)
        rows = np.empty((n_queries, k), dtype=np.int64)
        for c0 in range(0, n_queries, chunk):
            c1 = min(c0 + chunk, n_queries)
            values[c0:c1], rows[c0:c1] = search_chunk(scorer, c0, c1, k, threads, uses_blas)
        return values, rows

    # --- pairwise ------------------------------------------------------------------------------
    def pairwise(self, queries: Any, vectors: Any, metric: Metric) -> F32:
        """The (Q, N) float32 matrix of ``metric`` between every query and every vector (float64 inside)."""
        metric = Metric.parse(metric)
        return pairwise_matrix(self.to_numpy(queries), self.to_numpy(vectors), metric)

    # --- LSH primitives ------------------------------------------------------------------------
    def sign_codes(self, vectors: Any, planes: Any) -> U8:
        """Packed sign bits, uint8 (N, ceil(B / 8)), little bit order: bit j set when v·planes[j] > 0."""
        return lsh.sign_codes(self.to_numpy(vectors), self.to_numpy(planes))

    def hamming_topk(self, codes: Any, database_codes: Any, k: int) -> TopK:
        """The ``k`` database codes nearest each code in Hamming distance, nearest first, ties to the lower row."""
        return lsh.hamming_topk(self.to_numpy(codes), self.to_numpy(database_codes), k)

    def rerank(self, queries: Any, database: Database, candidates: Any, k: int) -> TopK:
        """The ``k`` best of each query's candidate rows, scored directly (float64 sums), best first."""
        return lsh.rerank(self.to_numpy(queries), database.vectors, self.to_numpy(candidates), k, database.metric)
