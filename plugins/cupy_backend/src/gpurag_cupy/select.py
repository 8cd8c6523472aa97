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
#: Whether tiles after the first take only keys at or above a known k-th best key first (see `Candidates`).
THRESHOLD_FILTER = True
#: Slots (times k) the threshold pass may fill for one tile before the radix passes take over.
FILTER_SLOTS = 4
#: Above this k, the threshold pass gets `FILTER_SLOTS_WIDE_K` k slots instead: the slots of every tile
#: are reserved in the candidate buffer (eight k), which four k filled at every tile or two, each time
#: selected down again. H200, 10M x 128 x 1,024 l2, k = 4,096: 2.07x the k = 10 time with four k slots,
#: 1.84x with two, 1.64x with one (W2b).
WIDE_K = 256
FILTER_SLOTS_WIDE_K = 1


def filter_slots(k: int) -> int:
    """Slots the threshold pass fills for one tile's keys at or above a query's running k-th best."""
    return (FILTER_SLOTS_WIDE_K if k > WIDE_K else FILTER_SLOTS) * k


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
    filtered: Any = None,
    slots: int = 0,
) -> Any:
    """Write each query's best ``min(k, n)`` of ``n`` entries of ``source`` into ``out_*[:, out_offset:]``.

    ``source`` is (Q, >= n) with row stride ``ld``: float32 scores (``scores``; key of
    ``score * mul[j] + add[j]``) or uint32 keys with their rows in ``source_rows``. Rows written are
    ``source_rows[q, j]`` or ``row_offset + j``. With ``filtered`` (per query, the keys
    ``threshold_gather`` found, into ``slots`` slots), queries with at most ``slots`` of them are
    skipped, and the others' slots past k emptied. Returns the (Q, 4)
    uint32 state, whose first column is each query's k-th best key (when n > k).
    """
    n_queries = int(out_keys.shape[0])
    out_ld = int(out_keys.shape[1])
    kind = "true" if scores else "false"
    grid = (row_blocks(n, n_queries), n_queries)
    state = cupy.zeros((n_queries, 4), dtype=cupy.uint32)
    take_all = n <= k
    skip = pointer(filtered)
    if not take_all:
        hist = cupy.zeros((n_queries, 2048), dtype=cupy.uint32)
        histogram = kernel(f"radix_histogram<{kind}, {'true' if AGGREGATE else 'false'}>")
        for shift, bits in PASSES:
            histogram(
                grid,
                (BLOCK,),
                (source, np.int64(ld), np.int64(n), pointer(mul), pointer(add), state, np.int32(shift),
                 np.int32(bits), hist, skip, np.uint32(slots)),
            )  # fmt: skip
            kernel("radix_pick")(
                (n_queries,),
                (BLOCK,),
                (hist, state, np.uint32(k), np.int32(shift), np.int32(bits), skip, np.uint32(slots)),
            )
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
            skip,
            np.uint32(slots),
        ),
    )
    return state


@dataclasses.dataclass
class Candidates:
    """The best keys (and their rows) of each query found so far, across tiles; selected down when full.

    ``threshold`` holds, per query, a k-th best key among the rows seen (from a tile's or the
    buffer's selection): no later key below it can be among the k best, so a later tile first takes
    only its keys at or above it (one pass), and runs the radix passes only for queries where those
    are more than k.
    """

    k: int
    keys: list[Any]
    rows: list[Any]
    threshold: Any
    filled: int = 0
    current: int = 0
    has_threshold: bool = False

    @classmethod
    def for_tiles(cls, n_queries: int, k: int, total: int, *, filtering: bool = False) -> Candidates:
        """A buffer for tiles whose winners add up to ``total`` per query (it compacts past `CANDIDATE_FACTOR` k).

        ``filtering``: tiles after the first may be taken by the threshold pass, which reserves
        `filter_slots` slots, so the buffer holds at least k more than that.
        """
        capacity = min(total, CANDIDATE_FACTOR * k)
        if filtering and THRESHOLD_FILTER:
            capacity = max(capacity, filter_slots(k) + k)
        keys = [cupy.empty((n_queries, capacity), dtype=cupy.uint32)]
        rows = [cupy.empty((n_queries, capacity), dtype=cupy.int64)]
        return cls(k, keys, rows, cupy.zeros(n_queries, dtype=cupy.uint32))

    @property
    def capacity(self) -> int:
        """Entries per query the buffer holds."""
        return int(self.keys[0].shape[1])

    def add_scores(self, scores: Any, ld: int, n: int, row_offset: int, mul: Any = None, add: Any = None) -> None:
        """Take each query's best k of a (Q, n) score tile (row stride ``ld``) whose first row is ``row_offset``."""
        k = self.k
        slots = filter_slots(k)
        filter_tile = THRESHOLD_FILTER and self.has_threshold and n > k and self.capacity >= k + slots
        taken = slots if filter_tile else min(k, n)
        if self.filled + taken > self.capacity:
            self.compact()
        keys, rows = self.keys[self.current], self.rows[self.current]
        filtered = None
        if filter_tile:
            keys[:, self.filled : self.filled + slots] = 0  # slots the threshold pass leaves stay below every key
            filtered = cupy.zeros(keys.shape[0], dtype=cupy.uint32)
            kernel("threshold_gather")(
                (row_blocks(n, keys.shape[0]), keys.shape[0]),
                (BLOCK,),
                (scores, np.int64(ld), np.int64(n), pointer(mul), pointer(add), np.int64(row_offset),
                 self.threshold, np.int32(slots), filtered, keys, rows, np.int64(self.capacity),
                 np.int64(self.filled)),
            )  # fmt: skip
        state = select_into(
            scores, ld, n, k, keys, rows, self.filled,
            scores=True, mul=mul, add=add, row_offset=row_offset, filtered=filtered, slots=slots,
        )  # fmt: skip
        if n > k:
            self._raise_threshold(state)
        self.filled += taken

    def _raise_threshold(self, state: Any) -> None:
        cupy.maximum(self.threshold, state[:, 0], out=self.threshold)  # skipped queries' state is 0
        self.has_threshold = True

    def compact(self) -> None:
        """Select the buffer down to each query's best k, into the other buffer."""
        other = 1 - self.current
        if len(self.keys) == 1:  # the second buffer, made the first time it is needed
            self.keys.append(cupy.empty_like(self.keys[0]))
            self.rows.append(cupy.empty_like(self.rows[0]))
        state = select_into(
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
        if self.filled > self.k:
            self._raise_threshold(state)
        self.current, self.filled = other, self.k

    def best(self) -> Any:
        """(Q, k) int64 rows of each query's k best keys, in no particular order."""
        if self.filled > self.k:
            self.compact()
        return cupy.ascontiguousarray(self.rows[self.current][:, : self.k])
