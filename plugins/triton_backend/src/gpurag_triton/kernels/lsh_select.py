"""An LSH search's selections on the device, without `torch.topk`: a sample's distance histogram, the nearest
appended keys by radix select, and the re-ranked candidates' best k.

`hamming_sample_histogram_kernel` counts each query's distances to every step-th code row into a
(Q, BINS) histogram (atomically, across programs); `kernels.hamming_select.hamming_near_kernel`
reads its limit off that histogram and appends the rows within it as (distance, row) keys;
`select_nearest_keys_kernel` picks each query's ``count`` smallest appended keys by an 8-bit radix
select (one program per query; keys are distinct, so the count-th smallest key K is exact and the
answer is every key <= K); `rescore_best_kernel` scores blocks of candidates exactly and keeps each
block's KP best as packed keys (`kernels.select`), and `best_merge_kernel` sorts a query's blocks'
keys and writes the k best.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gpurag_triton.kernels.hamming_select import _word_distances
from gpurag_triton.kernels.select import key_scores, pack_keys

#: The largest int32: a row r is packed as LOW_ROW - r under a non-negative score (see `pack_lower_row_first`).
LOW_ROW = tl.constexpr(0x7FFFFFFF)

#: Radix digit width of `select_nearest_keys_kernel` (a 256-bin histogram per pass).
DIGIT_BITS = 8


# Counts and sizes that change with the data are not specialised on (one compiled kernel serves them all).
@triton.jit(do_not_specialize=["n_queries", "n_sample", "row_step"])
def hamming_sample_histogram_kernel(
    q_ptr,
    x_ptr,
    hist_ptr,
    n_queries,
    n_sample,
    words,
    row_step,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BINS: tl.constexpr,
    USE_POPC: tl.constexpr,
):
    """hist[q, d] += the code rows ``j * row_step`` (j < ``n_sample``) of this program at distance d from query q.

    ``hist`` (Q, BINS) int32 starts at zero; distances are < BINS - 1 (bin BINS - 1 collects the
    tile's padding and is never read).
    """
    pid_q = tl.program_id(0)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < n_queries
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_sample
    distance = _word_distances(q_ptr, x_ptr, offs_q, q_mask, offs_n.to(tl.int64) * row_step, n_mask, words, USE_POPC)
    lanes = tl.arange(0, BLOCK_Q)[:, None] * BINS
    bins = lanes + tl.where(n_mask[None, :], tl.minimum(distance, BINS - 2), BINS - 1)
    counts = tl.histogram(tl.reshape(bins, (BLOCK_Q * BLOCK_N,)), BLOCK_Q * BINS)
    slots = tl.arange(0, BLOCK_Q * BINS)
    query = pid_q * BLOCK_Q + slots // BINS
    tl.atomic_add(hist_ptr + pid_q * BLOCK_Q * BINS + slots, counts, mask=(query < n_queries) & (counts > 0),
                  sem="relaxed")  # fmt: skip


@triton.jit(do_not_specialize=["count", "capacity"])
def select_nearest_keys_kernel(
    keys_ptr,
    counter_ptr,
    rows_ptr,
    failed_ptr,
    count,
    capacity,
    PASSES: tl.constexpr,
    ROW_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """rows[q, :count] = the rows of query q's ``count`` smallest keys among its ``min(counter[q], capacity)``
    appended ones (in the order they were appended); failed[q] = 1 where counter[q] was below ``count``
    or above ``capacity`` (then its rows are all 0), else 0.

    Keys are distinct non-negative integers below 2 ** (8 * PASSES) whose low ``ROW_BITS`` bits are the
    row. Pass p histograms digit PASSES - 1 - p of the keys that share the digits chosen so far (keys
    below them in bin 0, less the known number of them; keys above, and padding, in bin 255) and
    chooses the digit where the running count reaches the rank still wanted.
    """
    q = tl.program_id(0).to(tl.int64)
    seen = tl.load(counter_ptr + q)
    bad = (seen < count) | (seen > capacity)
    n_valid = tl.where(bad, 0, tl.minimum(seen, capacity))
    base = keys_ptr + q * capacity
    out = rows_ptr + q * count
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    for c0 in range(0, tl.where(bad, count, 0), BLOCK):  # a failed answer keeps its rows in range
        tl.store(out + c0 + offs, tl.zeros((BLOCK,), tl.int64), mask=c0 + offs < count)
    tl.store(failed_ptr + q, bad.to(tl.int32))
    remaining = count  # the rank, among the keys sharing `prefix`'s chosen digits, of the key wanted
    prefix = seen.to(tl.int64) * 0  # the digits chosen so far (a scalar tensor: loop-carried)
    for p in tl.static_range(PASSES):
        shift = 8 * (PASSES - 1 - p)
        hist = tl.zeros((256,), tl.int32)
        for c0 in range(0, n_valid, BLOCK):
            valid = c0 + offs < n_valid
            key = tl.load(base + c0 + offs, mask=valid, other=0).to(tl.int64)
            digit = ((key >> shift) & 255).to(tl.int32)
            if p == 0:
                value = tl.where(valid, digit, 255)
            else:
                high = key >> (shift + 8)
                chosen = prefix >> (shift + 8)
                value = tl.where(valid & (high == chosen), digit, tl.where(valid & (high < chosen), 0, 255))
            hist += tl.histogram(value, 256)
        if p > 0:  # bin 0 also counted every key below the chosen digits: count - remaining of them
            hist -= tl.where(bins == 0, count - remaining, 0)
        running = tl.cumsum(hist, axis=0)
        chosen_digit = tl.sum((running < remaining).to(tl.int32), axis=0)
        remaining -= tl.sum(tl.where(bins < chosen_digit, hist, 0), axis=0)
        prefix += chosen_digit.to(tl.int64) << shift
    written = seen * 0
    for c0 in range(0, n_valid, BLOCK):
        valid = c0 + offs < n_valid
        key = tl.load(base + c0 + offs, mask=valid, other=0).to(tl.int64)
        keep = valid & (key <= prefix)
        slot = written + tl.cumsum(keep.to(tl.int32), axis=0) - keep.to(tl.int32)
        tl.store(out + slot, key & ((1 << ROW_BITS) - 1), mask=keep & (slot < count))  # never past the row
        written += tl.sum(keep.to(tl.int32), axis=0)


@triton.jit
def pack_lower_row_first(scores, rows):
    """`kernels.select.pack_keys` with the row bits arranged so that, of equal scores, the lower row's key is
    the larger (LOW_ROW - row under a non-negative score's bits, the row itself under a negative one's)."""
    negative = scores.to(tl.int32, bitcast=True) < 0
    return pack_keys(scores, tl.where(negative, rows, LOW_ROW - rows))


@triton.jit
def unpack_row(keys):
    """The row a `pack_lower_row_first` key holds (int64)."""
    low = keys.to(tl.int64, bitcast=True) & 0xFFFFFFFF
    return tl.where(keys.to(tl.int64, bitcast=True) < 0, low, LOW_ROW - low)


@triton.jit(do_not_specialize=["n_candidates", "n_rows", "n_blocks"])
def rescore_best_kernel(
    q_ptr,
    x_ptr,
    rows_ptr,
    norms_ptr,
    out_ptr,
    n_candidates,
    n_rows,
    n_blocks,
    dim,
    stride_q,
    stride_x,
    TERM: tl.constexpr,
    COSINE: tl.constexpr,
    LOWER_IS_BETTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KP: tl.constexpr,
):
    """out[q, block, :KP] = the KP best keys (`pack_lower_row_first` of oriented score and row) of BLOCK_M
    candidates ``rows[q]``, best first (equal scores: the lower row first). Each is scored as
    `kernels.rescore.rescore_kernel` sums it (cosine then divided by both norms, 0 where either is 0; the
    query's norm summed here), negated where lower is better; absent candidates score -inf."""
    pid_q = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_candidates
    rows = tl.load(rows_ptr + pid_q * n_candidates + offs_m, mask=m_mask, other=0)
    rows = tl.minimum(tl.maximum(rows, 0), n_rows - 1)  # reads stay in bounds whatever the rows hold
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    squares = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        q = tl.load(q_ptr + pid_q * stride_q + offs_d, mask=d_mask, other=0.0)
        x = tl.load(
            x_ptr + rows[:, None] * stride_x + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0
        )
        if COSINE:
            squares += q * q
        if TERM == 0:
            diff = x - q[None, :]
            acc += diff * diff
        elif TERM == 1:
            acc += tl.abs(x - q[None, :])
        else:
            acc += x * q[None, :]
    score = tl.sum(acc, axis=1)
    if COSINE:
        denominator = tl.load(norms_ptr + rows, mask=m_mask, other=0.0) * tl.sqrt_rn(tl.sum(squares, axis=0))
        score = tl.where(denominator > 0, tl.div_rn(score, tl.where(denominator > 0, denominator, 1.0)), 0.0)
    if LOWER_IS_BETTER:
        score = -score
    score = tl.where(m_mask, score, float("-inf"))
    ordered = tl.sort(pack_lower_row_first(score, rows.to(tl.int32)), 0, descending=True)
    slots = tl.arange(0, BLOCK_M)
    tl.store(out_ptr + (pid_q * n_blocks + pid_m) * KP + slots, ordered, mask=slots < KP)


@triton.jit(do_not_specialize=["n_keys", "k"])
def best_merge_kernel(
    keys_ptr,
    scores_ptr,
    rows_ptr,
    n_keys,
    k,
    LOWER_IS_BETTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """scores[q, :k], rows[q, :k] = the k best of query q's ``n_keys`` packed keys, best first (scores un-negated)."""
    q = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    keys = tl.load(keys_ptr + q * n_keys + offs, mask=offs < n_keys, other=float("-inf"))
    ordered = tl.sort(keys, 0, descending=True)
    score = key_scores(ordered)
    if LOWER_IS_BETTER:
        score = -score
    rows = unpack_row(ordered)
    tl.store(scores_ptr + q * k + offs, score, mask=offs < k)
    tl.store(rows_ptr + q * k + offs, rows, mask=offs < k)
