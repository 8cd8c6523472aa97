"""Direct float32 re-scoring of candidate rows: each (query, candidate) summed over its D terms, no temporary.

l2 is the sum of squared differences and l1 of absolute differences (never a norm expansion); dot
and cosine sum the products (cosine then divides by both norms, on the host side of the wrapper).
"""

from __future__ import annotations

import triton
import triton.language as tl

SQUARED_DIFF = tl.constexpr(0)
ABS_DIFF = tl.constexpr(1)
PRODUCT = tl.constexpr(2)


@triton.jit
def rescore_kernel(
    q_ptr,
    x_ptr,
    rows_ptr,
    out_ptr,
    n_candidates,
    n_rows,
    dim,
    stride_q,
    stride_x,
    TERM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FROM_KEYS: tl.constexpr = False,
):
    """out[q, m] = Σ_d term(q_d, x[rows[q, m], d]) for BLOCK_M candidates of one query.

    With ``FROM_KEYS`` ``rows_ptr`` holds the scan's packed float64 keys: each row is a key's low 32
    bits, capped at the last row (padding keys are read in bounds; their sums are not used).
    """
    pid_q = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_candidates
    if FROM_KEYS:
        keys = tl.load(rows_ptr + pid_q * n_candidates + offs_m, mask=m_mask, other=0.0)
        rows = tl.minimum(keys.to(tl.int64, bitcast=True) & 0xFFFFFFFF, n_rows - 1)
    else:
        rows = tl.load(rows_ptr + pid_q * n_candidates + offs_m, mask=m_mask, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        q = tl.load(q_ptr + pid_q * stride_q + offs_d, mask=d_mask, other=0.0)
        x = tl.load(
            x_ptr + rows[:, None] * stride_x + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0
        )
        if TERM == SQUARED_DIFF:
            diff = x - q[None, :]
            acc += diff * diff
        elif TERM == ABS_DIFF:
            acc += tl.abs(x - q[None, :])
        else:
            acc += x * q[None, :]
    tl.store(out_ptr + pid_q * n_candidates + offs_m, tl.sum(acc, axis=1), mask=m_mask)
