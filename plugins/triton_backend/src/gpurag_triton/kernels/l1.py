"""l1 distance and selection fused, SIMT and register-blocked, over column-major (D, N) rows.

A program holds a (BLOCK_Q, BLOCK_N) tile of accumulators in registers. For each chunk of BLOCK_D
dimensions it loads a (BLOCK_D, BLOCK_Q) tile of queries and a (BLOCK_D, BLOCK_N) tile of rows (both
coalesced, the columns of the (D, Q) and (D, N) copies) and adds ``Σ_d |q_d - x_d|`` over the chunk
to every accumulator: each loaded value serves a whole row or column of the tile, and a pair costs two
float32 instructions (a subtraction and an add of its absolute value). Scores are float32 sums of
the float32 (or bf16-rounded) inputs; the tile then goes through the same running top-KP selection
as the dot-product scan.

With ``HALF`` (float16 queries and rows, the many-query shortlist) a program loads one dimension's
queries and rows a step and sums ``|q - x|`` in float16, two pairs per f16x2 instruction, over a chunk
of CHUNK dimensions; each chunk sum is then added to the float32 accumulator. Every float16 operation
rounds to nearest, which `gpurag_triton.backend.half_l1_bounds` bounds.

With ``CODES`` (the byte-code shortlist, `gpurag_torch.l1_codes`) queries and rows are int32 words of four
signed byte codes each, ``dim`` counts words, and a program adds one word's ``Σ|c_q - c_x|`` a step to an
int32 accumulator: one VABSDIFF4 instruction per word, query and row on the GPU (exact integers), the
same sums by byte arithmetic in the interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gpurag_triton.kernels.select import empty_best, offer_tile


@triton.jit
def _float_tile(
    qt_ptr, xt_ptr, offs_q, offs_n, q_mask, n_mask, dim, stride_qt, stride_xt,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(BLOCK_Q, BLOCK_N) float32 l1 sums: (BLOCK_D, BLOCK_Q) and (BLOCK_D, BLOCK_N) tiles a chunk.

    With several queries the next chunk's tiles are loaded before the current one is summed, so their
    latency hides behind it (on the H200 23.0 against 25.0 ms at 1M x 128 x 1024); one query streams
    rows and keeps its registers for wider tiles in flight (there prefetching cost 0.42 -> 0.53 ms).
    """
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    q_tile = offs_d[:, None] * stride_qt + offs_q[None, :]
    x_tile = offs_d[:, None] * stride_xt + offs_n[None, :]
    q_base = qt_ptr
    x_base = xt_ptr
    if BLOCK_Q == 1:
        for d0 in range(0, dim, BLOCK_D):
            d_mask = offs_d < dim - d0
            q = tl.load(q_base + q_tile, mask=d_mask[:, None] & q_mask[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_base + x_tile, mask=d_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(tl.abs(q[:, :, None] - x[:, None, :]), axis=0)
            # The chunk's first dimension moves by a scalar pointer step: in-tile offsets stay int32.
            q_base += BLOCK_D * stride_qt
            x_base += BLOCK_D * tl.cast(stride_xt, tl.int64)  # a stride of 1 arrives as a constant
    else:
        q = tl.load(qt_ptr + q_tile, mask=(offs_d < dim)[:, None] & q_mask[None, :], other=0.0)
        x = tl.load(xt_ptr + x_tile, mask=(offs_d < dim)[:, None] & n_mask[None, :], other=0.0)
        for d0 in range(0, dim, BLOCK_D):
            q_base += BLOCK_D * stride_qt
            x_base += BLOCK_D * tl.cast(stride_xt, tl.int64)  # a stride of 1 arrives as a constant
            d_next = offs_d < dim - d0 - BLOCK_D
            q_next = tl.load(q_base + q_tile, mask=d_next[:, None] & q_mask[None, :], other=0.0)
            x_next = tl.load(x_base + x_tile, mask=d_next[:, None] & n_mask[None, :], other=0.0)
            qf = q.to(tl.float32)
            xf = x.to(tl.float32)
            acc += tl.sum(tl.abs(qf[:, :, None] - xf[:, None, :]), axis=0)
            q = q_next
            x = x_next
    return acc


@triton.jit
def _abs_diff_f16(acc, q, x, FIRST: tl.constexpr, PACKED: tl.constexpr):
    """``acc + |q - x|`` (``FIRST``: ``|q - x|``) in float16, each operation rounded to nearest: on the GPU
    f16x2 instructions, two elements each; in the interpreter the same float16 arithmetic."""
    if PACKED:
        if FIRST:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t; sub.f16x2 t, $1, $2; abs.f16x2 $0, t; }",
                "=r,r,r",
                [q, x],
                dtype=tl.float16,
                is_pure=True,
                pack=2,
            )
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t; sub.f16x2 t, $2, $3; abs.f16x2 t, t; add.f16x2 $0, $1, t; }",
                "=r,r,r,r",
                [acc, q, x],
                dtype=tl.float16,
                is_pure=True,
                pack=2,
            )
    elif FIRST:
        return tl.abs(q - x)
    else:
        return acc + tl.abs(q - x)


