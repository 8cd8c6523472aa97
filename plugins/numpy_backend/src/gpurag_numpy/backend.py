"""The NumPy distance backend: exact l2, dot, cosine and l1 search and the LSH primitives on the CPU.

Search is exact in the sense of `gpurag.testing.reference`: a fast pass (float32 GEMM; for l1,
16-bit integer codes) only shortlists, behind a threshold widened by a bound on its own error; the
rows it keeps are scored again directly (float64 sums), the answer is chosen on those scores, and
ties go to the lower position.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from gpurag.backend import Availability, Database, DistanceBackend
from gpurag.errors import InvalidInputError
from gpurag.metrics import Metric, TopK
from gpurag.settings import get_settings

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
I16 = npt.NDArray[np.int16]
U8 = npt.NDArray[np.uint8]
_T = TypeVar("_T")

#: float32 unit roundoff.
_U32 = 2.0**-24
#: Scores (queries x rows) one GEMM tile holds: large enough for an efficient GEMM, small enough to stay in cache.
_GEMM_TILE_SCORES = 1 << 19
#: Database rows one l1 block covers (NumPy's broadcasting loops slow down past about 2,500).
_L1_BLOCK_ROWS = 2048
#: Scores (queries x rows) one l1 tile holds.
_L1_TILE_SCORES = 1 << 17
#: Elements (queries x dims x rows) of the int16 temporary one l1 step writes.
_L1_STEP_ELEMENTS = 1 << 21
#: From this many queries on, each block of l1 codes is copied to contiguous memory first.
_L1_COPY_QUERIES = 4
#: Dimensions whose int16 codes are summed before widening to int32; fixes the l1 code range.
_L1_GROUP_DIMS = 128
#: Elements one chunk of a float64 pairwise computation, a rescoring or a Hamming scan may hold.
_CHUNK_ELEMENTS = 1 << 21
#: Below this many multiply-adds a search runs on the calling thread alone.
_MIN_PARALLEL_WORK = 1 << 22
#: Below this many queries, GEMM blocks are scored in place instead of copied.
_FEW_QUERIES = 32
#: Candidates wait until they number this many times the kept ones before they are merged in.
_MERGE_FACTOR = 0.5


def _gamma(n: float) -> float:
    """Bound on the relative rounding error of n float32 operations (Higham's gamma_n)."""
    return n * _U32 / (1.0 - n * _U32)


# --- threads ------------------------------------------------------------------------------------
class _BlasOneThread:
    """Holds the BLAS libraries at one thread while any search that runs its own threads is active.

    Needs threadpoolctl; `available` says whether it could be loaded.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._limiter: Any = None
        self._controller: Any = None
        self._loaded = False

    @property
    def available(self) -> bool:
        """Whether BLAS threads can be limited (threadpoolctl is installed)."""
        with self._lock:
            self._load()
            return self._controller is not None

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            threadpoolctl = importlib.import_module("threadpoolctl")
        except ImportError:
            return
        try:
            self._controller = threadpoolctl.ThreadpoolController()
        except Exception:  # a broken BLAS introspection must not break search
            self._controller = None

    def __enter__(self) -> None:
        with self._lock:
            self._load()
            if self._controller is None:
                return
            if self._depth == 0:
                self._limiter = self._controller.limit(limits=1, user_api="blas")
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._controller is None:
                return
            self._depth -= 1
            if self._depth == 0 and self._limiter is not None:
                self._limiter.restore_original_limits()
                self._limiter = None


_BLAS_ONE_THREAD = _BlasOneThread()
_POOL_LOCK = threading.Lock()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _thread_count() -> int:
    """Threads a search may use: ``numpy_threads``, or one per core available to this process."""
    configured = get_settings().numpy_threads
    if configured:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _run_parallel(tasks: Sequence[Callable[[], _T]], *, uses_blas: bool) -> list[_T]:
    """Results of ``tasks``, run on a shared thread pool (the last on the calling thread).

    With ``uses_blas``, BLAS is held at one thread meanwhile: these GEMMs are small, and BLAS's own
    threads only slow them down.
    """
    global _POOL, _POOL_SIZE
    with _BLAS_ONE_THREAD if uses_blas else contextlib.nullcontext():
        if len(tasks) == 1:
            return [tasks[0]()]
        with _POOL_LOCK:
            if _POOL is None or len(tasks) - 1 > _POOL_SIZE:
                _POOL_SIZE = len(tasks) - 1
                _POOL = concurrent.futures.ThreadPoolExecutor(_POOL_SIZE, thread_name_prefix="gpurag-numpy")
            pool = _POOL
        futures = [pool.submit(task) for task in tasks[:-1]]
        last = tasks[-1]()
        return [f.result() for f in futures] + [last]


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, nearly equal, non-empty ranges covering ``range(total)``."""
    parts = max(1, min(parts, total))
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


# --- the database -------------------------------------------------------------------------------
@dataclasses.dataclass
class NumpyDatabase(Database):
    """A `Database` that may also hold the l1 codes: int16, transposed (dim, rows), and their scale.

    The codes are ``rint(vectors / l1_scale)``; with ``l1_scale`` a power of two they shortlist l1
    search. ``row_data`` holds, per metric: ``half_sq_norms`` (l2), ``norms`` (dot),
    ``inv_norms`` (cosine, 0 for a zero row), ``l1_code_sums`` and ``l1_errors`` (l1).
    """

    l1_codes: Any = None
    l1_scale: float = 0.0


def _l1_levels(dim: int) -> int:
    """The largest code magnitude: a sum of `_L1_GROUP_DIMS` codes must fit in int16."""
    return 32767 // min(dim, _L1_GROUP_DIMS)


def _l1_scale_for(max_abs: float, dim: int) -> float:
    """The power-of-two scale that maps values of magnitude ``max_abs`` into the code range."""
    if not max_abs > 0.0:
        return 1.0
    return float(2.0 ** math.ceil(math.log2(max_abs / _l1_levels(dim))))


def _l1_encode(vectors: F32, scale: float) -> tuple[I16, F32, F64]:
    """Codes (rows, dim), their row sums (float32, exact) and each row's l1 rounding error (float64)."""
    scaled = vectors.astype(np.float64) / scale
    codes = np.rint(scaled)
    errors = np.abs(scaled - codes).sum(axis=1) * scale
    sums = codes.sum(axis=1)
    return codes.astype(np.int16), sums.astype(np.float32), errors


#: What `NumpyBackend.prepare` puts in ``row_data`` for each metric.
_ROW_DATA: dict[Metric, tuple[str, ...]] = {
    Metric.L2: ("half_sq_norms",),
    Metric.DOT: ("norms",),
    Metric.COSINE: ("inv_norms",),
    Metric.L1: ("l1_code_sums", "l1_errors"),
}


# --- per-metric scoring -------------------------------------------------------------------------
class _Scorer:
    """Approximate scores of tiles, their error bound, and exact rescoring, for one search.

    Approximate scores are in a selection space where higher is better; `to_selection` maps an exact
    score there. ``margin[i]`` bounds |approximate - exact| in selection space for query ``i``. A
    scan asks for `block` once per block of rows, then for `tile` once per block of queries.
    """

    tile_dtype: type[np.floating[Any]] = np.float32
    block_rows: int = 1024
    tile_queries: int = 16

    def __init__(self, queries: F32, database: Database) -> None:
        self.queries = queries
        self.vectors: F32 = database.vectors
        self.dim = int(queries.shape[1])
        self.higher_is_better = database.metric.higher_is_better
        self.margin: F64 = np.zeros(queries.shape[0])
        self._local = threading.local()

    def _buffer(self, name: str, size: int, dtype: Any) -> Any:
        """A flat buffer of at least ``size`` elements, one per thread and name."""
        held = getattr(self._local, name, None)
        if held is None or held.size < size:
            held = np.empty(size, dtype=dtype)
            setattr(self._local, name, held)
        return held

    def block(self, r0: int, r1: int) -> Any:
        """Whatever `tile` needs of rows r0:r1."""
        raise NotImplementedError

    def tile(self, q0: int, q1: int, block: Any, out: Any) -> Any:
        """Approximate selection scores (q1 - q0, rows of ``block``) of queries q0:q1."""
        raise NotImplementedError

    def exact(self, qi: I64, rows: I64) -> F64:
        """Scores of the pairs (query qi[j], row rows[j]), computed directly, summed in float64."""
        raise NotImplementedError

    def to_selection(self, qi: I64, values: F64) -> F64:
        """Exact scores of queries ``qi`` mapped into selection space."""
        return values


def _norms64(x: F32) -> F64:
    sums: F64 = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    return np.sqrt(sums)


class _GemmScorer(_Scorer):
    """dot, l2 and cosine: one float32 GEMM per tile, on a block operand prepared once per block.

    With few queries a block costs more to copy than to score: rows are then scored as they lie
    (`finish` applies the per-row term), in longer blocks.
    """

    def __init__(self, queries: F32, database: Database) -> None:
        super().__init__(queries, database)
        n_queries = max(1, queries.shape[0])
        self.few = n_queries < _FEW_QUERIES
        self.block_rows = max(get_settings().numpy_block_rows, _GEMM_TILE_SCORES // n_queries)
        self.tile_queries = max(1, _GEMM_TILE_SCORES // self.block_rows)
        self.qnorm = _norms64(queries)
        self.lhs: Any = queries

    def _use_float64_if_overflowing(self, bound: float) -> None:
        """Compute tiles in float64 when float32 products could overflow."""
        if bound > 1e36:
            self.tile_dtype = np.float64
            self.lhs = np.asarray(self.lhs, dtype=np.float64)

    def block(self, r0: int, r1: int) -> Any:
        rows = self.vectors[r0:r1]
        return r0, r1, (rows if self.tile_dtype is np.float32 else rows.astype(np.float64))

    def tile(self, q0: int, q1: int, block: Any, out: Any) -> Any:
        r0, r1, operand = block
        np.matmul(self.lhs[q0:q1], operand.T, out=out)
        if self.few:
            self.finish(out, r0, r1)
        return out

    def finish(self, out: Any, r0: int, r1: int) -> None:
        """Apply the per-row term to GEMM scores of rows r0:r1 (few queries only)."""

    def exact(self, qi: I64, rows: I64) -> F64:
        values: F64 = np.einsum("ij,ij->i", self.vectors[rows], self.queries[qi], dtype=np.float64)
        return values


class _DotScorer(_GemmScorer):
    def __init__(self, queries: F32, database: Database) -> None:
        super().__init__(queries, database)
        xmax = float(np.max(database.row_data["norms"], initial=0.0)) * (1 + 2 * _U32)
        self._use_float64_if_overflowing(float(self.qnorm.max(initial=0.0)) * xmax)
        self.margin = 1.01 * _gamma(2 * self.dim + 8) * self.qnorm * xmax + (self.dim + 4) * 2.0**-148


class _L2Scorer(_GemmScorer):
    """Selection score q·x - |x|²/2 = (|q|² - d) / 2, from one GEMM of [q, 1] with [x, -|x|²/2]."""

    def __init__(self, queries: F32, database: Database) -> None:
        super().__init__(queries, database)
        half = database.row_data["half_sq_norms"]
        hmax = float(np.max(half, initial=0.0)) * (1 + 2 * _U32)
        xmax = math.sqrt(2.0 * hmax)
        self._use_float64_if_overflowing(float(self.qnorm.max(initial=0.0)) * xmax + hmax)
        self.half = half.astype(self.tile_dtype)
        if not self.few:
            lhs = np.empty((queries.shape[0], self.dim + 1), dtype=self.tile_dtype)
            lhs[:, : self.dim] = queries
            lhs[:, self.dim] = 1.0
            self.lhs = lhs
        self.qsq = self.qnorm**2
        scale = self.qnorm * xmax + hmax
        self.margin = 1.01 * _gamma(2 * self.dim + 12) * scale + 2.0**-44 * (self.qsq + scale)
        self.margin += (self.dim + 4) * 2.0**-148

    def block(self, r0: int, r1: int) -> Any:
        if self.few:
            return super().block(r0, r1)
        rows = r1 - r0
        out = self._buffer("block", rows * (self.dim + 1), self.tile_dtype)[: rows * (self.dim + 1)]
        out = out.reshape(rows, self.dim + 1)
        out[:, : self.dim] = self.vectors[r0:r1]
        np.negative(self.half[r0:r1], out=out[:, self.dim])
        return r0, r1, out

    def finish(self, out: Any, r0: int, r1: int) -> None:
        np.subtract(out, self.half[r0:r1], out=out)

    def exact(self, qi: I64, rows: I64) -> F64:
        diff = self.vectors[rows]
        diff -= self.queries[qi]
        values: F64 = np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
        return values

    def to_selection(self, qi: I64, values: F64) -> F64:
        # values carry the float32 rounding of each difference: at most 2u relative.
        return np.asarray(0.5 * (self.qsq[qi] - values * (1 + 3 * _U32)), dtype=np.float64)


class _CosineScorer(_GemmScorer):
    """Queries and each block of rows are normalised before the GEMM. No zero queries."""

    def __init__(self, queries: F32, database: Database) -> None:
        super().__init__(queries, database)
        self.lhs = (queries / self.qnorm[:, None]).astype(np.float32)
        inverse = database.row_data["inv_norms"]
        # Rows of norm below 2**-100 are normalised in float64, where 1/norm cannot overflow.
        self.exact_normalise = bool(np.max(inverse, initial=0.0) > 2.0**100)
        self.inv_norms = inverse if self.exact_normalise else inverse.astype(np.float32)
        self.margin = np.full(queries.shape[0], 1.01 * _gamma(2 * self.dim + 24) + 2.0**-44)
        self.margin += (self.dim + 4) * 2.0**-120

    def block(self, r0: int, r1: int) -> Any:
        if self.few and not self.exact_normalise:
            return super().block(r0, r1)
        rows = r1 - r0
        out = self._buffer("block", rows * self.dim, np.float32)[: rows * self.dim].reshape(rows, self.dim)
        np.multiply(self.vectors[r0:r1], self.inv_norms[r0:r1, None], out=out, casting="same_kind")
        return r0, r1, out

    def tile(self, q0: int, q1: int, block: Any, out: Any) -> Any:
        r0, r1, operand = block
        np.matmul(self.lhs[q0:q1], operand.T, out=out)
        if self.few and not self.exact_normalise:
            np.multiply(out, self.inv_norms[r0:r1], out=out)
        return out

    def exact(self, qi: I64, rows: I64) -> F64:
        x = self.vectors[rows]
        dots = np.einsum("ij,ij->i", x, self.queries[qi], dtype=np.float64)
        xn = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
        denominator = xn * self.qnorm[qi]
        values: F64 = np.divide(dots, denominator, out=np.zeros_like(dots), where=denominator > 0)
        return values


class _L1Scorer(_Scorer):
    """Selection score in code units: c_i - T/s, computed as sum(x̃) - 2 sum(max(x̃, q̃)) in int16.

    ``sum|x - q| = 2 sum max(x, q) - sum x - sum q``; on the codes the identity is exact, and
    clipping a query's code into the code range shifts every row's score by the same amount.
    """

    block_rows = _L1_BLOCK_ROWS

    def __init__(self, queries: F32, database: NumpyDatabase) -> None:
        super().__init__(queries, database)
        dim = self.dim
        scale = database.l1_scale
        levels = _l1_levels(dim)
        self.codes_t: I16 = database.l1_codes
        self.code_sums: F32 = database.row_data["l1_code_sums"]
        self.scale = scale
        scaled = queries.astype(np.float64) / scale
        rounded = np.rint(scaled)
        query_errors = np.abs(scaled - rounded).sum(axis=1) * scale
        clipped = np.clip(rounded, -levels, levels)
        self.query_codes: I16 = clipped.astype(np.int16)
        # sum max(x̃, q̃) = sum max(x̃, clip(q̃)) + sum over q̃ > L of (q̃ - L)
        above = np.maximum(rounded - levels, 0.0).sum(axis=1)
        self.offset: F64 = 2.0 * above - rounded.sum(axis=1)
        self.groups = [(g, min(g + _L1_GROUP_DIMS, dim)) for g in range(0, dim, _L1_GROUP_DIMS)]
        self.tile_queries = max(1, _L1_TILE_SCORES // self.block_rows)
        row_errors = database.row_data["l1_errors"]
        max_row_error = float(np.max(row_errors, initial=0.0))
        largest = 3.0 * dim * levels
        self.margin = (max_row_error + query_errors) * (1 + 1e-9) / scale
        self.margin += _U32 * largest if largest >= 2**24 else 0.0
        l1_scale = np.abs(queries).sum(axis=1, dtype=np.float64) + levels * scale * dim
        self.margin += 2.0**-44 * l1_scale / scale

    def block(self, r0: int, r1: int) -> Any:
        if self.queries.shape[0] < _L1_COPY_QUERIES:
            return r0, r1, self.codes_t[:, r0:r1]
        rows = r1 - r0
        out = self._buffer("block", self.dim * rows, np.int16)[: self.dim * rows].reshape(self.dim, rows)
        np.copyto(out, self.codes_t[:, r0:r1])
        return r0, r1, out

    def tile(self, q0: int, q1: int, block: Any, out: Any) -> Any:
        r0, r1, codes_block = block
        nq, nb = q1 - q0, r1 - r0
        size = nq * nb
        groups = self.groups
        # A few queries per call: fewer, longer calls keep the threads from queueing for the GIL.
        step = max(1, min(nq, _L1_STEP_ELEMENTS // (min(self.dim, _L1_GROUP_DIMS) * nb)))
        tmp = self._buffer("step", step * _L1_GROUP_DIMS * nb, np.int16)
        acc = self._buffer("acc", size, np.int16)[:size].reshape(nq, nb)
        total: Any = acc
        for index, (g0, g1) in enumerate(groups):
            codes = codes_block[None, g0:g1]
            for i in range(0, nq, step):
                j = min(i + step, nq)
                part = tmp[: (j - i) * (g1 - g0) * nb].reshape(j - i, g1 - g0, nb)
                np.maximum(codes, self.query_codes[q0 + i : q0 + j, g0:g1, None], out=part)
                np.add.reduce(part, axis=1, out=acc[i:j])
            if len(groups) > 1:
                if index == 0:
                    total = acc.astype(np.int32)
                else:
                    np.add(total, acc, out=total)
        np.multiply(total, -2, out=out, dtype=np.float32, casting="unsafe")
        np.add(out, self.code_sums[r0:r1], out=out)
        return out

    def exact(self, qi: I64, rows: I64) -> F64:
        diff = self.vectors[rows]
        diff -= self.queries[qi]
        np.abs(diff, out=diff)
        return np.asarray(diff.sum(axis=1, dtype=np.float64), dtype=np.float64)

    def to_selection(self, qi: I64, values: F64) -> F64:
        # values carry the float32 rounding of each difference: at most u relative.
        return np.asarray(self.offset[qi] - values * (1 + 2 * _U32) / self.scale, dtype=np.float64)


def _make_scorer(queries: F32, database: Database) -> _Scorer:
    metric = database.metric
    if metric is Metric.DOT:
        return _DotScorer(queries, database)
    if metric is Metric.L2:
        return _L2Scorer(queries, database)
    if metric is Metric.COSINE:
        return _CosineScorer(queries, database)
    if not isinstance(database, NumpyDatabase) or database.l1_codes is None:
        raise InvalidInputError("database was not prepared for l1 by the numpy backend")
    return _L1Scorer(queries, database)


# --- selection ----------------------------------------------------------------------------------
def _below(thresholds: F64, dtype: Any) -> Any:
    """``thresholds`` in ``dtype``, each rounded down so that no admissible score is lost."""
    out = thresholds.astype(dtype)
    up = out.astype(np.float64) > thresholds
    if up.any():
        out[up] = np.nextafter(out[up], dtype(-np.inf))
    return out


class _Candidates:
    """The best k rows (exactly scored) of a range of queries, ties to the lower row."""

    def __init__(self, n_queries: int, k: int, higher_is_better: bool) -> None:
        self.n_queries = n_queries
        self.k = k
        self.sign = -1.0 if higher_is_better else 1.0
        self.q: I64 = np.empty(0, np.int64)
        self.rows: I64 = np.empty(0, np.int64)
        self.values: F64 = np.empty(0, np.float64)
        self.pending: list[tuple[I64, I64, F64]] = []
        self.pending_count = 0
        self.kth: F64 = np.full(n_queries, np.nan)  # exact k-th best value; NaN until k are known

    def add(self, q: I64, rows: I64, values: F64) -> None:
        self.pending.append((q, rows, values))
        self.pending_count += q.size

    def merge(self) -> None:
        """Fold pending rows in; keep the k best of each query; update `kth`.

        Rows must arrive in increasing order for each query (pending after kept): among equal
        values a stable sort then keeps the lower row first.
        """
        if not self.pending:
            return
        q = np.concatenate([self.q, *(p[0] for p in self.pending)])
        rows = np.concatenate([self.rows, *(p[1] for p in self.pending)])
        values = np.concatenate([self.values, *(p[2] for p in self.pending)])
        self.pending = []
        self.pending_count = 0
        n, nq, k = q.size, self.n_queries, self.k
        key = values if self.sign > 0 else -values
        counts = np.bincount(q, minlength=nq)
        width = int(counts.max(initial=0))
        if nq * width <= 4 * n + 4096:
            # One short row per query: sort every row at once.
            order = np.argsort(q, kind="stable")
            grouped = q[order]
            starts = np.cumsum(counts) - counts
            column = np.arange(n) - starts[grouped]
            dense_key = np.full((nq, width), np.inf)
            dense_key[grouped, column] = key[order]
            dense_index = np.full((nq, width), -1, dtype=np.int64)
            dense_index[grouped, column] = order
            best = np.argsort(dense_key, axis=1, kind="stable")[:, :k]
            picked = np.take_along_axis(dense_index, best, axis=1)
            chosen = picked[picked >= 0]
            full = counts >= k
            self.kth[full] = values[picked[full, k - 1]]
        else:
            order = np.lexsort((key, q))
            grouped = q[order]
            starts = np.cumsum(counts) - counts
            rank = np.arange(n) - starts[grouped]
            chosen = order[rank < k]
            full = counts >= k
            self.kth[full] = values[order[starts[full] + k - 1]]
        self.q, self.rows, self.values = q[chosen], rows[chosen], values[chosen]

    def dense(self) -> tuple[F64, I64]:
        """(values, rows) of shape (n_queries, k), best first; every query must have k rows."""
        self.merge()
        return self.values.reshape(self.n_queries, self.k), self.rows.reshape(self.n_queries, self.k)


def _exact(scorer: _Scorer, qi: I64, rows: I64) -> F64:
    """`_Scorer.exact` in chunks that keep its temporaries small."""
    step = max(1, _CHUNK_ELEMENTS // (4 * scorer.dim))
    if qi.size <= step:
        return scorer.exact(qi, rows)
    return np.concatenate([scorer.exact(qi[i : i + step], rows[i : i + step]) for i in range(0, qi.size, step)])


def _scan(scorer: _Scorer, q0: int, q1: int, r0: int, r1: int, k: int) -> _Candidates:
    """Exact best-k candidates of queries q0:q1 among rows r0:r1."""
    nq = q1 - q0
    block_rows = scorer.block_rows
    tiles = -(-nq // scorer.tile_queries)
    tile_queries = -(-nq // tiles)
    dtype = scorer.tile_dtype
    buffer = np.empty(tile_queries * min(block_rows, r1 - r0), dtype=dtype)
    top_buffer = np.empty(tile_queries, dtype=dtype)
    pool = _Candidates(nq, k, scorer.higher_is_better)
    margin = scorer.margin[q0:q1]
    thresholds = np.full(nq, -np.inf, dtype=dtype)
    local_queries = np.arange(q0, q1, dtype=np.int64)
    seen = 0
    for b0 in range(r0, r1, block_rows):
        b1 = min(b0 + block_rows, r1)
        nb = b1 - b0
        first = seen == 0 and nb >= k
        block = scorer.block(b0, b1)
        for t0 in range(0, nq, tile_queries):
            t1 = min(t0 + tile_queries, nq)
            nt = t1 - t0
            scores = scorer.tile(q0 + t0, q0 + t1, block, buffer[: nt * nb].reshape(nt, nb))
            if first:
                kth = np.partition(scores, nb - k, axis=1)[:, nb - k].astype(np.float64)
                limit = _below(kth - 2.0 * margin[t0:t1], dtype)
                flat = np.flatnonzero(scores >= limit[:, None])
                qi = flat // nb
            else:
                limit = thresholds[t0:t1]
                top = np.max(scores, axis=1, out=top_buffer[:nt])
                hit = np.flatnonzero(top >= limit)
                if not hit.size:
                    continue
                flat = np.flatnonzero(scores[hit] >= limit[hit, None])
                qi = hit[flat // nb]
            rows = flat % nb + b0
            qi += t0
            pool.add(qi, rows, _exact(scorer, local_queries[qi], rows))
        seen += nb
        if seen >= k and (first or pool.pending_count >= max(_MERGE_FACTOR * pool.q.size, 256)):
            pool.merge()
            known = ~np.isnan(pool.kth)
            if known.any():
                selection = scorer.to_selection(local_queries[known], pool.kth[known])
                thresholds[known] = _below(selection - margin[known], dtype)
    pool.merge()
    return pool


def _scan_dense(scorer: _Scorer, q0: int, q1: int, k: int) -> tuple[F64, I64]:
    """(values, rows) of shape (q1 - q0, k): the exact best k of every row for queries q0:q1."""
    return _scan(scorer, q0, q1, 0, scorer.vectors.shape[0], k).dense()


def _search_chunk(scorer: _Scorer, q0: int, q1: int, k: int, threads: int, uses_blas: bool) -> tuple[F64, I64]:
    """(values, rows), (q1 - q0, k): the exact best k for queries q0:q1, over threads by queries or rows."""
    n_queries, n_rows = q1 - q0, scorer.vectors.shape[0]
    if threads > 1 and n_queries >= 4 * threads:
        tasks = [functools.partial(_scan_dense, scorer, q0 + a, q0 + b, k) for a, b in _split(n_queries, threads)]
        results = _run_parallel(tasks, uses_blas=uses_blas)
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])
    min_rows = max(k, scorer.block_rows // 2)
    row_parts = min(threads, n_rows // min_rows) if threads > 1 else 1
    if row_parts > 1:
        scans = [functools.partial(_scan, scorer, q0, q1, a, b, k) for a, b in _split(n_rows, row_parts)]
        pools = _run_parallel(scans, uses_blas=uses_blas)
        return _combine(pools, n_queries, k, scorer.higher_is_better)
    [(values, rows)] = _run_parallel([functools.partial(_scan_dense, scorer, q0, q1, k)], uses_blas=uses_blas)
    return values, rows


def _combine(pools: list[_Candidates], n_queries: int, k: int, higher_is_better: bool) -> tuple[F64, I64]:
    """The best k of several candidate sets for the same queries."""
    if len(pools) == 1:
        return pools[0].dense()
    total = _Candidates(n_queries, k, higher_is_better)
    for pool in pools:
        total.add(pool.q, pool.rows, pool.values)
    return total.dense()


def _smallest_k(distances: Any, k: int, largest: int) -> tuple[Any, I64]:
    """The k smallest of a row of integer distances in 0..largest, ascending, ties to the lower position."""
    cumulative = np.cumsum(np.bincount(distances, minlength=largest + 1))
    kth = int(np.searchsorted(cumulative, k))
    positions = np.flatnonzero(distances <= kth)
    values = distances[positions]
    if positions.size > k:
        need = k - (int(cumulative[kth - 1]) if kth > 0 else 0)
        tie = values == kth
        keep = ~tie | (np.cumsum(tie) <= need)
        positions, values = positions[keep], values[keep]
    order = np.argsort(values, kind="stable")
    return values[order], positions[order]


# --- the backend --------------------------------------------------------------------------------
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
        database.row_data.update(self._row_data(x, metric))
        if metric is Metric.L1:
            scale = _l1_scale_for(float(np.max(np.abs(x), initial=0.0)), x.shape[1])
            self._set_l1_codes(database, x, scale)
        return database

    @staticmethod
    def _row_data(x: F32, metric: Metric) -> dict[str, Any]:
        if metric is Metric.L2:
            return {"half_sq_norms": 0.5 * np.einsum("ij,ij->i", x, x, dtype=np.float64)}
        if metric is Metric.DOT:
            return {"norms": _norms64(x)}
        if metric is Metric.COSINE:
            norms = _norms64(x)
            return {"inv_norms": np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)}
        return {}

    @staticmethod
    def _set_l1_codes(database: NumpyDatabase, x: F32, scale: float) -> None:
        codes, sums, errors = _l1_encode(x, scale)
        database.l1_codes = np.ascontiguousarray(codes.T)
        database.l1_scale = scale
        database.row_data["l1_code_sums"] = sums
        database.row_data["l1_errors"] = errors

    def append(self, database: Database, vectors: Any) -> NumpyDatabase:
        """A database holding ``database``'s rows followed by ``vectors``."""
        old = np.asarray(self.to_numpy(database.vectors), dtype=np.float32)
        new = np.ascontiguousarray(self.to_numpy(vectors), dtype=np.float32)
        if new.ndim != 2 or (old.shape[0] and new.shape[1] != old.shape[1]):
            raise InvalidInputError(f"vectors must be (rows, {old.shape[1]}); got shape {new.shape}")
        metric = database.metric
        combined = np.concatenate([old, new])
        added = self._row_data(new, metric)
        if metric is Metric.L1:
            scale = getattr(database, "l1_scale", 0.0)
            codes_before = getattr(database, "l1_codes", None)
            if codes_before is None or float(np.max(np.abs(new), initial=0.0)) > _l1_levels(new.shape[1]) * scale:
                return self.prepare(combined, metric)  # the codes need a new scale
            codes, sums, errors = _l1_encode(new, scale)
            added = {"l1_code_sums": sums, "l1_errors": errors}
        if set(added) != set(database.row_data):
            return self.prepare(combined, metric)
        result = NumpyDatabase(
            metric=metric,
            vectors=combined,
            row_data={key: np.concatenate([database.row_data[key], value]) for key, value in added.items()},
        )
        if metric is Metric.L1:
            result.l1_codes = np.concatenate([codes_before, codes.T], axis=1)
            result.l1_scale = scale
        return result

    def take(self, database: Database, positions: np.ndarray[Any, Any]) -> NumpyDatabase:
        """A database of the rows at ``positions`` (host int64), in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        codes = getattr(database, "l1_codes", None)
        return NumpyDatabase(
            metric=database.metric,
            vectors=np.ascontiguousarray(database.vectors[positions]),
            row_data={key: value[positions] for key, value in database.row_data.items()},
            l1_codes=None if codes is None else np.ascontiguousarray(codes[:, positions]),
            l1_scale=getattr(database, "l1_scale", 0.0),
        )

    def slice(self, database: Database, start: int, stop: int) -> NumpyDatabase:
        """Rows ``start:stop`` of ``database``, as views."""
        codes = getattr(database, "l1_codes", None)
        return NumpyDatabase(
            metric=database.metric,
            vectors=database.vectors[start:stop],
            row_data={key: value[start:stop] for key, value in database.row_data.items()},
            l1_codes=None if codes is None else codes[:, start:stop],
            l1_scale=getattr(database, "l1_scale", 0.0),
        )

    # --- search --------------------------------------------------------------------------------
    def working_scores(self, queries: int, rows: int) -> int:
        """Scores (float32-sized values) one `topk` holds at once: each thread's tiles, not the whole block."""
        # Per thread, the largest temporary is a float64 chunk of _CHUNK_ELEMENTS (two float32 each).
        return min(queries * rows, _thread_count() * 2 * _CHUNK_ELEMENTS)

    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        """The ``k`` best rows of ``database`` for each query, best first; ties go to the lower row.

        Scores are float32 values of the metric computed directly for the rows returned (no norm
        expansion; sums in float64); indices are int64 row positions. ``1 <= k <= database.count``.
        """
        q = np.ascontiguousarray(self.to_numpy(queries), dtype=np.float32)
        n_rows = database.count
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n_rows:
            raise InvalidInputError(f"k must be an integer in 1..{n_rows} (the database's rows); got {k!r}")
        k = int(k)
        if q.ndim != 2 or q.shape[1] != database.dim:
            raise InvalidInputError(f"queries must be (Q, {database.dim}); got shape {q.shape}")
        if not set(_ROW_DATA[database.metric]) <= set(database.row_data) or (
            database.metric is Metric.L1 and getattr(database, "l1_codes", None) is None
        ):
            database = self.prepare(database.vectors, database.metric)  # not prepared by this backend
        n_queries = q.shape[0]
        scores = np.empty((n_queries, k), dtype=np.float32)
        indices = np.empty((n_queries, k), dtype=np.int64)
        active = np.arange(n_queries)
        if database.metric in (Metric.DOT, Metric.COSINE):
            # A zero query scores 0 against every row: the first k rows, in order.
            zero = ~np.any(q != 0, axis=1)
            if zero.any():
                scores[zero] = 0.0
                indices[zero] = np.arange(k)
                active = np.flatnonzero(~zero)
        if active.size == 0:
            return TopK(scores, indices)
        work = q if active.size == n_queries else q[active]
        values, rows = self._search(work, database, k)
        with np.errstate(over="ignore"):  # a score beyond float32's range is inf
            scores[active] = values
        indices[active] = rows
        return TopK(scores, indices)

    def _search(self, queries: F32, database: Database, k: int) -> tuple[F64, I64]:
        scorer = _make_scorer(queries, database)
        n_queries, n_rows = queries.shape[0], database.count
        threads = _thread_count()
        uses_blas = database.metric is not Metric.L1
        if uses_blas and not _BLAS_ONE_THREAD.available:
            threads = 1  # BLAS runs its own threads
        if n_queries * n_rows * queries.shape[1] < _MIN_PARALLEL_WORK:
            threads = 1
        # Candidates take about 32 bytes each: keep a chunk's within the memory budget.
        chunk = max(1, get_settings().memory_budget_bytes // (32 * (k + scorer.block_rows)))
        values = np.empty((n_queries, k), dtype=np.float64)
        rows = np.empty((n_queries, k), dtype=np.int64)
        for c0 in range(0, n_queries, chunk):
            c1 = min(c0 + chunk, n_queries)
            values[c0:c1], rows[c0:c1] = _search_chunk(scorer, c0, c1, k, threads, uses_blas)
        return values, rows

    # --- pairwise ------------------------------------------------------------------------------
    def pairwise(self, queries: Any, vectors: Any, metric: Metric) -> F32:
        """The (Q, N) float32 matrix of ``metric`` between every query and every vector (float64 inside)."""
        metric = Metric.parse(metric)
        q = np.asarray(self.to_numpy(queries), dtype=np.float32)
        x = np.asarray(self.to_numpy(vectors), dtype=np.float32)
        if q.ndim != 2 or x.ndim != 2 or q.shape[1] != x.shape[1]:
            raise InvalidInputError(f"queries and vectors must be (Q, D) and (N, D); got {q.shape} and {x.shape}")
        out = np.empty((q.shape[0], x.shape[0]), dtype=np.float32)
        q64 = q.astype(np.float64)
        if metric is Metric.COSINE:
            qn = np.sqrt(np.einsum("ij,ij->i", q64, q64))
            q64 = np.divide(q64, qn[:, None], out=np.zeros_like(q64), where=qn[:, None] > 0)
        q_sq = np.einsum("ij,ij->i", q64, q64)
        dim = max(1, x.shape[1])
        if metric is Metric.L1:
            step_q = max(1, _CHUNK_ELEMENTS // (dim * max(1, x.shape[0])))
            step_x = max(1, min(x.shape[0], _CHUNK_ELEMENTS // dim))
        else:
            step_q = q.shape[0] or 1
            step_x = max(1, min(_CHUNK_ELEMENTS // dim, _CHUNK_ELEMENTS // step_q))
        for x0 in range(0, x.shape[0], step_x):
            block = x[x0 : x0 + step_x].astype(np.float64)
            if metric is Metric.L1:
                for q0 in range(0, q.shape[0], step_q):
                    diff = q64[q0 : q0 + step_q, None, :] - block[None, :, :]
                    np.abs(diff, out=diff)
                    out[q0 : q0 + step_q, x0 : x0 + step_x] = diff.sum(axis=2)
                continue
            if metric is Metric.COSINE:
                bn = np.sqrt(np.einsum("ij,ij->i", block, block))
                block = np.divide(block, bn[:, None], out=np.zeros_like(block), where=bn[:, None] > 0)
            dots = q64 @ block.T
            if metric is Metric.L2:
                dots *= -2.0
                dots += q_sq[:, None]
                dots += np.einsum("ij,ij->i", block, block)[None, :]
                np.maximum(dots, 0.0, out=dots)
            with np.errstate(over="ignore"):  # a value beyond float32's range is inf
                out[:, x0 : x0 + step_x] = dots
        return out

    # --- LSH primitives ------------------------------------------------------------------------
    def sign_codes(self, vectors: Any, planes: Any) -> U8:
        """Packed sign bits, uint8 (N, ceil(B / 8)), little bit order: bit j set when v·planes[j] > 0."""
        v = np.ascontiguousarray(self.to_numpy(vectors), dtype=np.float32)
        p = np.ascontiguousarray(self.to_numpy(planes), dtype=np.float32)
        if v.ndim != 2 or p.ndim != 2 or v.shape[1] != p.shape[1]:
            raise InvalidInputError(f"vectors and planes must be (N, D) and (B, D); got {v.shape} and {p.shape}")
        n_bits = p.shape[0]
        out = np.empty((v.shape[0], (n_bits + 7) // 8), dtype=np.uint8)
        p_norms = _norms64(p)
        bound = 1.01 * _gamma(2 * v.shape[1] + 8)
        step = max(1, _CHUNK_ELEMENTS // max(1, n_bits))
        for r0 in range(0, v.shape[0], step):
            chunk = v[r0 : r0 + step]
            projections = chunk @ p.T
            positive = projections > 0
            # Near zero, float32 may get the sign wrong: decide those in float64.
            unsure = np.abs(projections) <= bound * _norms64(chunk)[:, None] * p_norms[None, :] + 2.0**-120
            if unsure.any():
                rows, cols = np.nonzero(unsure)
                exact = np.einsum("ij,ij->i", chunk[rows], p[cols], dtype=np.float64)
                positive[rows, cols] = exact > 0
            out[r0 : r0 + step] = np.packbits(positive, axis=1, bitorder="little")
        return out

    def hamming_topk(self, codes: Any, database_codes: Any, k: int) -> TopK:
        """The ``k`` database codes nearest each code in Hamming distance, nearest first, ties to the lower row."""
        a = np.ascontiguousarray(self.to_numpy(codes), dtype=np.uint8)
        b = np.ascontiguousarray(self.to_numpy(database_codes), dtype=np.uint8)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            raise InvalidInputError(f"codes must be (Q, W) and (N, W) with one W; got {a.shape} and {b.shape}")
        n_rows = b.shape[0]
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n_rows:
            raise InvalidInputError(f"k must be an integer in 1..{n_rows} (the database codes); got {k!r}")
        k = int(k)
        width = a.shape[1]
        word: type[np.unsignedinteger[Any]] = np.uint8
        for candidate, size in ((np.uint64, 8), (np.uint32, 4), (np.uint16, 2)):
            if width % size == 0:
                word = candidate
                break
        av = a.view(word)
        bt = np.ascontiguousarray(b.view(word).T)  # (words, rows): one contiguous pass per word
        words = av.shape[1]
        n_bits = 8 * width
        distance_type = np.uint16 if n_bits < 2**16 else np.int64
        n_queries = a.shape[0]
        scores = np.empty((n_queries, k), dtype=np.int32)
        indices = np.empty((n_queries, k), dtype=np.int64)
        step = max(1, min(n_queries, _CHUNK_ELEMENTS // max(1, n_rows)))

        def run(q0: int, q1: int) -> None:
            xor = np.empty(step * n_rows, dtype=word)
            counts = np.empty(step * n_rows, dtype=np.uint8)
            for s0 in range(q0, q1, step):
                s1 = min(s0 + step, q1)
                size = (s1 - s0) * n_rows
                distances = np.zeros((s1 - s0, n_rows), dtype=distance_type)
                x = xor[:size].reshape(s1 - s0, n_rows)
                c = counts[:size].reshape(s1 - s0, n_rows)
                for w in range(words):
                    np.bitwise_xor(av[s0:s1, w, None], bt[None, w, :], out=x)
                    np.bitwise_count(x, out=c)
                    np.add(distances, c, out=distances)
                for i in range(s1 - s0):
                    scores[s0 + i], indices[s0 + i] = _smallest_k(distances[i], k, n_bits)

        threads = _thread_count() if n_queries * n_rows * words >= _MIN_PARALLEL_WORK else 1
        parts = _split(n_queries, threads)
        _run_parallel([functools.partial(run, a, b) for a, b in parts], uses_blas=False)
        return TopK(scores, indices)
