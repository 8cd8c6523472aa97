"""Hamming distance and selection fused: packed codes as int32 words, popcounts summed, top-KP kept on chip."""

from __future__ import annotations

import triton
import triton.language as tl

from gpurag_triton.kernels.select import empty_best, offer_tile


@triton.jit
def popcount32(v):
    """Set bits of each int32 (SWAR; ``tl.popc`` is missing under the interpreter)."""
    u = v.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def hamming_topk_kernel(
    q_ptr,
    x_ptr,
    out_ptr,
    n_queries,
    n_rows,
    words,
    rows_per_split,
    n_splits,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KP: tl.constexpr,
):
    """out[q, split, :] = the KP nearest rows of the split (packed keys of -distance and row)."""
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
        distance = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.int32)
        for w in range(0, words):
            a = tl.load(q_ptr + offs_q * words + w, mask=q_mask, other=0)
            b = tl.load(x_ptr + offs_n.to(tl.int64) * words + w, mask=n_mask, other=0)
            distance += popcount32(a[:, None] ^ b[None, :])
        scores = tl.where(n_mask[None, :], -distance.to(tl.float32), float("-inf"))
        rows = offs_n[None, :] + tl.zeros((BLOCK_Q, BLOCK_N), tl.int32)
        best, threshold = offer_tile(best, threshold, scores, rows, KP)
    slots = tl.arange(0, KP)
    tl.store(out_ptr + (offs_q[:, None] * n_splits + pid_s) * KP + slots[None, :], best, mask=q_mask[:, None])
