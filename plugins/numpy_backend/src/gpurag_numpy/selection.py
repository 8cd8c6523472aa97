"""Threshold selection for exact search: the best k rows of each query, ties to the lower row.

It knows nothing about metrics: a `Scorer` gives approximate scores in a space where higher is
better, with a bound on their error. A scan keeps, per query, a threshold at the exact k-th best
score found so far less that bound (in the first block, the approximate k-th less twice the bound);
only rows scoring at least the threshold are rescored exactly, and the answer is chosen on the exact
scores.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from gpurag_numpy.numerics import CHUNK_ELEMENTS, F32, F64, I64, U32, gamma
from gpurag_numpy.scorers import Scorer
from gpurag_numpy.threads import run_parallel, split

#: Candidates wait until they number this many times the kept ones before they are merged in.
_MERGE_FACTOR = 0.5


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


def _exact(scorer: Scorer, qi: I64, rows: I64) -> F64:
    """`Scorer.exact` in chunks that keep its temporaries small."""
    step = max(1, CHUNK_ELEMENTS // (4 * scorer.dim))
    if qi.size <= step:
        return scorer.exact(qi, rows)
    return np.concatenate([scorer.exact(qi[i : i + step], rows[i : i + step]) for i in range(0, qi.size, step)])


def _scan(scorer: Scorer, q0: int, q1: int, r0: int, r1: int, k: int) -> _Candidates:
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


def _scan_dense(scorer: Scorer, q0: int, q1: int, k: int) -> tuple[F64, I64]:
    """(values, rows) of shape (q1 - q0, k): the exact best k of every row for queries q0:q1."""
    return _scan(scorer, q0, q1, 0, scorer.vectors.shape[0], k).dense()


#: Most scores (queries x rows) a search takes the single-block path for.
SMALL_SEARCH_SCORES = 1 << 16


def search_one_dot(query: F32, vectors: F32, max_norm: float, k: int) -> tuple[F32, I64] | None:
    """(scores, rows), (1, k): the exact best k dot products of one query, ties to the lower row.

    Scores are the float64 sums rounded to float32 (they cannot overflow: larger products take the
    general path).

    `search_small` for one query and the dot metric, in the fewest NumPy calls: the float32 GEMV
    shortlists behind the `_DotScorer` error bound, the shortlist is rescored in float64. None
    where float32 products could overflow (the caller then takes the general path).
    """
    query64 = query.astype(np.float64)
    norm = math.sqrt(float(query64 @ query64))
    bound = norm * max_norm * (1 + 2 * U32)
    if bound > 1e36:
        return None
    dim = query.shape[0]
    margin = 1.01 * gamma(2 * dim + 8) * bound + (dim + 4) * 2.0**-148
    scores = vectors @ query
    n_rows = scores.shape[0]
    if k < n_rows:
        kth = float(np.partition(scores, n_rows - k)[n_rows - k])
        rows = np.flatnonzero(scores >= np.float64(kth - 2.0 * margin))
        values = vectors[rows] @ query64
    else:
        rows = np.arange(n_rows)
        values = vectors @ query64
    chosen = np.lexsort((rows, -values))[:k]
    return values[chosen].astype(np.float32).reshape(1, k), rows[chosen].reshape(1, k)


def search_small(scorer: Scorer, k: int) -> tuple[F64, I64]:
    """(values, rows): the exact best k of every row for every query, in one block on this thread.

    The `_scan` rule for one block, without its bookkeeping: rows scoring at least the approximate
    k-th best less twice the error bound are rescored exactly, and the best k of those are chosen,
    ties to the lower row.
    """
    n_queries, n_rows = scorer.queries.shape[0], scorer.vectors.shape[0]
    out = np.empty((n_queries, n_rows), dtype=scorer.tile_dtype)
    scores = scorer.tile(0, n_queries, scorer.block(0, n_rows), out)
    if n_queries == 1:  # the common case, in fewer and flatter steps
        flat = scores[0]
        if k < n_rows:
            kth = float(np.partition(flat, n_rows - k)[n_rows - k])
            rows = np.flatnonzero(flat >= np.float64(kth - 2.0 * float(scorer.margin[0])))
        else:
            rows = np.arange(n_rows)
        values = scorer.exact(np.zeros(rows.size, dtype=np.int64), rows)
        chosen = np.lexsort((rows, -values if scorer.higher_is_better else values))[:k]
        return values[chosen].reshape(1, k), rows[chosen].reshape(1, k)
    if k < n_rows:
        kths = np.partition(scores, n_rows - k, axis=1)[:, n_rows - k].astype(np.float64)
        limit = _below(kths - 2.0 * scorer.margin, scorer.tile_dtype)
        qi, rows = np.nonzero(scores >= limit[:, None])
    else:
        qi, rows = np.divmod(np.arange(n_queries * n_rows, dtype=np.int64), n_rows)
    values = _exact(scorer, qi, rows)
    key = -values if scorer.higher_is_better else values
    order = np.lexsort((rows, key, qi))
    counts = np.bincount(qi, minlength=n_queries)
    starts = np.cumsum(counts) - counts
    chosen = order[np.arange(order.size) - starts[qi[order]] < k]
    return values[chosen].reshape(n_queries, k), rows[chosen].astype(np.int64).reshape(n_queries, k)


def search_chunk(scorer: Scorer, q0: int, q1: int, k: int, threads: int, uses_blas: bool) -> tuple[F64, I64]:
    """(values, rows), (q1 - q0, k): the exact best k for queries q0:q1, over threads by queries or rows."""
    n_queries, n_rows = q1 - q0, scorer.vectors.shape[0]
    if threads > 1 and n_queries >= 4 * threads:
        tasks = [functools.partial(_scan_dense, scorer, q0 + a, q0 + b, k) for a, b in split(n_queries, threads)]
        results = run_parallel(tasks, uses_blas=uses_blas)
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])
    min_rows = max(k, scorer.block_rows // 2)
    row_parts = min(threads, n_rows // min_rows) if threads > 1 else 1
    if row_parts > 1:
        scans = [functools.partial(_scan, scorer, q0, q1, a, b, k) for a, b in split(n_rows, row_parts)]
        pools = run_parallel(scans, uses_blas=uses_blas)
        return _combine(pools, n_queries, k, scorer.higher_is_better)
    [(values, rows)] = run_parallel([functools.partial(_scan_dense, scorer, q0, q1, k)], uses_blas=uses_blas)
    return values, rows


def _combine(pools: list[_Candidates], n_queries: int, k: int, higher_is_better: bool) -> tuple[F64, I64]:
    """The best k of several candidate sets for the same queries."""
    if len(pools) == 1:
        return pools[0].dense()
    total = _Candidates(n_queries, k, higher_is_better)
    for pool in pools:
        total.add(pool.q, pool.rows, pool.values)
    return total.dense()
