"""The end of a shortlist search in one kernel: re-score, order, certify, flag overflow (one program per query).

Given each query's candidate rows (packed keys from the scan, in any order; keys of score -inf are
empty slots) and its cutoff keys (the largest bounds every row left out), a program:

1. scores each candidate directly in float32 (l2: Σ(x - q)², l1: Σ|x - q|, dot / cosine: Σ x q, cosine
   then divided by both norms, 0 where one is 0), and |q| (l1: Σ|q|) along the way; with
   ``HAS_SUMS`` the sums come from `kernels.rescore` instead (few queries: its grid spreads the
   candidates' reads over many programs);
2. sorts the candidates best first, equal scores by lower row, and writes the k best;
3. certifies them as `gpurag_torch.exact.certify` does, with the bounds of `gpurag_torch.exact`
   (their dimension-only factors come in as scalars), and flags the search when float32 terms may
   overflow (|q| + max |x| past the safe reach, or not finite).

``flags[0]`` counts queries that failed either test, ``flags[1]`` those whose terms may overflow.
"""

from __future__ import annotations

import triton
import triton.language as tl

DOT = tl.constexpr(0)
L2 = tl.constexpr(1)
L1 = tl.constexpr(2)
COSINE = tl.constexpr(3)


@triton.jit
def _ordered(scores):
    """int32 whose signed order is the float32 order of ``scores`` (-0.0 just below +0.0)."""
    bits = scores.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _unordered(ordered):
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def finish_kernel(
    q_ptr,
    x_ptr,
    keys_ptr,
    sums_ptr,
    cutoff_ptr,
    max_norm_ptr,
    row_norms_ptr,
    scores_out_ptr,
    rows_out_ptr,
    certified_ptr,
    flags_ptr,
    n_candidates,
    n_rows,
    dim,
    stride_q,
    stride_x,
    k,
    rel,
    floor,
    cosine_error,
    slack_scale,
    safe_reach,
    METRIC: tl.constexpr,
    M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SUMS: tl.constexpr,
    ROWS32: tl.constexpr = False,
    n_cutoffs=1,
    BLOCK_C: tl.constexpr = 1,
    FLAGS_ONCE: tl.constexpr = False,
):
    """Query ``program_id(0)``: its k best candidates of ``keys`` (Q, n_candidates), certified (module doc)."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, M)
    m_mask = offs_m < n_candidates
    keys = tl.load(keys_ptr + pid * n_candidates + offs_m, mask=m_mask, other=0.0)
    bits = keys.to(tl.int64, bitcast=True)
    rows = (bits & 0xFFFFFFFF).to(tl.int32)
    # Keys of score -inf are empty slots (a split that kept fewer rows than it had room for).
    m_mask = m_mask & ((bits >> 32).to(tl.int32).to(tl.float32, bitcast=True) > float("-inf"))
    # Only real rows reach here, except padding keys when scores are NaN (float32 overflow, flagged
    # below and answered in float64): keep every read in bounds.
    rows = tl.where(m_mask & (rows >= 0) & (rows < n_rows), rows, 0)
    if not HAS_SUMS:  # (with sums only |q| is summed here, over BLOCK_D as wide as D)
        acc = tl.zeros((M, BLOCK_D), dtype=tl.float32)
    q_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        q = tl.load(q_ptr + pid * stride_q + offs_d, mask=d_mask, other=0.0)
        if not HAS_SUMS:
            x = tl.load(
                x_ptr + rows.to(tl.int64)[:, None] * stride_x + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if METRIC == L2:
                diff = x - q[None, :]
                acc += diff * diff
            elif METRIC == L1:
                acc += tl.abs(x - q[None, :])
            else:
                acc += x * q[None, :]
        if METRIC == L1:
            q_acc += tl.abs(q)
        else:
            q_acc += q * q
    if HAS_SUMS:  # noqa: SIM108 (constexpr) summed beforehand by `kernels.rescore` (a wider grid)
        sums = tl.load(sums_ptr + pid * n_candidates + offs_m, mask=m_mask, other=0.0)
    else:
        sums = tl.sum(acc, axis=1)
    q_norm = tl.sum(q_acc, axis=0)
    if METRIC != L1:
        q_norm = tl.sqrt(q_norm)
    if METRIC == COSINE:
        row_norms = tl.load(row_norms_ptr + rows, mask=m_mask, other=0.0)
        denominator = row_norms * q_norm
        sums = tl.where(denominator > 0, sums / tl.where(denominator > 0, denominator, 1.0), 0.0)
    if METRIC == L2 or METRIC == L1:  # noqa: SIM108, SIM109 (constexpr branches: one is compiled)
        oriented = -sums
    else:
        oriented = sums
    oriented = tl.where(m_mask, oriented, float("-inf"))
    # Best first, equal scores by lower row: one int64 key per candidate, sorted descending.
    packed = (_ordered(oriented).to(tl.int64) << 32) | (0xFFFFFFFF - rows.to(tl.int64))
    packed = tl.sort(packed, 0, descending=True)
    best = _unordered((packed >> 32).to(tl.int32))
    best_rows = (0xFFFFFFFF - (packed & 0xFFFFFFFF)).to(tl.int64)
    if METRIC == L2 or METRIC == L1:  # noqa: SIM108, SIM109
        out_scores = -best
    else:
        out_scores = best
    slot = tl.arange(0, M)
    tl.store(scores_out_ptr + pid * k + slot, out_scores, mask=slot < k)
    if ROWS32:  # rows written as int32 (the packed answer of `launch.finish`)
        tl.store(rows_out_ptr + pid * k + slot, best_rows.to(tl.int32), mask=slot < k)
    else:
        tl.store(rows_out_ptr + pid * k + slot, best_rows, mask=slot < k)
    # The certificate (gpurag_torch.exact.certify) on the k-th best.
    oriented_kth = tl.sum(tl.where(slot == k - 1, best, 0.0), axis=0)
    largest = tl.load(max_norm_ptr)
    if METRIC == COSINE:
        error = cosine_error
        slack = slack_scale
    elif METRIC == L1:
        error = rel * (q_norm + largest) + floor
        slack = slack_scale * (q_norm + largest)
    elif METRIC == DOT:
        error = rel * q_norm * largest + floor
        slack = slack_scale * q_norm * largest
    else:
        dot_error = rel * q_norm * largest + floor
        error = 2 * dot_error + 4 * 5.960464477539063e-08 * (largest * largest + 2 * q_norm * largest) + floor
        slack = slack_scale * (q_norm + largest) * (q_norm + largest)
    if METRIC == L2:
        oriented_kth = q_norm * q_norm + oriented_kth  # |q|² - d_k
    # The largest of the query's ``n_cutoffs`` cutoff keys (one per group of splits, or one).
    offs_c = tl.arange(0, BLOCK_C)
    cutoff_key = tl.max(
        tl.load(cutoff_ptr + pid * n_cutoffs + offs_c, mask=offs_c < n_cutoffs, other=float("-inf")), axis=0
    )
    cutoff = (cutoff_key.to(tl.int64, bitcast=True) >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    certified = ((cutoff + error + slack < oriented_kth) | (cutoff == float("-inf"))) & (oriented_kth > float("-inf"))
    reach = q_norm + largest
    if METRIC == L1:
        reach = tl.sqrt(reach)
    overflow = (reach != reach) | (reach > safe_reach) | (reach == float("inf"))
    tl.store(certified_ptr + pid, certified.to(tl.int8))
    if FLAGS_ONCE:  # one program (one query): the flags are written, not added (no zeroed buffer needed)
        tl.store(flags_ptr, (~certified | overflow).to(tl.int32))
        tl.store(flags_ptr + 1, overflow.to(tl.int32))
    else:
        tl.atomic_add(flags_ptr, (~certified | overflow).to(tl.int32), sem="relaxed")
        tl.atomic_add(flags_ptr + 1, overflow.to(tl.int32), sem="relaxed")