@triton.jit
def _half_tile(
    qt_ptr, xt_ptr, offs_q, offs_n, q_mask, n_mask, dim, stride_qt, stride_xt,
    PACKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    CODES: tl.constexpr = False,
):  # fmt: skip
    """(BLOCK_Q, BLOCK_N) l1 sums of float16 inputs: each chunk of CHUNK dimensions summed in float16, one
    dimension a step, then added to a float32 accumulator (`gpurag_triton.backend.half_l1_bounds` bounds the
    error). A loop step covers BLOCK_D dimensions (a multiple of CHUNK: more loads in flight at once).
    ``EVEN_D``: BLOCK_D divides ``dim`` (no dimension mask)."""
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    chunk = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float16)
    q_base = qt_ptr
    x_base = xt_ptr
    for d0 in range(0, dim, BLOCK_D):
        for dd in tl.static_range(BLOCK_D):
            if EVEN_D:
                q = tl.load(q_base + dd * stride_qt + offs_q, mask=q_mask, other=0.0)
                x = tl.load(x_base + dd * stride_xt + offs_n, mask=n_mask, other=0.0)
            else:
                q_in = q_mask & (tl.zeros_like(offs_q) + d0 + dd < dim)
                n_in = n_mask & (tl.zeros_like(offs_n) + d0 + dd < dim)
                q = tl.load(q_base + dd * stride_qt + offs_q, mask=q_in, other=0.0)
                x = tl.load(x_base + dd * stride_xt + offs_n, mask=n_in, other=0.0)
            chunk = _abs_diff_f16(
                chunk, tl.broadcast_to(q[:, None], (BLOCK_Q, BLOCK_N)), tl.broadcast_to(x[None, :], (BLOCK_Q, BLOCK_N)),
                dd % CHUNK == 0, PACKED,
            )  # fmt: skip
            if dd % CHUNK == CHUNK - 1:
                acc += chunk.to(tl.float32)
        q_base += BLOCK_D * stride_qt
        x_base += BLOCK_D * tl.cast(stride_xt, tl.int64)  # a stride of 1 arrives as a constant
    return acc


