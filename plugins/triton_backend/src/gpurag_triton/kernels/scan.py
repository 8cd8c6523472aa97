"""Distance and selection fused: each program scores a block of queries against one split of the rows.

No Q x N score tile leaves the chip: a program walks its split in tiles of BLOCK_N rows, scores the
tile (tensor cores through ``tl.dot``, or SIMT multiply / abs-difference sums), and merges it into
each query's running top-KP (`select.offer_tile`). It writes KP packed keys per (query, split); the
host wrapper merges the splits. Oriented scores, larger is better:

- ``DOT`` (0): ``q·x``; ``L2`` (1): ``2 q·x - |x|²`` (from ``extra``, the squared row norms);
- ``L1`` (2): ``-Σ|q - x|``; ``SCALED_DOT`` (3): ``q·x · extra`` (cosine over raw rows: 1/|x|).

With ``LOW`` rows come in bf16 and queries in bf16 or float32 (then rounded to nearest bf16 as they
are loaded), and products are summed in float32; otherwise everything is float32 (``tl.dot`` in IEEE
float32, never TF32).
"""

from __future__ import annotations

import triton
import triton.language as tl

from gpurag_triton.kernels.select import empty_best, offer_tile, offer_tile_by_index

DOT = tl.constexpr(0)
L2 = tl.constexpr(1)
L1 = tl.constexpr(2)
SCALED_DOT = tl.constexpr(3)


@triton.jit
def _as_bf16(q):
    """``q`` rounded to the nearest bf16 (ties to even) when float32, as torch rounds it; bf16 ``q`` as it is.

    The rounding is done on the bits (then the conversion is exact): Triton's CPU interpreter converts
    by truncation, which would double the error the shortlist's bound allows for.
    """
    if q.dtype == tl.float32:
        bits = q.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536: the high 16 bits
        q = bits.to(tl.float32, bitcast=True)
    return q.to(tl.bfloat16)


@triton.jit
def _tile_scores_dot(
    q_ptr,
    x_ptr,
    offs_q,
    offs_n,
    q_mask,
    n_mask,
    stride_q,
    stride_x,
    dim,
    LOW: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        q = tl.load(
            q_ptr + offs_q[:, None] * stride_q + offs_d[None, :], mask=q_mask[:, None] & d_mask[None, :], other=0.0
        )
        xt = tl.load(
            x_ptr + offs_n.to(tl.int64)[None, :] * stride_x + offs_d[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        if LOW:  # noqa: SIM108 (a constexpr branch: one of the two is compiled)
            # float32 queries are rounded to bf16 here (a no-op on bf16 ones): no conversion launch.
            acc = tl.dot(_as_bf16(q), xt, acc)
        else:
            acc = tl.dot(q, xt, acc, input_precision="ieee")
    return acc


@triton.jit
def _tile_scores_simt(
    q_ptr,
    x_ptr,
    offs_q,
    offs_n,
    q_mask,
    n_mask,
    stride_q,
    stride_x,
    dim,
    ABS_DIFF: tl.constexpr,
    LOW: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        q = tl.load(
            q_ptr + offs_q[:, None] * stride_q + offs_d[None, :], mask=q_mask[:, None] & d_mask[None, :], other=0.0
        )
        x = tl.load(
            x_ptr + offs_n.to(tl.int64)[:, None] * stride_x + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if LOW:  # float32 queries rounded to bf16 as the tensor-core path rounds them
            q = _as_bf16(q)
        q = q.to(tl.float32)
        if ABS_DIFF:
            acc += tl.sum(tl.abs(q[:, None, :] - x[None, :, :]), axis=2)
        else:
            acc += tl.sum(q[:, None, :] * x[None, :, :], axis=2)
    return acc


@triton.jit
def scan_topk_kernel(
    q_ptr,
    x_ptr,
    extra_ptr,
    tau_ptr,
    out_ptr,
    n_queries,
    n_rows,
    dim,
    rows_per_split,
    n_splits,
    stride_q,
    stride_x,
    METRIC: tl.constexpr,
    USE_DOT: tl.constexpr,
    LOW: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KP: tl.constexpr,
    SELECT: tl.constexpr,
    HAS_TAU: tl.constexpr,
    BY_INDEX: tl.constexpr = False,
    MASK_QUERIES: tl.constexpr = False,
):
    """out[q, split, :] = the KP best packed keys of query q over rows of its split (see module doc).

    With ``HAS_TAU`` only rows scoring above ``tau[q]`` are kept; slots left empty hold -inf keys.
    ``BY_INDEX``: tiles merged by `select.offer_tile_by_index` (float32 steps) instead of `offer_tile`.
    ``MASK_QUERIES`` (a query block past the last query): the padding queries' scores are -inf, so they
    never take a merge step (an l2 padding query scores -|x|², which would keep its running top-k busy;
    a dot one scores 0 everywhere and is left alone after its first tile).
    """
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < n_queries
    row_start = pid_s * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, n_rows)
    best = empty_best(BLOCK_Q, KP)
    floor = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    if HAS_TAU:  # a floor known beforehand: rows scoring at most tau[q] are never kept
        floor = tl.load(tau_ptr + offs_q, mask=q_mask, other=float("-inf"))
    threshold = floor
    for n0 in range(row_start, row_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < row_stop
        # The per-row term is loaded before the products, so its latency hides behind them.
        if METRIC == L2 or METRIC == SCALED_DOT:  # noqa: SIM109 (constexpr comparisons)
            extra = tl.load(extra_ptr + offs_n, mask=n_mask, other=0.0)
        if USE_DOT:
            raw = _tile_scores_dot(
                q_ptr, x_ptr, offs_q, offs_n, q_mask, n_mask, stride_q, stride_x, dim, LOW, BLOCK_Q, BLOCK_N, BLOCK_D
            )
        else:
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
                METRIC == L1,
                LOW,
                BLOCK_Q,
                BLOCK_N,
                BLOCK_D,
            )
        if METRIC == L2:
            scores = 2.0 * raw - extra[None, :]
        elif METRIC == L1:
            scores = -raw
        elif METRIC == SCALED_DOT:
            scores = raw * extra[None, :]
        else:
            scores = raw
        if MASK_QUERIES:  # (a constexpr branch)
            scores = tl.where(q_mask[:, None] & n_mask[None, :], scores, float("-inf"))
        else:
            scores = tl.where(n_mask[None, :], scores, float("-inf"))
        if SELECT and BY_INDEX:
            best, threshold = offer_tile_by_index(best, threshold, scores, n0, KP)
            if HAS_TAU:
                threshold = tl.maximum(threshold, floor)
        elif SELECT:
            rows = offs_n[None, :] + tl.zeros((BLOCK_Q, BLOCK_N), tl.int32)
            best, threshold = offer_tile(best, threshold, scores, rows, KP)
            if HAS_TAU:  # until the running best is full its worst slot is empty (-inf): keep the floor
                threshold = tl.maximum(threshold, floor)
        else:  # diagnostics only: the scan without selection (its answer is not a top-k)
            threshold = tl.maximum(threshold, tl.max(scores, axis=1))
    slots = tl.arange(0, KP)
    out = out_ptr + (offs_q[:, None] * n_splits + pid_s) * KP + slots[None, :]
    if not SELECT:
        best = tl.where(best == best, threshold[:, None].to(tl.float64), best)
    tl.store(out, best, mask=q_mask[:, None])
