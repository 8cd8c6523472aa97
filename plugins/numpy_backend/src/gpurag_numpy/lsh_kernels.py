"""Compiled (Numba) loops behind the NumPy backend's Hamming top-k and re-ranking.

`load()` compiles them on first use (cached on disk) and returns them, or None where Numba cannot
be imported; `gpurag_numpy.lsh` then falls back to NumPy array passes with the same results.
"""

from __future__ import annotations

import functools
import types as pytypes
from typing import Any

import numpy as np

#: Rows whose smallest distance is checked at once before any is collected.
GROUP = 16


@functools.cache
def load() -> Any:
    """A namespace with ``hamming_select`` and ``dot_rows``/``l2_rows``, or None without Numba."""
    try:
        import numba
        from numba import types
        from numba.extending import intrinsic
    except ImportError:  # pragma: no cover - exercised where Numba is not installed
        return None

    def ctpop(typingctx: Any, x: Any) -> Any:
        signature = types.uint64(types.uint64)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.ctpop(args[0])

        return signature, codegen

    popcount: Any = intrinsic(ctpop)  # LLVM's ctpop: one instruction (vectorised) per 64-bit word

    @numba.njit(nogil=True, cache=True)
    def hamming_select(queries: Any, columns: Any, k: int, q0: int, q1: int, scores: Any, indices: Any) -> None:
        """Rows q0:q1 of scores/indices: each query's k nearest database rows in Hamming distance.

        ``queries`` (Q, W) and ``columns`` (W, N), the database transposed, are uint64 words. The
        answer is ordered by (distance, row), so ties go to the lower row. A threshold guessed from
        every 16th row limits the rows collected; a guess that collects fewer than k is raised.
        """
        words, n_rows = columns.shape
        n_bits = 64 * words
        dist = np.empty(n_rows + GROUP, dtype=np.uint16)
        dist[n_rows:] = 65535
        counts = np.empty(n_bits + 2, dtype=np.int64)
        kept_rows = np.empty(n_rows, dtype=np.int64)
        for qi in range(q0, q1):
            query = queries[qi]
            dist[:n_rows] = 0
            for w in range(words):
                qw = query[w]
                column = columns[w]
                for i in range(n_rows):
                    dist[i] += popcount(qw ^ column[i])
            # Guess the threshold: the distance below which every 16th row holds a fair margin over k/16.
            counts[:] = 0
            for i in range(0, n_rows, 16):
                counts[dist[i]] += 1
            want = (k + 15) // 16 + 8
            threshold, seen = 0, counts[0]
            while seen < want and threshold < n_bits:
                threshold += 1
                seen += counts[threshold]
            while True:
                kept = 0
                for g in range(0, n_rows, GROUP):
                    low = dist[g]
                    for j in range(1, GROUP):
                        low = min(low, dist[g + j])
                    if low <= threshold:
                        for i in range(g, min(g + GROUP, n_rows)):
                            if dist[i] <= threshold:
                                kept_rows[kept] = i
                                kept += 1
                if kept >= k or threshold >= n_bits:
                    break
                threshold = min(n_bits, threshold + max(1, threshold // 8))
            # Counting sort of the kept rows by distance (rows already ascending), first k of it.
            counts[: threshold + 2] = 0
            for j in range(kept):
                counts[dist[kept_rows[j]] + 1] += 1
            for d in range(1, threshold + 2):
                counts[d] += counts[d - 1]
            for j in range(kept):
                row = kept_rows[j]
                d = dist[row]
                slot = counts[d]
                counts[d] += 1
                if slot < k:
                    scores[qi, slot] = d
                    indices[qi, slot] = row

    @numba.njit(nogil=True, cache=True)
    def score_rows(queries: Any, vectors: Any, candidates: Any, metric: int, q0: int, q1: int, out: Any) -> None:
        """out[q, c]: the float64 score of query q against row candidates[q, c] (0 dot, 1 cosine, 2 l2, 3 l1)."""
        dim = vectors.shape[1]
        for qi in range(q0, q1):
            query = queries[qi]
            query_norm = 0.0
            if metric == 1:
                for j in range(dim):
                    query_norm += np.float64(query[j]) * query[j]
                query_norm = np.sqrt(query_norm)
            for c in range(candidates.shape[1]):
                row = vectors[candidates[qi, c]]
                total = 0.0
                if metric <= 1:
                    row_norm = 0.0
                    for j in range(dim):
                        total += np.float64(query[j]) * row[j]
                        row_norm += np.float64(row[j]) * row[j]
                    if metric == 1:
                        scale = query_norm * np.sqrt(row_norm)
                        total = total / scale if scale > 0 else 0.0
                elif metric == 2:
                    for j in range(dim):
                        diff = np.float64(query[j]) - row[j]
                        total += diff * diff
                else:
                    for j in range(dim):
                        total += abs(np.float64(query[j]) - row[j])
                out[qi, c] = total

    return pytypes.SimpleNamespace(hamming_select=hamming_select, score_rows=score_rows)