@triton.jit
def _sad4(acc, q, x, PACKED: tl.constexpr):
    """``acc`` plus the sum over the four signed bytes of int32 words ``q`` and ``x`` of their absolute differences."""
    if PACKED:
        return tl.inline_asm_elementwise(
            "vabsdiff4.u32.s32.s32.add $0, $1, $2, $3;",
            "=r,r,r,r",
            [q, x, acc],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        total = acc
        for b in tl.static_range(4):
            total += tl.abs(((q << (24 - 8 * b)) >> 24) - ((x << (24 - 8 * b)) >> 24))
        return total


@triton.jit
def _code_tile(
    qt_ptr, xt_ptr, offs_q, offs_n, q_mask, n_mask, words, stride_qt, stride_xt,
    PACKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(BLOCK_Q, BLOCK_N) code distances (float32, exact) of (words, Q) and (words, N) int32 words; a loop
    step covers BLOCK_D words, one word a static step. Queries and rows past the ends read query and row 0
    (their sums are dropped by the caller), so only a partial last step (not ``EVEN_D``) masks its loads."""
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.int32)
    safe_q = tl.where(q_mask, offs_q, 0)
    safe_n = tl.where(n_mask, offs_n, 0)
    q_base = qt_ptr
    x_base = xt_ptr
    for w0 in range(0, words, BLOCK_D):
        for dd in tl.static_range(BLOCK_D):
            if EVEN_D:
                q = tl.load(q_base + dd * stride_qt + safe_q)
                x = tl.load(x_base + dd * stride_xt + safe_n)
            else:
                q = tl.load(q_base + dd * stride_qt + safe_q, mask=tl.zeros_like(offs_q) + w0 + dd < words, other=0)
                x = tl.load(x_base + dd * stride_xt + safe_n, mask=tl.zeros_like(offs_n) + w0 + dd < words, other=0)
            acc = _sad4(
                acc, tl.broadcast_to(q[:, None], (BLOCK_Q, BLOCK_N)), tl.broadcast_to(x[None, :], (BLOCK_Q, BLOCK_N)),
                PACKED,
            )  # fmt: skip
        q_base += BLOCK_D * stride_qt
        x_base += BLOCK_D * tl.cast(stride_xt, tl.int64)  # a stride of 1 arrives as a constant
    return acc.to(tl.float32)


@triton.jit
def l1_scan_kernel(
    qt_ptr,
    xt_ptr,
    tau_ptr,
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
    BLOCK_D: tl.constexpr,
    KP: tl.constexpr,
    HAS_TAU: tl.constexpr,
    HALF: tl.constexpr,
    PACKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    CHUNK: tl.constexpr,
    CODES: tl.constexpr = False,
):
    """out[q, split, :] = the KP best packed keys (score -l1) of query q over the rows of its split.

    With ``HAS_TAU`` only rows scoring above ``tau[q]`` are kept; slots left empty hold -inf keys.
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
        if CODES:
            acc = _code_tile(
                qt_ptr, xt_ptr, offs_q, offs_n, q_mask, n_mask, dim, stride_qt, stride_xt,
                PACKED, EVEN_D, BLOCK_Q, BLOCK_N, BLOCK_D,
            )  # fmt: skip
        elif HALF:
            acc = _half_tile(
                qt_ptr, xt_ptr, offs_q, offs_n, q_mask, n_mask, dim, stride_qt, stride_xt,
                PACKED, EVEN_D, BLOCK_Q, BLOCK_N, BLOCK_D, CHUNK,
            )  # fmt: skip
        else:
            acc = _float_tile(
                qt_ptr, xt_ptr, offs_q, offs_n, q_mask, n_mask, dim, stride_qt, stride_xt, BLOCK_Q, BLOCK_N, BLOCK_D
            )
        scores = tl.where(n_mask[None, :], -acc, float("-inf"))
        rows = offs_n[None, :] + tl.zeros((BLOCK_Q, BLOCK_N), tl.int32)
        best, threshold = offer_tile(best, threshold, scores, rows, KP)
        if HAS_TAU:  # until the running best is full its worst slot is empty (-inf): keep the floor
            threshold = tl.maximum(threshold, floor)
    slots = tl.arange(0, KP)
    tl.store(out_ptr + (offs_q[:, None] * n_splits + pid_s) * KP + slots[None, :], best, mask=q_mask[:, None])
