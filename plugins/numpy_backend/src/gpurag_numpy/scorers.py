"""Per-metric scoring for exact search: a fast approximate pass over tiles of queries x rows, a bound
on its error, and direct rescoring in float64.

dot, l2 and cosine score tiles with one float32 GEMM each; l1 with the database's 16-bit integer
codes. `make_scorer` picks the scorer for a database's metric; selection sees only `Scorer`.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from gpurag.backend import Database
from gpurag.errors import InvalidInputError
from gpurag.metrics import Metric
from gpurag.settings import get_settings
from gpurag_numpy.database import L1_GROUP_DIMS, NumpyDatabase, l1_levels, row_max
from gpurag_numpy.numerics import F32, F64, I16, I64, U32, gamma, norms64

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
#: Below this many queries, GEMM blocks are scored in place instead of copied.
_FEW_QUERIES = 32


def scan_shape(metric: Metric, n_queries: int) -> tuple[int, int]:
    """(rows per block, queries per tile) of a scan of ``n_queries`` queries for ``metric``."""
    if metric is Metric.L1:
        return _L1_BLOCK_ROWS, max(1, _L1_TILE_SCORES // _L1_BLOCK_ROWS)
    block_rows = max(get_settings().numpy_block_rows, _GEMM_TILE_SCORES // max(1, n_queries))
    return block_rows, max(1, _GEMM_TILE_SCORES // block_rows)


def scan_query_boundaries(metric: Metric) -> tuple[int, ...]:
    """Query counts at which a scan for ``metric`` changes path: copied blocks, and blocks at their least rows."""
    if metric is Metric.L1:
        return (_L1_COPY_QUERIES,)
    return (_FEW_QUERIES, _GEMM_TILE_SCORES // get_settings().numpy_block_rows)


class Scorer:
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


class _GemmScorer(Scorer):
    """dot, l2 and cosine: one float32 GEMM per tile, on a block operand prepared once per block.

    With few queries a block costs more to copy than to score: rows are then scored as they lie
    (`finish` applies the per-row term), in longer blocks.
    """

    def __init__(self, queries: F32, database: Database) -> None:
        super().__init__(queries, database)
        self.few = queries.shape[0] < _FEW_QUERIES
        self.block_rows, self.tile_queries = scan_shape(database.metric, queries.shape[0])
        self.qnorm = norms64(queries)
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
        xmax = row_max(database, "norms") * (1 + 2 * U32)
        self._use_float64_if_overflowing(float(self.qnorm.max(initial=0.0)) * xmax)
        self.margin = 1.01 * gamma(2 * self.dim + 8) * self.qnorm * xmax + (self.dim + 4) * 2.0**-148


class _L2Scorer(_GemmScorer):
    """Selection score q·x - |x|²/2 = (|q|² - d) / 2, from one GEMM of [q, 1] with [x, -|x|²/2]."""

    def __init__(self, queries: F32, database: Database) -> None:
        super().__init__(queries, database)
        half = database.row_data["half_sq_norms"]
        hmax = row_max(database, "half_sq_norms") * (1 + 2 * U32)
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
        self.margin = 1.01 * gamma(2 * self.dim + 12) * scale + 2.0**-44 * (self.qsq + scale)
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
        return np.asarray(0.5 * (self.qsq[qi] - values * (1 + 3 * U32)), dtype=np.float64)


class _CosineScorer(_GemmScorer):
    """Queries and each block of rows are normalised before the GEMM. No zero queries."""

    def __init__(self, queries: F32, database: Database) -> None:
        super().__init__(queries, database)
        self.lhs = (queries / self.qnorm[:, None]).astype(np.float32)
        inverse = database.row_data["inv_norms"]
        # Rows of norm below 2**-100 are normalised in float64, where 1/norm cannot overflow.
        self.exact_normalise = row_max(database, "inv_norms") > 2.0**100
        self.inv_norms = inverse if self.exact_normalise else inverse.astype(np.float32)
        self.margin = np.full(queries.shape[0], 1.01 * gamma(2 * self.dim + 24) + 2.0**-44)
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


class _L1Scorer(Scorer):
    """Selection score in code units: c_i - T/s, computed as sum(x̃) - 2 sum(max(x̃, q̃)) in int16.

    ``sum|x - q| = 2 sum max(x, q) - sum x - sum q``; on the codes the identity is exact, and
    clipping a query's code into the code range shifts every row's score by the same amount.
    """

    block_rows = _L1_BLOCK_ROWS

    def __init__(self, queries: F32, database: NumpyDatabase) -> None:
        super().__init__(queries, database)
        dim = self.dim
        scale = database.l1_scale
        levels = l1_levels(dim)
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
        self.groups = [(g, min(g + L1_GROUP_DIMS, dim)) for g in range(0, dim, L1_GROUP_DIMS)]
        self.block_rows, self.tile_queries = scan_shape(Metric.L1, queries.shape[0])
        max_row_error = row_max(database, "l1_errors")
        largest = 3.0 * dim * levels
        self.margin = (max_row_error + query_errors) * (1 + 1e-9) / scale
        self.margin += U32 * largest if largest >= 2**24 else 0.0
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
        step = max(1, min(nq, _L1_STEP_ELEMENTS // (min(self.dim, L1_GROUP_DIMS) * nb)))
        tmp = self._buffer("step", step * L1_GROUP_DIMS * nb, np.int16)
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
        return np.asarray(self.offset[qi] - values * (1 + 2 * U32) / self.scale, dtype=np.float64)


def make_scorer(queries: F32, database: Database) -> Scorer:
    """The scorer of ``queries`` against ``database``, for its metric."""
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
