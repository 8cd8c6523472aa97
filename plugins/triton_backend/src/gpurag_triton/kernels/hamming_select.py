"""Hamming candidate selection by counting: a histogram pass, then a compaction pass, over packed codes.

Hamming distances take only ``n_bits + 1`` values, so the C nearest rows of a query are found
without sorting: the first pass counts, per query and per split of the rows, how many rows lie at
each distance; the host step (`gpurag_triton.candidates`) finds the threshold distance t where the
running count reaches C, and where each split starts writing; the second pass writes every row
nearer than t and the first rows (in row order) at t. Each split writes its rows in row order at
offsets fixed by the counts, so the output is deterministic: rows below t by row, then ties by row.
Codes are int32 words; ``x_ptr`` rows are ``words`` long, loaded as (BLOCK_N, WORDS_P2) tiles.

Where the candidates are few against the rows, `hamming_near_kernel` replaces both passes: a limit
per query, read off the distances to a sample of the rows (`hamming_sample_kernel`), keeps the rows
within the limit in one pass over the codes, appended through an atomic counter per query as
(distance, row) keys; the nearest of those are then picked by key.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # one POPC instruction on the GPU; the interpreter has no libdevice
    from triton.language.extra import libdevice as _libdevice

    _HAS_POPC = hasattr(_libdevice, "popc")
except ImportError:  # pragma: no cover - depends on the Triton build
    _libdevice = None
    _HAS_POPC = False


def has_popc() -> bool:
    """Whether libdevice's popc can be used (never under the interpreter: the caller checks that)."""
    return _HAS_POPC


@triton.jit
def _popcount(v, USE_POPC: tl.constexpr):
    if USE_POPC:
        return _libdevice.popc(v)
    u = v.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _distances(q_ptr, x_ptr, offs_q, q_mask, rows, n_mask, words, WORDS_P2: tl.constexpr, USE_POPC: tl.constexpr):
    """(BLOCK_Q, BLOCK_N) int32 Hamming distances of the queries ``offs_q`` to the rows ``rows`` (int64)."""
    offs_w = tl.arange(0, WORDS_P2)
    w_mask = offs_w < words
    a = tl.load(q_ptr + offs_q[:, None] * words + offs_w[None, :], mask=q_mask[:, None] & w_mask[None, :], other=0)
    b = tl.load(
        x_ptr + rows[:, None] * words + offs_w[None, :],
        mask=n_mask[:, None] & w_mask[None, :],
        other=0,
    )
    return tl.sum(_popcount(a[:, None, :] ^ b[None, :, :], USE_POPC), axis=2)


