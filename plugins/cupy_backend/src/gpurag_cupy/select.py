"""k-selection over score tiles with the radix kernels of ``kernels/select.cu``: any k up to N.

Each tile of scores (Q, R) gives each query its best ``min(k, R)`` keys through three histogram
passes (11, 11 and 10 bits of an order-preserving key) and one gather, many blocks per query; the
metric's per-row epilogue (l2's ``-|x|²``, cosine's ``1/|x|``) is applied as the scores are read.
Tiles' winners collect in a candidate buffer; when it fills it is selected down to k (the same
kernels, on the keys), and once more at the end. No score matrix is ever sorted.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import cupy
import numpy as np

from gpurag_cupy.kernels import kernel

#: (shift, bits) of the three histogram passes, most significant digit first.
PASSES = ((21, 11), (10, 11), (0, 10))
#: Threads per block of every selection kernel.
BLOCK = 256
#: Keys one block of a histogram or gather pass reads at least before more blocks are used.
KEYS_PER_BLOCK = 8192
#: The candidate buffer holds this many times k (at least two tiles' winners) before it is selected down.
CANDIDATE_FACTOR = 8
#: Whether histogram passes aggregate a warp's keys per bin before the shared atomics (fewer atomics
#: where keys crowd a few bins, at the cost of a warp match per key).
AGGREGATE = True
#: A null device pointer, for the optional arguments of the kernels.
NULL = np.uint64(0)


@functools.cache
def multiprocessors(device: int) -> int:
    """The streaming multiprocessors of CUDA device ``device``."""
    return int(cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device))


def row_blocks(n: int, n_queries: int) -> int:
    """Blocks per query for a pass over ``n`` keys: one per `KEYS_PER_BLOCK`, and enough to fill the card."""
    sms = multiprocessors(cupy.cuda.Device().id)
    wanted = -(-n // KEYS_PER_BLOCK)
    filling = -(-4 * sms // n_queries)
    return max(1, min(-(-n // BLOCK), max(wanted, filling)))


def pointer(x: Any) -> Any:
    """``x`` as a kernel argument: the array itself, or a null pointer for None."""
    return NULL if x is None else x


def select_into(
    source: Any,
    ld: int,
    n: int,
    k: int,
    out_keys: Any,
    out_rows: Any,
    out_offset: int,
    *,
    scores: bool,
    mul: Any = None,
    add: Any = None,
    source_rows: Any = None,
    row_offset: int = 0,
) -> int:
    """Write each query's best ``min(k, n)`` of ``n`` entries of ``source`` into ``out_*[:, out_offset:]``.

    ``source`` is (Q, >= n) with row stride ``ld``: float32 scores (``scores``; key of
    ``score * mul[j] + add[j]``) or uint32 keys with their rows in ``source_rows``. Rows written are
    ``source_rows[q, j]`` or ``row_offset + j``. Returns the number of entries written per query.
    """
    n_queries = int(out_keys.shape[0])
    out_ld = int(out_keys.shape[1])
    kind = "true" if scores else "false"
    grid = (row_blocks(n, n_queries), n_queries)
    state = cupy.zeros((n_queries, 4), dtype=cupy.uint32)
    take_all = n <= k
    if not take_all:
        hist = cupy.zeros((n_queries, 2048), dtype=cupy.uint32)
        for shift, bits in PASSES:
            kernel(f"radix_histogram<{kind}, {'true' if AGGREGATE else 'false'}>")(
                grid,
                (BLOCK,),
                (
                    source,
                    np.int64(ld),
                    np.int64(n),
                    pointer(mul),
                    pointer(add),
                    state,
                    np.int32(shift),
                    np.int32(bits),
                    hist,
                ),
            )
            kernel("radix_pick")((n_queries,), (BLOCK,), (hist, state, np.uint32(k), np.int32(shift), np.int32(bits)))
    kernel(f"radix_gather<{kind}>")(
        grid,
        (BLOCK,),
        (
            source,
            np.int64(ld),
            np.int64(n),
            pointer(mul),
            pointer(add),
            pointer(source_rows),
            np.int64(row_offset),
            state,
            np.int32(k),
            np.int32(take_all),
            out_keys,
            out_rows,
            np.int64(out_ld),
            np.int64(out_offset),
        ),
    )
    return min(k, n)


@dataclasses.dataclass
class Candidates:
    """The best keys (and their rows) of each query found so far, across tiles; selected down when full."""

    k: int
    keys: list[Any]
    rows: list[Any]
    filled: int = 0
    current: int = 0

    @classmethod
    def for_tiles(cls, n_queries: int, k: int, total: int) -> Candidates:
        """A buffer for tiles whose winners add up to ``total`` per query (it compacts past `CANDIDATE_FACTOR` k)."""
        capacity = min(total, CANDIDATE_FACTOR * k)
        keys = [cupy.empty((n_queries, capacity), dtype=cupy.uint32)]
        rows = [cupy.empty((n_queries, capacity), dtype=cupy.int64)]
        return cls(k, keys, rows)

    @property
    def capacity(self) -> int:
        """Entries per query the buffer holds."""
        return int(self.keys[0].shape[1])

    def add_scores(self, scores: Any, ld: int, n: int, row_offset: int, mul: Any = None, add: Any = None) -> None:
        """Take each query's best k of a (Q, n) score tile (row stride ``ld``) whose first row is ``row_offset``."""
        if self.filled + min(self.k, n) > self.capacity:
            self.compact()
        self.filled += select_into(
            scores,
            ld,
            n,
            self.k,
            self.keys[self.current],
            self.rows[self.current],
            self.filled,
            scores=True,
            mul=mul,
            add=add,
            row_offset=row_offset,
        )

    def compact(self) -> None:
        """Select the buffer down to each query's best k, into the other buffer."""
        other = 1 - self.current
        if len(self.keys) == 1:  # the second buffer, made the first time it is needed
            self.keys.append(cupy.empty_like(self.keys[0]))
            self.rows.append(cupy.empty_like(self.rows[0]))
        select_into(
            self.keys[self.current],
            self.capacity,
            self.filled,
            self.k,
            self.keys[other],
            self.rows[other],
            0,
            scores=False,
            source_rows=self.rows[self.current],
        )
        self.current, self.filled = other, self.k

    def best(self) -> Any:
        """(Q, k) int64 rows of each query's k best keys, in no particular order."""
        if self.filled > self.k:
            self.compact()
        return cupy.ascontiguousarray(self.rows[self.current][:, : self.k])
