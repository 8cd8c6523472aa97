"""Distance and a threshold filter fused: every (query, row) scoring at least the query's threshold is appended.

The selection-free alternative to `kernels.scan` for many queries: each program scores tiles of its
split on tensor cores as `scan_topk_kernel` does, then compares each score with its query's
threshold ``tau`` (found beforehand on a sample of the rows, so it is low enough that each query
keeps a few hundred rows). A score at or above it takes the next slot of its query's list through
an atomic counter; scores past ``capacity`` are counted but not written (the caller sees the count
overflow and answers that query another way). Per tile this costs one comparison per score instead
of a running top-k insertion, so the scan runs at the speed of its GEMM.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gpurag_triton.kernels.scan import L2, SCALED_DOT, _tile_scores_dot, _tile_scores_simt

#: How hits take their slots: one atomic per hit, or one per query and tile plus a running count.
PER_HIT = tl.constexpr(0)
PER_QUERY = tl.constexpr(1)


@triton.jit
def filter_scan_kernel(
    q_ptr,
    x_ptr,
    extra_ptr,
    tau_ptr,
    count_ptr,
    scores_ptr,
    rows_ptr,
    n_queries,
    n_rows,
    dim,
    rows_per_split,
    capacity,
    stride_q,
    stride_x,
    METRIC: tl.constexpr,
    USE_DOT: tl.constexpr,
    LOW: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    APPEND: tl.constexpr,
):
    """Append (score, row) to query q's list (``scores``/``rows`` (Q, capacity)) for every row scoring >= tau[q]."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < n_queries
    tau = tl.load(tau_ptr + offs_q, mask=q_mask, other=float("inf"))
    row_start = pid_s * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, n_rows)
    for n0 in range(row_start, row_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < row_stop
        if USE_DOT:
            raw = _tile_scores_dot(
                q_ptr, x_ptr, offs_q, offs_n, q_mask, n_mask, stride_q, stride_x, dim, LOW, BLOCK_Q, BLOCK_N, BLOCK_D
            )
        else:  # the interpreter's bf16 tl.dot is wrong: SIMT products there
            raw = _tile_scores_simt(
                q_ptr,
                x_ptr,
                offs_q,
                offs_n,
                q_mask,
                n_mask,
                stride_q,
                stride_x,
                dim,
                False,
                LOW,
                BLOCK_Q,
                BLOCK_N,
                BLOCK_D,
            )
        if METRIC == L2:
            extra = tl.load(extra_ptr + offs_n, mask=n_mask, other=0.0)
            scores = 2.0 * raw - extra[None, :]
        elif METRIC == SCALED_DOT:
            extra = tl.load(extra_ptr + offs_n, mask=n_mask, other=0.0)
            scores = raw * extra[None, :]
        else:
            scores = raw
        hits = (scores >= tau[:, None]) & n_mask[None, :]
        if tl.max(tl.max(hits.to(tl.int32), axis=1), axis=0) > 0:
            if APPEND == PER_QUERY:  # one atomic per query, slots from a running count along the tile
                n_hits = tl.sum(hits.to(tl.int32), axis=1)
                base = tl.atomic_add(count_ptr + offs_q, n_hits, mask=n_hits > 0, sem="relaxed")
                slot = base[:, None] + tl.cumsum(hits.to(tl.int32), axis=1) - 1
            else:  # one atomic per hit (flattened: Triton cannot lower atomics on the dot's 2-D layout)
                counters = count_ptr + offs_q[:, None] + tl.zeros((BLOCK_Q, BLOCK_N), tl.int32)
                flat = tl.atomic_add(
                    tl.reshape(counters, (BLOCK_Q * BLOCK_N,)),
                    1,
                    mask=tl.reshape(hits, (BLOCK_Q * BLOCK_N,)),
                    sem="relaxed",
                )
                slot = tl.reshape(flat, (BLOCK_Q, BLOCK_N))
            keep = hits & (slot < capacity)
            where = offs_q[:, None].to(tl.int64) * capacity + slot
            tl.store(scores_ptr + where, scores, mask=keep)
            tl.store(rows_ptr + where, offs_n[None, :] + tl.zeros((BLOCK_Q, BLOCK_N), tl.int32), mask=keep)