@triton.jit
def hamming_histogram_kernel(
    q_ptr,
    x_ptr,
    hist_ptr,
    dist_ptr,
    n_queries,
    n_rows,
    words,
    rows_per_split,
    n_splits,
    clip,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORDS_P2: tl.constexpr,
    BINS: tl.constexpr,
    USE_POPC: tl.constexpr,
    STORE_DIST: tl.constexpr,
    PER_QUERY: tl.constexpr,
):
    """hist[q, split, d] = rows of the split at Hamming distance d from query q, for d < ``clip``;
    bin ``clip`` counts the rows at ``clip`` or farther (bin BINS - 1: none; BINS >= clip + 2).

    With ``STORE_DIST`` the distances are also written to ``dist_ptr`` (Q, N) int16, for the
    collecting pass to read instead of the codes (fewer bytes where queries are few).
    With ``PER_QUERY`` each query's row of a tile is counted by its own ``tl.histogram`` of BINS bins
    (the code tile loaded once for all BLOCK_Q queries); without, one histogram of BLOCK_Q x BINS
    bins counts the whole tile (its cost grows with the bins it holds).
    """
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < n_queries
    row_start = pid_s * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, n_rows)
    if PER_QUERY:
        rows_of_q = tl.arange(0, BLOCK_Q)
        offs_w = tl.arange(0, WORDS_P2)
        w_mask = offs_w < words
        per_query = tl.zeros((BLOCK_Q, BINS), dtype=tl.int32)
        for n0 in range(row_start, row_stop, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < row_stop
            b = tl.load(
                x_ptr + offs_n.to(tl.int64)[:, None] * words + offs_w[None, :],
                mask=n_mask[:, None] & w_mask[None, :],
                other=0,
            )
            for qi in tl.static_range(BLOCK_Q):
                query = pid_q * BLOCK_Q + qi
                a = tl.load(q_ptr + query * words + offs_w, mask=w_mask & (query + offs_w * 0 < n_queries), other=0)
                distance = tl.sum(_popcount(a[None, :] ^ b, USE_POPC), axis=1)
                if STORE_DIST:
                    at = dist_ptr + query.to(tl.int64) * n_rows + offs_n
                    tl.store(at, distance.to(tl.int16), mask=n_mask & (query + offs_n * 0 < n_queries))
                counted = tl.histogram(tl.where(n_mask, tl.minimum(distance, clip), BINS - 1), BINS)
                per_query += tl.where(rows_of_q[:, None] == qi, counted[None, :], 0)
        slot_q = pid_q * BLOCK_Q + rows_of_q
        bin_ids = tl.arange(0, BINS)
        tl.store(hist_ptr + (slot_q[:, None] * n_splits + pid_s) * BINS + bin_ids[None, :], per_query,
                 mask=(slot_q < n_queries)[:, None])  # fmt: skip
        return
    lanes = tl.arange(0, BLOCK_Q)[:, None] * BINS
    counts = tl.zeros((BLOCK_Q * BINS,), dtype=tl.int32)
    for n0 in range(row_start, row_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < row_stop
        distance = _distances(q_ptr, x_ptr, offs_q, q_mask, offs_n.to(tl.int64), n_mask, words, WORDS_P2, USE_POPC)
        if STORE_DIST:
            at = dist_ptr + offs_q.to(tl.int64)[:, None] * n_rows + offs_n[None, :]
            tl.store(at, distance.to(tl.int16), mask=q_mask[:, None] & n_mask[None, :])
        bins = lanes + tl.where(n_mask[None, :], tl.minimum(distance, clip), BINS - 1)
        counts += tl.histogram(tl.reshape(bins, (BLOCK_Q * BLOCK_N,)), BLOCK_Q * BINS)
    slots = tl.arange(0, BLOCK_Q * BINS)
    slot_q = pid_q * BLOCK_Q + slots // BINS
    tl.store(hist_ptr + (slot_q * n_splits + pid_s) * BINS + slots % BINS, counts, mask=slot_q < n_queries)


@triton.jit
def hamming_collect_kernel(
    q_ptr,
    x_ptr,
    dist_ptr,
    threshold_ptr,
    below_start_ptr,
    tie_start_ptr,
    rows_out_ptr,
    distances_out_ptr,
    n_queries,
    n_rows,
    words,
    rows_per_split,
    n_splits,
    n_candidates,
    clip,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORDS_P2: tl.constexpr,
    USE_POPC: tl.constexpr,
    LOAD_DIST: tl.constexpr,
):
    """Write each query's rows nearer than its threshold, and its first rows at the threshold, in row order.

    ``below_start[q, split]`` / ``tie_start[q, split]`` are where the split's rows below / at the
    threshold go in the query's (n_candidates,) output; rows at the threshold past it are dropped.
    With ``LOAD_DIST`` distances are read from ``dist_ptr`` (as the histogram pass stored them).
    Distances are compared clipped at ``clip``, as the histogram counted them.
    """
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < n_queries
    row_start = pid_s * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, n_rows)
    threshold = tl.load(threshold_ptr + offs_q, mask=q_mask, other=-1)
    below_at = tl.load(below_start_ptr + offs_q * n_splits + pid_s, mask=q_mask, other=0)
    tie_at = tl.load(tie_start_ptr + offs_q * n_splits + pid_s, mask=q_mask, other=0)
    out_base = offs_q.to(tl.int64)[:, None] * n_candidates
    for n0 in range(row_start, row_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < row_stop
        valid = n_mask[None, :] & q_mask[:, None]
        if LOAD_DIST:
            at = dist_ptr + offs_q.to(tl.int64)[:, None] * n_rows + offs_n[None, :]
            distance = tl.load(at, mask=valid, other=0).to(tl.int32)
        else:
            distance = _distances(q_ptr, x_ptr, offs_q, q_mask, offs_n.to(tl.int64), n_mask, words, WORDS_P2, USE_POPC)
        clipped = tl.minimum(distance, clip)
        below = (valid & (clipped < threshold[:, None])).to(tl.int32)
        tie = (valid & (clipped == threshold[:, None])).to(tl.int32)
        below_slot = below_at[:, None] + tl.cumsum(below, axis=1) - below
        tie_slot = tie_at[:, None] + tl.cumsum(tie, axis=1) - tie
        slot = tl.where(below != 0, below_slot, tie_slot)
        write = (below != 0) | ((tie != 0) & (tie_slot < n_candidates))
        rows = offs_n[None, :].to(tl.int64) + tl.zeros((BLOCK_Q, BLOCK_N), tl.int64)
        tl.store(rows_out_ptr + out_base + slot, rows, mask=write)
        tl.store(distances_out_ptr + out_base + slot, distance, mask=write)
        below_at += tl.sum(below, axis=1)
        tie_at += tl.sum(tie, axis=1)


@triton.jit
def _word_distances(q_ptr, x_ptr, offs_q, q_mask, rows, n_mask, words, USE_POPC: tl.constexpr):
    """(BLOCK_Q, BLOCK_N) int32 Hamming distances, summed word by word over 2-D tiles (no 3-D broadcast)."""
    distance = tl.zeros((offs_q.shape[0], rows.shape[0]), dtype=tl.int32)
    for w in range(0, words):
        a = tl.load(q_ptr + offs_q * words + w, mask=q_mask, other=0)
        b = tl.load(x_ptr + rows * words + w, mask=n_mask, other=0)
        distance += _popcount(a[:, None] ^ b[None, :], USE_POPC)
    return distance


@triton.jit
def hamming_sample_kernel(
    q_ptr,
    x_ptr,
    dist_ptr,
    n_queries,
    n_sample,
    words,
    row_step,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_POPC: tl.constexpr,
):
    """dist[q, j] = the Hamming distance (int16) of query q to code row ``j * row_step``, j < ``n_sample``."""
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < n_queries
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_sample
    rows = offs_n.to(tl.int64) * row_step
    distance = _word_distances(q_ptr, x_ptr, offs_q, q_mask, rows, n_mask, words, USE_POPC)
    at = dist_ptr + offs_q.to(tl.int64)[:, None] * n_sample + offs_n[None, :]
    tl.store(at, distance.to(tl.int16), mask=q_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["capacity", "rank"])  # one compiled kernel for every candidate count
def hamming_near_kernel(
    q_ptr,
    x_ptr,
    limit_ptr,
    counter_ptr,
    keys_ptr,
    n_queries,
    n_rows,
    words,
    rows_per_split,
    capacity,
    rank,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_POPC: tl.constexpr,
    WIDE: tl.constexpr,
    BINS: tl.constexpr = 1,
    LIMIT_FROM_HISTOGRAM: tl.constexpr = False,
    CHECK_TILE: tl.constexpr = True,
):
    """Append each row within its query's limit (distance <= ``limit[q]``) as the key (distance << 32 | row)
    in int64 where ``WIDE``, else (distance << 24 | row) in int32 (distances < 128, rows < 2^24).

    ``counter[q]`` counts every such row (atomically); ``keys[q, :capacity]`` holds the first
    ``capacity`` appended, in no order (a count past ``capacity`` means some were not kept).
    With ``LIMIT_FROM_HISTOGRAM`` ``limit_ptr`` is a (Q, BINS) histogram of a sample's distances
    (`kernels.lsh_select.hamming_sample_histogram_kernel`; bin BINS - 1 not read) and the limit is
    its ``rank``-th smallest distance (at most 127 unless ``WIDE``). With ``CHECK_TILE`` a tile without a
    near row skips its appends (one tile-wide max); without, the appends are only predicated off.
    """
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < n_queries
    row_start = pid_s * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, n_rows)
    if LIMIT_FROM_HISTOGRAM:
        bins = tl.arange(0, BINS)
        hist = tl.load(limit_ptr + offs_q[:, None] * BINS + bins[None, :],
                       mask=q_mask[:, None] & (bins < BINS - 1)[None, :], other=0)  # fmt: skip
        limit = tl.sum((tl.cumsum(hist, axis=1) < rank).to(tl.int32), axis=1)
        if not WIDE:
            limit = tl.minimum(limit, 127)
        limit = tl.where(q_mask, limit, -1)
    else:
        limit = tl.load(limit_ptr + offs_q, mask=q_mask, other=-1)
    counters = counter_ptr + offs_q[:, None] + tl.zeros((BLOCK_Q, BLOCK_N), tl.int32)
    out_base = offs_q.to(tl.int64)[:, None] * capacity
    for n0 in range(row_start, row_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < row_stop
        distance = _word_distances(q_ptr, x_ptr, offs_q, q_mask, offs_n.to(tl.int64), n_mask, words, USE_POPC)
        near = (distance <= limit[:, None]) & n_mask[None, :] & q_mask[:, None]
        if not CHECK_TILE or tl.max(near.to(tl.int32)) > 0:
            slot = tl.atomic_add(counters, near.to(tl.int32), mask=near, sem="relaxed")
            if WIDE:
                key = (distance.to(tl.int64) << 32) | offs_n[None, :].to(tl.int64)
            else:
                key = (distance << 24) | offs_n[None, :]
            tl.store(keys_ptr + out_base + slot, key, mask=near & (slot < capacity))


@triton.jit
def cut_offsets_kernel(
    hist_ptr,
    threshold_ptr,
    below_start_ptr,
    tie_start_ptr,
    n_splits,
    count,
    BINS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Per query (one program each), from hist (Q, S, BINS): the cut t, where the running count reaches
    ``count``, and where each split's rows below t and at t start (see `candidates.cut_and_offsets`)."""
    q = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, BINS)
    total = tl.zeros((BINS,), dtype=tl.int64)
    for s0 in range(0, n_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        block = tl.load(hist_ptr + (q * n_splits + splits[:, None]) * BINS + bins[None, :],
                        mask=splits[:, None] < n_splits, other=0)  # fmt: skip
        total += tl.sum(block.to(tl.int64), axis=0)
    running = tl.cumsum(total, axis=0)
    threshold = tl.sum((running < count).to(tl.int32), axis=0)
    below_all = tl.sum(tl.where(bins < threshold, total, 0), axis=0)
    tl.store(threshold_ptr + q, threshold)
    below_carry = below_all * 0
    tie_carry = below_all
    for s0 in range(0, n_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        s_mask = splits < n_splits
        block = tl.load(hist_ptr + (q * n_splits + splits[:, None]) * BINS + bins[None, :],
                        mask=s_mask[:, None], other=0).to(tl.int64)  # fmt: skip
        below = tl.sum(tl.where(bins[None, :] < threshold, block, 0), axis=1)
        tie = tl.sum(tl.where(bins[None, :] == threshold, block, 0), axis=1)
        tl.store(below_start_ptr + q * n_splits + splits, (below_carry + tl.cumsum(below, axis=0) - below).to(tl.int32),
                 mask=s_mask)  # fmt: skip
        tl.store(tie_start_ptr + q * n_splits + splits, (tie_carry + tl.cumsum(tie, axis=0) - tie).to(tl.int32),
                 mask=s_mask)  # fmt: skip
        below_carry += tl.sum(below, axis=0)
        tie_carry += tl.sum(tie, axis=0)
