"""l1 distance and selection fused, SIMT, over column-major (D, N) rows.

Dimension by dimension, a program loads one contiguous run of queries and one of rows and adds
``|q_d - x_d|`` into a (BLOCK_Q, BLOCK_N) accumulator held in registers: an outer "product" with
coalesced loads, two float32 instructions per pair, no reduction across threads. Scores are exact
float32 sums (summed directly, one dimension at a time); the tile then goes through the same running
top-KP selection as the dot-product scan.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gpurag_triton.kernels.select import empty_best, offer_tile


@triton.jit
def l1_scan_kernel(
    qt_ptr,
    xt_ptr,
    out_ptr,
    n_queries,
    n_rows,
    dim,
    rows_per_split,
    n_splits,
    stride_qt,
    stride_xt,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KP: tl.constexpr,
):
    """out[q, split, :] = the KP best packed keys (score -l1) of query q over the rows of its split."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < n_queries
    row_start = pid_s * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, n_rows)
    best = empty_best(BLOCK_Q, KP)
    threshold = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    for n0 in range(row_start, row_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < row_stop
        acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        q_col = qt_ptr + offs_q
        x_col = xt_ptr + offs_n
        for _ in range(0, dim):
            qv = tl.load(q_col, mask=q_mask, other=0.0).to(tl.float32)
            xv = tl.load(x_col, mask=n_mask, other=0.0).to(tl.float32)
            acc += tl.abs(qv[:, None] - xv[None, :])
            q_col += stride_qt
            x_col += stride_xt
        scores = tl.where(n_mask[None, :], -acc, float("-inf"))
        rows = offs_n[None, :] + tl.zeros((BLOCK_Q, BLOCK_N), tl.int32)
        best, threshold = offer_tile(best, threshold, scores, rows, KP)
    slots = tl.arange(0, KP)
    tl.store(out_ptr + (offs_q[:, None] * n_splits + pid_s) * KP + slots[None, :], best, mask=q_mask[:, None])
