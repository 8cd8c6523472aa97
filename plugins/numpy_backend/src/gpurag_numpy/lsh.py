"""The LSH primitives on the CPU: packed sign codes of random-hyperplane projections, exact
Hamming top-k over them, and exact re-ranking of candidate rows.

Hamming top-k and re-ranking run compiled loops (`gpurag_numpy.lsh_kernels`, Numba) where Numba is
installed, and NumPy array passes with the same answers where it is not.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from gpurag.arrays import check_int
from gpurag.errors import InvalidInputError
from gpurag.metrics import Metric, TopK
from gpurag.rerank import best_k
from gpurag_numpy import lsh_kernels
from gpurag_numpy.numerics import CHUNK_ELEMENTS, I64, U8, gamma, norms64
from gpurag_numpy.threads import MIN_PARALLEL_WORK, run_parallel, split, thread_count


def sign_codes(vectors: Any, planes: Any) -> U8:
    """Packed sign bits, uint8 (N, ceil(B / 8)), little bit order: bit j set when v·planes[j] > 0."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    p = np.ascontiguousarray(planes, dtype=np.float32)
    if v.ndim != 2 or p.ndim != 2 or v.shape[1] != p.shape[1]:
        raise InvalidInputError(f"vectors and planes must be (N, D) and (B, D); got {v.shape} and {p.shape}")
    n_bits = p.shape[0]
    out = np.empty((v.shape[0], (n_bits + 7) // 8), dtype=np.uint8)
    p_norms = norms64(p)
    bound = 1.01 * gamma(2 * v.shape[1] + 8)
    step = max(1, CHUNK_ELEMENTS // max(1, n_bits))
    for r0 in range(0, v.shape[0], step):
        chunk = v[r0 : r0 + step]
        projections = chunk @ p.T
        positive = projections > 0
        # Near zero, float32 may get the sign wrong: decide those in float64.
        unsure = np.abs(projections) <= bound * norms64(chunk)[:, None] * p_norms[None, :] + 2.0**-120
        if unsure.any():
            rows, cols = np.nonzero(unsure)
            exact = np.einsum("ij,ij->i", chunk[rows], p[cols], dtype=np.float64)
            positive[rows, cols] = exact > 0
        out[r0 : r0 + step] = np.packbits(positive, axis=1, bitorder="little")
    return out


def hamming_topk(codes: Any, database_codes: Any, k: int) -> TopK:
    """The ``k`` database codes nearest each code in Hamming distance, nearest first, ties to the lower row."""
    a = np.ascontiguousarray(codes, dtype=np.uint8)
    b = np.ascontiguousarray(database_codes, dtype=np.uint8)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InvalidInputError(f"codes must be (Q, W) and (N, W) with one W; got {a.shape} and {b.shape}")
    n_rows = b.shape[0]
    k = check_int(k, "k (at most the database codes)", minimum=1, maximum=n_rows)
    kernels = lsh_kernels.load()
    if kernels is not None:
        return _hamming_topk_compiled(kernels, a, b, k)
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
    step = max(1, min(n_queries, CHUNK_ELEMENTS // max(1, n_rows)))

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

    threads = thread_count() if n_queries * n_rows * words >= MIN_PARALLEL_WORK else 1
    parts = split(n_queries, threads)
    run_parallel([functools.partial(run, a, b) for a, b in parts], uses_blas=False)
    return TopK(scores, indices)


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


def _hamming_topk_compiled(kernels: Any, codes: U8, database_codes: U8, k: int) -> TopK:
    """`hamming_topk` through the compiled kernel: codes padded to 64-bit words, the database transposed."""
    pad = -codes.shape[1] % 8
    if pad:
        codes = np.pad(codes, ((0, 0), (0, pad)))
        database_codes = np.pad(database_codes, ((0, 0), (0, pad)))
    queries = np.ascontiguousarray(codes).view(np.uint64)
    columns = np.ascontiguousarray(np.ascontiguousarray(database_codes).view(np.uint64).T)
    n_queries, n_rows = queries.shape[0], columns.shape[1]
    scores = np.empty((n_queries, k), dtype=np.int32)
    indices = np.empty((n_queries, k), dtype=np.int64)
    threads = thread_count() if n_queries > 1 and n_queries * n_rows * columns.shape[0] >= MIN_PARALLEL_WORK else 1
    tasks = [
        functools.partial(kernels.hamming_select, queries, columns, k, q0, q1, scores, indices)
        for q0, q1 in split(n_queries, threads)
    ]
    run_parallel(tasks, uses_blas=False)
    return TopK(scores, indices)


#: The metric codes the compiled scorer takes.
METRIC_CODES = {Metric.DOT: 0, Metric.COSINE: 1, Metric.L2: 2, Metric.L1: 3}


def rerank(queries: Any, vectors: Any, candidates: Any, k: int, metric: Metric) -> TopK:
    """The ``k`` best of each query's candidate rows of ``vectors``, scored directly in float64, best first."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.ascontiguousarray(candidates, dtype=np.int64)
    if q.ndim != 2 or x.ndim != 2 or rows.ndim != 2 or q.shape[1] != x.shape[1] or rows.shape[0] != q.shape[0]:
        raise InvalidInputError(
            f"queries, vectors and candidates must be (Q, D), (N, D) and (Q, C); got {q.shape}, {x.shape}, {rows.shape}"
        )
    if rows.size and (rows.min() < 0 or rows.max() >= x.shape[0]):
        raise InvalidInputError(f"candidates must be row positions in 0..{x.shape[0] - 1}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= rows.shape[1]:
        raise InvalidInputError(f"k must be an integer in 1..{rows.shape[1]} (the candidates); got {k!r}")
    kernels = lsh_kernels.load()
    if kernels is None:
        from gpurag.rerank import candidate_scores

        scores = np.asarray(candidate_scores(q.astype(np.float64), x.astype(np.float64), rows, metric))
    else:
        scores = np.empty(rows.shape, dtype=np.float64)
        threads = thread_count() if rows.size * x.shape[1] >= MIN_PARALLEL_WORK else 1
        tasks = [
            functools.partial(kernels.score_rows, q, x, rows, METRIC_CODES[metric], q0, q1, scores)
            for q0, q1 in split(q.shape[0], threads)
        ]
        run_parallel(tasks, uses_blas=False)
    with np.errstate(over="ignore"):
        top = best_k(scores.astype(np.float32), rows, int(k), metric.higher_is_better)
    return top
