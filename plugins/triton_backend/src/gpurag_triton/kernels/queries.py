"""Queries made ready for a scan in one launch: cosine's unit queries (instead of a norm, a guard and a division).

A program takes one query: its norm in float32 (squares summed, then a correctly rounded square
root), and the query divided by it (correctly rounded), zero queries left zero, as
`gpurag_torch.database.normalised` does.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def unit_rows_kernel(q_ptr, out_ptr, dim, stride_q, BLOCK_D: tl.constexpr):
    """out[i] = q[i] / |q[i]| (float32, contiguous rows); a zero row stays zero."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + pid * stride_q + offs, mask=offs < dim, other=0.0)
        acc += q * q
    norm = tl.sqrt_rn(tl.sum(acc, axis=0))
    norm = tl.where(norm > 0, norm, 1.0)
    for d0 in range(0, dim, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + pid * stride_q + offs, mask=offs < dim, other=0.0)
        tl.store(out_ptr + pid * dim + offs, tl.div_rn(q, norm + tl.zeros_like(q)), mask=offs < dim)
