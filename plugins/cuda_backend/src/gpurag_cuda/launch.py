"""Host wrappers of the CUDA kernels: pick the launch shape, check what goes in, launch on torch's stream.

Arrays are torch CUDA tensors; the kernels receive their raw pointers and run on the stream torch is
using, so no copy or synchronisation is added. A scan returns `Candidates`: per (query, split) the
kp best oriented keys (larger is better) and their int32 rows, best first, padded with -inf / -1.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import numpy as np
import torch

from gpurag.errors import InvalidInputError
from gpurag_cuda import compiler

THREADS = 256
#: Query tile and row tile of the tensor-core scan (kernels/scan_tc.cu: BQ, BN, BK).
TC_BLOCK_Q, TC_BLOCK_N, TC_BLOCK_K = 64, 128, 32
#: Operand stages of its copy pipeline (kernels/scan_tc.cu: STAGES), restarted at each row tile.
TC_STAGES = 4
#: Whether vector-loadable scans take the kernel whose pipeline flows across row tiles
#: (kernels/scan_tc.cu: scan_bf16_tc_flow, FLOW_STAGES stages). Off: on an H200 it was the slower,
#: 12.7 against 11.5 ms at 1M x 768 x 1024 and 31.2 against 26.8 ms at 10M x 128 x 1024 (both correct).
TC_FLOW = False
TC_FLOW_STAGES = 3
#: The register-filtered tensor-core scan (kernels/scan_tc.cu: scan_bf16_reg{Q}x{N}) for vector-loadable
#: select scans: its block tile, queries by rows, one of `TC_REG_TILES`. Its keys never pass through shared
#: memory, and one copy pipeline of `TC_REG_STAGES` stages flows across the split's row tiles.
TC_REG_TILES = ((64, 128), (128, 128), (128, 256))
TC_REG_BLOCK_Q, TC_REG_BLOCK_N = 64, 128
TC_REG_STAGES = 4
#: The wide tensor-core scan (kernels/scan_wide.cu: BQ, BN, BK, STAGES): a 128 x 128 block tile per CTA,
#: one CTA per multiprocessor (it takes most of the shared memory), vector-loadable operands only.
WIDE_BLOCK_Q, WIDE_BLOCK_N, WIDE_BLOCK_K, WIDE_STAGES = 128, 128, 32, 4
#: Whether the wide scan keeps its query tile in shared memory for the whole split where it fits
#: (kernels/scan_wide.cu: scan_bf16_wide_resident; D up to 192 at kp 16): the stages then carry rows only.
WIDE_RESIDENT = False
#: The wide exact l1 tile (kernels/l1_wide.cu: BQ, BN, BK): 128 x 128 per CTA, 8 x 8 per thread, one CTA per
#: multiprocessor.
L1_WIDE_BLOCK_Q, L1_WIDE_BLOCK_N, L1_WIDE_BLOCK_K = 128, 128, 8
#: Query tile and row tile of the SIMT scans (kernels/simt_tile.cu: BQ, BN, BK).
SIMT_BLOCK_Q, SIMT_BLOCK_N, SIMT_BLOCK_K = 64, 64, 16
#: Most queries one streaming launch scores (kernels/stream.cu: MAX_QUERIES).
STREAM_MAX_QUERIES = 8
#: Most queries one few-query stream launch scores (kernels/stream_few.cu: its widths 1, 2, 4, 8, 16).
FEW_MAX_QUERIES = 16
#: Its query widths (one kernel each per mode).
FEW_WIDTHS = (1, 4, 8, FEW_MAX_QUERIES)
#: Rows a warp of the streaming scan reads in one batch.
STREAM_ROWS = 32
#: Largest kp the kernels keep per (query, split).
MAX_KP = 64
#: Blocks per multiprocessor the tile scans aim at, and warps per multiprocessor for the stream.
#: (Blocks of each tile kernel that fit on a multiprocessor at once: a launch fills the card in one wave,
#: since a second, partial wave would double the time; measured on an H200, 272 blocks of the
#: tensor-core scan on 264 slots took 20.4 ms where 528 took 12.9.)
TILE_BLOCKS_PER_SM = 2
SIMT_BLOCKS_PER_SM = 3
STREAM_WARPS_PER_SM = 16
#: Most dynamic shared memory a launch asks for (an H200 block may have 227 KiB).
SHARED_LIMIT = 200 * 1024
#: Most dynamic shared memory the wide scan asks for (an H100/H200 block may opt into 227 KiB).
WIDE_SHARED_LIMIT = 227 * 1024

#: Stream modes (kernels/stream.cu).
DOT, L2, L1 = 0, 1, 2


class Candidates(NamedTuple):
    """(Q, splits, kp) oriented keys and int32 rows of one scan, and the rows each split covered."""

    keys: torch.Tensor
    rows: torch.Tensor
    rows_per_split: int

    def kept_per_query(self, n_rows: int) -> int:
        """How many entries of each query hold a real row (the others are -inf padding)."""
        kp = int(self.keys.shape[2])
        full, rest = divmod(n_rows, self.rows_per_split)
        return full * min(kp, self.rows_per_split) + min(kp, rest)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one scan splits its rows: splits of ``rows_per_split`` rows each."""

    splits: int
    rows_per_split: int


def pow2_at_least(value: int) -> int:
    """The smallest power of two >= value."""
    return 1 << max(0, (int(value) - 1).bit_length())


def capacity(kp: int) -> int:
    """Entries of a candidate list for ``kp`` kept keys: a power of two >= kp + 32."""
    return pow2_at_least(kp + 32)


@functools.cache
def multiprocessors(device_index: int) -> int:
    """Multiprocessors of the CUDA device (an H200 has 132)."""
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_layout(
    n_queries: int, n_rows: int, block_q: int, block_n: int, sms: int, blocks_per_sm: int | None = None
) -> Layout:
    """Splits of a tile scan: as many (query tile, split) blocks as fill the card in one wave, whole row tiles each."""
    query_tiles = _cdiv(n_queries, block_q)
    resident = (TILE_BLOCKS_PER_SM if blocks_per_sm is None else blocks_per_sm) * sms
    splits = max(1, min(_cdiv(n_rows, block_n), resident // query_tiles))
    per_split = _cdiv(_cdiv(n_rows, splits), block_n) * block_n
    return Layout(_cdiv(n_rows, per_split), per_split)


def stream_layout(n_rows: int, sms: int, warps_per_sm: int | None = None) -> Layout:
    """Splits of a streaming scan: one per warp, runs of whole 32-row batches, at most a full card of warps."""
    per_sm = STREAM_WARPS_PER_SM if warps_per_sm is None else warps_per_sm
    warps = max(1, min(_cdiv(n_rows, STREAM_ROWS), per_sm * sms))
    per_warp = _cdiv(_cdiv(n_rows, warps), STREAM_ROWS) * STREAM_ROWS
    splits = _cdiv(n_rows, per_warp)
    return Layout(_cdiv(splits, THREADS // 32) * (THREADS // 32), per_warp)


def stream_shared_bytes(dim: int, kp: int) -> int:
    """Dynamic shared memory of a streaming launch: the queries, and each warp's lists for each query."""
    return 4 * STREAM_MAX_QUERIES * ((dim + 3) // 4 * 4) + (THREADS // 32) * STREAM_MAX_QUERIES * (8 * capacity(kp) + 8)


def streams(n_queries: int, dim: int, kp: int) -> bool:
    """Whether the streaming scan takes a search of ``n_queries`` queries of dimension ``dim``."""
    return n_queries <= STREAM_MAX_QUERIES and stream_shared_bytes(dim, kp) <= SHARED_LIMIT


def _check(x: torch.Tensor, name: str, dtype: torch.dtype, device: torch.device, ndim: int = 2) -> None:
    if x.dtype != dtype or x.device != device or x.dim() != ndim or not x.is_contiguous():
        raise InvalidInputError(
            f"{name} must be a contiguous {ndim}-d {dtype} tensor on {device}; "
            f"got {x.dtype} {tuple(x.shape)} on {x.device} (contiguous: {x.is_contiguous()})"
        )


_STREAMS: dict[tuple[int, int], Any] = {}


def _stream(device: torch.device) -> Any:
    """The CuPy view of the stream torch is using on ``device`` (made once per stream)."""
    import cupy

    current = torch.cuda.current_stream(device)
    key = (device.index or 0, int(current.cuda_stream))
    stream = _STREAMS.get(key)
    if stream is None:
        try:
            stream = cupy.cuda.Stream.from_external(current)
        except (AttributeError, TypeError):  # CuPy < 14, or a torch without the CUDA stream protocol
            stream = cupy.cuda.ExternalStream(key[1], key[0])
        _STREAMS[key] = stream
    return stream


def _launch(
    module: str, kernel: str, device: torch.device, grid: tuple[int, ...], shared: int, args: list[Any]
) -> None:
    import cupy

    index = device.index or 0
    fn = compiler.function(module, kernel, index)
    with cupy.cuda.Device(index), _stream(device):
        fn(grid, (THREADS,), tuple(args), shared_mem=shared)


def _ptr(tensor: torch.Tensor) -> np.uint64:
    return np.uint64(tensor.data_ptr())


def _i32(value: int) -> np.int32:
    return np.int32(value)


def _outputs(n_queries: int, splits: int, kp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.empty((n_queries, splits, kp), dtype=torch.float32, device=device)
    rows = torch.empty((n_queries, splits, kp), dtype=torch.int32, device=device)
    return keys, rows


def _check_kp(kp: int) -> None:
    if not (1 <= kp <= MAX_KP and kp & (kp - 1) == 0):
        raise InvalidInputError(f"kp must be a power of two in 1..{MAX_KP}; got {kp}")


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def tc_operand_bytes() -> int:
    """Shared memory of the tensor-core scans before their lists: the operand stages, or the score tile."""
    return max(TC_STAGES * 2 * (TC_BLOCK_K + 8) * (TC_BLOCK_Q + TC_BLOCK_N), 4 * TC_BLOCK_Q * (TC_BLOCK_N + 4))


def wide_shared_bytes(kp: int) -> int:
    """Dynamic shared memory of a wide tensor-core launch: operand stages, score tile, lists and flags."""
    operands = WIDE_STAGES * 2 * (WIDE_BLOCK_K + 8) * (WIDE_BLOCK_Q + WIDE_BLOCK_N)
    return operands + 4 * WIDE_BLOCK_Q * (WIDE_BLOCK_N + 4) + WIDE_BLOCK_Q * (8 * capacity(kp) + 12)


def wide_resident_shared_bytes(dim: int, kp: int) -> int:
    """Dynamic shared memory of the wide scan with its query tile resident: the tile, row-only stages, the rest."""
    queries = 2 * WIDE_BLOCK_Q * (_cdiv(dim, 32) * 32 + 8)
    stages = WIDE_STAGES * 2 * (WIDE_BLOCK_K + 8) * WIDE_BLOCK_N
    return queries + stages + 4 * WIDE_BLOCK_Q * (WIDE_BLOCK_N + 4) + WIDE_BLOCK_Q * (8 * capacity(kp) + 12)


def wide_takes(dim: int, kp: int) -> bool:
    """Whether the wide tensor-core scan can scan dimension ``dim`` keeping ``kp`` (aligned operands aside)."""
    return dim % 8 == 0 and wide_shared_bytes(kp) <= WIDE_SHARED_LIMIT


def tuning() -> tuple[Any, ...]:
    """The module switches that choose kernels (part of a captured graph's key)."""
    return (
        TC_REG_BLOCK_Q,
        TC_REG_BLOCK_N,
        TC_REG_STAGES,
        STREAM_WARPS_PER_SM,
        TILE_BLOCKS_PER_SM,
    )


def reg_shared_bytes(block_q: int, kp: int, block_n: int = TC_BLOCK_N) -> int:
    """Dynamic shared memory of a register-filtered launch: its operand stages, then the lists and their state."""
    stages = TC_REG_STAGES * 2 * (TC_BLOCK_K + 8) * (block_q + block_n)
    return stages + block_q * (8 * capacity(kp) + 8)


def reg_blocks_per_sm(block_q: int, kp: int, block_n: int = TC_BLOCK_N) -> int:
    """Blocks of a register-filtered launch that share a multiprocessor: two 64-query blocks where their shared
    memory allows (the larger tiles take most of the registers)."""
    return 2 if block_q == 64 and 2 * (reg_shared_bytes(block_q, kp, block_n) + 1024) <= 228 * 1024 else 1


def reg_takes(dim: int, kp: int) -> bool:
    """Whether the register-filtered scan (`TC_REG_BLOCK_Q` x `TC_REG_BLOCK_N`) takes dimension ``dim`` keeping
    ``kp`` (aligned operands aside)."""
    return (
        (TC_REG_BLOCK_Q, TC_REG_BLOCK_N) in TC_REG_TILES
        and dim % 8 == 0
        and reg_shared_bytes(TC_REG_BLOCK_Q, kp, TC_REG_BLOCK_N) <= WIDE_SHARED_LIMIT
    )


def tc_layout(n_queries: int, n_rows: int, dim: int, kp: int, sms: int, wide: bool, reg: bool = False) -> Layout:
    """The splits of a tensor-core scan: the wide tile's where it takes the scan, the register-filtered tile's
    where ``reg`` asks for it and it takes the scan, else the earlier tile's."""
    if wide and wide_takes(dim, kp):
        return tile_layout(n_queries, n_rows, WIDE_BLOCK_Q, WIDE_BLOCK_N, sms, 1)
    if reg and reg_takes(dim, kp):
        block_q, block_n = TC_REG_BLOCK_Q, TC_REG_BLOCK_N
        return tile_layout(n_queries, n_rows, block_q, block_n, sms, reg_blocks_per_sm(block_q, kp, block_n))
    return tile_layout(n_queries, n_rows, TC_BLOCK_Q, TC_BLOCK_N, sms)


def scan_tc(
    queries: torch.Tensor,
    rows: torch.Tensor,
    sq_norms: torch.Tensor | None,
    kp: int,
    wide: bool = False,
    ldm: bool = False,
    reg: bool = False,
) -> Candidates:
    """Tensor-core scan of bf16 ``queries`` (Q, D) against bf16 ``rows`` (N, D): dot keys, or l2's with ``sq_norms``.

    ``wide`` takes the 128 x 128 tile kernel where it can (D a multiple of 8, aligned operands, kp's lists fit);
    ``ldm`` feeds the 64 x 128 tile's fragments by ldmatrix (kernels/scan_tc.cu: scan_bf16_tc_ldm); ``reg`` takes the
    register-filtered tile (`TC_REG_BLOCK_Q` x `TC_REG_BLOCK_N`) where it can (D a multiple of 8, aligned operands).
    """
    device = rows.device
    _check(queries, "queries", torch.bfloat16, device)
    _check(rows, "rows", torch.bfloat16, device)
    _check_kp(kp)
    n_queries, dim = queries.shape
    n_rows = rows.shape[0]
    if wide and wide_takes(dim, kp) and _aligned(queries, rows):
        return _scan_wide(queries, rows, sq_norms, kp)
    if reg and reg_takes(dim, kp) and _aligned(queries, rows):
        return _scan_reg(queries, rows, sq_norms, kp)
    layout = tile_layout(n_queries, n_rows, TC_BLOCK_Q, TC_BLOCK_N, multiprocessors(device.index or 0))
    cap = capacity(kp)
    keys, out_rows = _outputs(n_queries, layout.splits, kp, device)
    vec = dim % 8 == 0 and _aligned(queries, rows)
    flow = vec and TC_FLOW
    if flow:  # its own operand stages and score tile, then the lists and flags
        operands = TC_FLOW_STAGES * 2 * (TC_BLOCK_K + 8) * (TC_BLOCK_Q + TC_BLOCK_N) + 4 * TC_BLOCK_Q * (TC_BLOCK_N + 4)
    else:  # the operand stages or the score tile over them, then the lists and flags
        operands = tc_operand_bytes()
    shared = operands + TC_BLOCK_Q * (8 * cap + 12)
    norms = sq_norms if sq_norms is not None else keys  # unread for dot
    grid = (_cdiv(n_queries, TC_BLOCK_Q), layout.splits)
    kernel = "scan_bf16_tc_flow" if flow else ("scan_bf16_tc_ldm" if vec and ldm else "scan_bf16_tc")
    _launch("scan_tc", kernel, device, grid, shared, [
        _ptr(queries), _ptr(rows), _ptr(norms), _i32(n_queries), _i32(n_rows), _i32(dim),
        _i32(layout.rows_per_split), _i32(int(sq_norms is not None)), _i32(kp), _i32(cap), _i32(int(vec)),
        _ptr(keys), _ptr(out_rows),
    ])  # fmt: skip
    return Candidates(keys, out_rows, layout.rows_per_split)


def _scan_reg(queries: torch.Tensor, rows: torch.Tensor, sq_norms: torch.Tensor | None, kp: int) -> Candidates:
    device = rows.device
    n_queries, dim = queries.shape
    n_rows = rows.shape[0]
    block_q, block_n = TC_REG_BLOCK_Q, TC_REG_BLOCK_N
    layout = tc_layout(n_queries, n_rows, dim, kp, multiprocessors(device.index or 0), False, True)
    keys, out_rows = _outputs(n_queries, layout.splits, kp, device)
    norms = sq_norms if sq_norms is not None else keys  # unread for dot
    _launch("scan_tc", f"scan_bf16_reg{block_q}x{block_n}", device, (_cdiv(n_queries, block_q), layout.splits),
            reg_shared_bytes(block_q, kp, block_n), [
        _ptr(queries), _ptr(rows), _ptr(norms), _i32(n_queries), _i32(n_rows), _i32(dim),
        _i32(layout.rows_per_split), _i32(int(sq_norms is not None)), _i32(kp), _i32(capacity(kp)),
        _ptr(keys), _ptr(out_rows),
    ])  # fmt: skip
    return Candidates(keys, out_rows, layout.rows_per_split)


def _scan_wide(queries: torch.Tensor, rows: torch.Tensor, sq_norms: torch.Tensor | None, kp: int) -> Candidates:
    device = rows.device
    n_queries, dim = queries.shape
    n_rows = rows.shape[0]
    layout = tc_layout(n_queries, n_rows, dim, kp, multiprocessors(device.index or 0), True)
    keys, out_rows = _outputs(n_queries, layout.splits, kp, device)
    norms = sq_norms if sq_norms is not None else keys  # unread for dot
    grid = (_cdiv(n_queries, WIDE_BLOCK_Q), layout.splits)
    resident = WIDE_RESIDENT and wide_resident_shared_bytes(dim, kp) <= WIDE_SHARED_LIMIT
    shared = wide_resident_shared_bytes(dim, kp) if resident else wide_shared_bytes(kp)
    _launch("scan_wide", "scan_bf16_wide_resident" if resident else "scan_bf16_wide", device, grid, shared, [
        _ptr(queries), _ptr(rows), _ptr(norms), _i32(n_queries), _i32(n_rows), _i32(dim),
        _i32(layout.rows_per_split), _i32(int(sq_norms is not None)), _i32(kp), _i32(capacity(kp)),
        _ptr(keys), _ptr(out_rows),
    ])  # fmt: skip
    return Candidates(keys, out_rows, layout.rows_per_split)


def collect_tc(
    queries: torch.Tensor,
    rows: torch.Tensor,
    sq_norms: torch.Tensor | None,
    thresholds: torch.Tensor,
    capacity: int,
    wide: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every row whose bf16 key reaches its query's threshold: (keys (Q, capacity), int32 rows, int32 counts (Q,)).

    Entries past a query's count are unset; a count above ``capacity`` means its buffer overflowed. ``wide``
    takes the 128 x 128 tile kernel where it can (D a multiple of 8, aligned operands).
    """
    device = rows.device
    _check(queries, "queries", torch.bfloat16, device)
    _check(rows, "rows", torch.bfloat16, device)
    _check(thresholds, "thresholds", torch.float32, device, ndim=1)
    n_queries, dim = queries.shape
    n_rows = rows.shape[0]
    keys = torch.empty((n_queries, capacity), dtype=torch.float32, device=device)
    out_rows = torch.empty((n_queries, capacity), dtype=torch.int32, device=device)
    counts = torch.zeros(n_queries, dtype=torch.int32, device=device)
    sms = multiprocessors(device.index or 0)
    if wide and dim % 8 == 0 and _aligned(queries, rows):
        layout = tile_layout(n_queries, n_rows, WIDE_BLOCK_Q, WIDE_BLOCK_N, sms, 2)
        shared = WIDE_STAGES * 2 * (WIDE_BLOCK_K + 8) * (WIDE_BLOCK_Q + WIDE_BLOCK_N) + 4 * WIDE_BLOCK_Q
        norms = sq_norms if sq_norms is not None else keys
        _launch("scan_wide", "collect_bf16_wide", device, (_cdiv(n_queries, WIDE_BLOCK_Q), layout.splits), shared, [
            _ptr(queries), _ptr(rows), _ptr(norms), _ptr(thresholds), _i32(n_queries), _i32(n_rows), _i32(dim),
            _i32(layout.rows_per_split), _i32(int(sq_norms is not None)), _i32(capacity),
            _ptr(keys), _ptr(out_rows), _ptr(counts),
        ])  # fmt: skip
        return keys, out_rows, counts
    layout = tile_layout(n_queries, n_rows, TC_BLOCK_Q, TC_BLOCK_N, sms)
    shared = tc_operand_bytes() + TC_BLOCK_Q * 8  # thresholds and flags
    vec = dim % 8 == 0 and _aligned(queries, rows)
    norms = sq_norms if sq_norms is not None else keys
    grid = (_cdiv(n_queries, TC_BLOCK_Q), layout.splits)
    _launch("scan_tc", "collect_bf16_tc", device, grid, shared, [
        _ptr(queries), _ptr(rows), _ptr(norms), _ptr(thresholds), _i32(n_queries), _i32(n_rows), _i32(dim),
        _i32(layout.rows_per_split), _i32(int(sq_norms is not None)), _i32(int(vec)), _i32(capacity),
        _ptr(keys), _ptr(out_rows), _ptr(counts),
    ])  # fmt: skip
    return keys, out_rows, counts


def stream_scan(
    queries: torch.Tensor, rows: torch.Tensor, sq_norms: torch.Tensor | None, mode: int, kp: int
) -> Candidates:
    """Streaming scan of float32 ``queries`` (Q <= 8, D) against bf16 or float32 ``rows`` (N, D) in ``mode``."""
    device = rows.device
    _check(queries, "queries", torch.float32, device)
    if rows.dtype not in (torch.bfloat16, torch.float32):
        raise InvalidInputError(f"rows must be bfloat16 or float32; got {rows.dtype}")
    _check(rows, "rows", rows.dtype, device)
    _check_kp(kp)
    n_queries, dim = queries.shape
    if not 1 <= n_queries <= STREAM_MAX_QUERIES:
        raise InvalidInputError(f"queries must number 1..{STREAM_MAX_QUERIES} for the streaming scan; got {n_queries}")
    if mode == L2 and sq_norms is None:
        raise InvalidInputError("sq_norms are required for the l2 mode")
    n_rows = rows.shape[0]
    layout = stream_layout(n_rows, multiprocessors(device.index or 0))
    cap = capacity(kp)
    keys, out_rows = _outputs(n_queries, layout.splits, kp, device)
    warps = THREADS // 32
    shared = stream_shared_bytes(dim, kp)
    if shared > SHARED_LIMIT:
        raise InvalidInputError(
            f"dim {dim} is too large for the streaming scan (at most {SHARED_LIMIT} bytes of lists)"
        )
    lanes = 8 if rows.dtype == torch.bfloat16 else 4
    vec = dim % lanes == 0 and _aligned(rows)
    norms = sq_norms if sq_norms is not None else keys
    # One query whose vectors fit a lane's registers (kernels/stream.cu, Lanes::REG) takes the register kernel.
    one = n_queries == 1 and vec and dim // lanes <= 32 * (3 if lanes == 8 else 6)
    kernel = ("stream_one_" if one else "stream_") + ("bf16" if rows.dtype == torch.bfloat16 else "f32")
    _launch("stream", kernel, device, (layout.splits // warps,), shared, [
        _ptr(queries), _ptr(rows), _ptr(norms), _i32(n_queries), _i32(n_rows), _i32(dim),
        _i32(layout.rows_per_split), _i32(mode), _i32(kp), _i32(cap), _i32(int(vec)),
        _ptr(keys), _ptr(out_rows),
    ])  # fmt: skip
    return Candidates(keys, out_rows, layout.rows_per_split)


def few_width(n_queries: int) -> int:
    """The query width (kernels/stream_few.cu: 1, 4, 8 or 16) of the few-query stream scoring ``n_queries``."""
    return next(width for width in FEW_WIDTHS if width >= n_queries)


def few_warps_per_sm(n_queries: int) -> int:
    """Warps per multiprocessor of that launch: its 16-query kernel takes one 8-warp block per multiprocessor."""
    return 8 if few_width(n_queries) == FEW_MAX_QUERIES else STREAM_WARPS_PER_SM


def few_shared_bytes(dim: int, n_queries: int, kp: int) -> int:
    """Dynamic shared memory of a few-query stream launch: the queries' two halves, each warp's lists per query."""
    width = few_width(n_queries)
    halves = 2 * (_cdiv(dim, 16) * 8 * width + 4)
    return 4 * halves + (THREADS // 32) * width * (8 * capacity(kp) + 8)


def few_takes(n_queries: int, dim: int, kp: int) -> bool:
    """Whether the few-query stream can take a scan (aligned rows aside): 1..16 queries, D a multiple of 8."""
    return (
        1 <= n_queries <= FEW_MAX_QUERIES and dim % 8 == 0 and few_shared_bytes(dim, n_queries, kp) <= WIDE_SHARED_LIMIT
    )


def stream_few(
    queries: torch.Tensor, rows: torch.Tensor, sq_norms: torch.Tensor | None, mode: int, kp: int
) -> Candidates:
    """Few-query stream of float32 ``queries`` (1..16, D) against bf16 ``rows`` (N, D) in ``mode`` (dot, l2, l1)."""
    device = rows.device
    _check(queries, "queries", torch.float32, device)
    _check(rows, "rows", torch.bfloat16, device)
    _check_kp(kp)
    n_queries, dim = queries.shape
    if not few_takes(n_queries, dim, kp) or not _aligned(rows):
        raise InvalidInputError(
            f"the few-query stream takes 1..{FEW_MAX_QUERIES} queries, a dimension that is a multiple of 8 and "
            f"16-byte aligned rows; got {n_queries} queries of dimension {dim}"
        )
    if mode == L2 and sq_norms is None:
        raise InvalidInputError("sq_norms are required for the l2 mode")
    layout = stream_layout(rows.shape[0], multiprocessors(device.index or 0), few_warps_per_sm(n_queries))
    keys, out_rows = _outputs(n_queries, layout.splits, kp, device)
    norms = sq_norms if sq_norms is not None else keys
    name = {DOT: "dot", L2: "l2", L1: "l1"}[mode]
    _launch("stream_few", f"few_{name}_{few_width(n_queries)}", device, (layout.splits // (THREADS // 32),),
            few_shared_bytes(dim, n_queries, kp), [
        _ptr(queries), _ptr(rows), _ptr(norms), _i32(n_queries), _i32(rows.shape[0]), _i32(dim),
        _i32(layout.rows_per_split), _i32(kp), _i32(capacity(kp)), _ptr(keys), _ptr(out_rows),
    ])  # fmt: skip
    return Candidates(keys, out_rows, layout.rows_per_split)


def _simt_scan(kernel: str, queries: torch.Tensor, rows: torch.Tensor, kp: int) -> Candidates:
    device = rows.device
    _check_kp(kp)
    n_queries, width = queries.shape
    n_rows = rows.shape[0]
    layout = tile_layout(
        n_queries, n_rows, SIMT_BLOCK_Q, SIMT_BLOCK_N, multiprocessors(device.index or 0), SIMT_BLOCKS_PER_SM
    )
    cap = capacity(kp)
    keys, out_rows = _outputs(n_queries, layout.splits, kp, device)
    shared = 2 * 4 * SIMT_BLOCK_K * (SIMT_BLOCK_Q + 4) + 4 * SIMT_BLOCK_Q * (SIMT_BLOCK_N + 4)
    shared += SIMT_BLOCK_Q * (8 * cap + 12)  # lists and flags
    grid = (_cdiv(n_queries, SIMT_BLOCK_Q), layout.splits)
    _launch("simt_tile", kernel, device, grid, shared, [
        _ptr(queries), _ptr(rows), _i32(n_queries), _i32(n_rows), _i32(width),
        _i32(layout.rows_per_split), _i32(kp), _i32(cap), _ptr(keys), _ptr(out_rows),
    ])  # fmt: skip
    return Candidates(keys, out_rows, layout.rows_per_split)


def l1_wide_shared_bytes(kp: int) -> int:
    """Dynamic shared memory of a wide l1 launch: double-buffered operands, score tile, lists and flags."""
    return (
        4 * 2 * 2 * L1_WIDE_BLOCK_K * (L1_WIDE_BLOCK_Q + 4)
        + 4 * L1_WIDE_BLOCK_Q * (L1_WIDE_BLOCK_N + 4)
        + (L1_WIDE_BLOCK_Q * (8 * capacity(kp) + 12))
    )


def l1_wide_takes(dim: int, kp: int) -> bool:
    """Whether the wide l1 tile can take a scan of dimension ``dim`` keeping ``kp`` (aligned operands aside)."""
    return dim % 4 == 0 and l1_wide_shared_bytes(kp) <= WIDE_SHARED_LIMIT


def l1_tile_wide(queries: torch.Tensor, rows: torch.Tensor, kp: int) -> Candidates:
    """Register-blocked exact l1 scan (kernels/l1_wide.cu) of float32 ``queries`` against float32 ``rows``; keys -l1."""
    device = rows.device
    _check(queries, "queries", torch.float32, device)
    _check(rows, "rows", torch.float32, device)
    _check_kp(kp)
    n_queries, dim = queries.shape
    if not l1_wide_takes(dim, kp) or not _aligned(queries, rows):
        raise InvalidInputError(f"the wide l1 tile takes a dimension that is a multiple of 4 and aligned operands; "
                                f"got dimension {dim}")  # fmt: skip
    n_rows = rows.shape[0]
    layout = tile_layout(n_queries, n_rows, L1_WIDE_BLOCK_Q, L1_WIDE_BLOCK_N, multiprocessors(device.index or 0), 1)
    keys, out_rows = _outputs(n_queries, layout.splits, kp, device)
    grid = (_cdiv(n_queries, L1_WIDE_BLOCK_Q), layout.splits)
    _launch("l1_wide", "l1_tile_wide", device, grid, l1_wide_shared_bytes(kp), [
        _ptr(queries), _ptr(rows), _i32(n_queries), _i32(n_rows), _i32(dim), _i32(layout.rows_per_split),
        _i32(kp), _i32(capacity(kp)), _ptr(keys), _ptr(out_rows),
    ])  # fmt: skip
    return Candidates(keys, out_rows, layout.rows_per_split)


#: Query widths of the byte-code l1 scan (kernels/l1_codes.cu: one kernel each), its rows per warp batch, and
#: its blocks per multiprocessor (one: each takes up to 214 registers a thread).
CODES_WIDTHS = (8, 16, 32)
CODES_BATCH_ROWS = 128
CODES_BLOCKS_PER_SM = 1


def l1_codes_shared_bytes(words: int, width: int, kp: int) -> int:
    """Dynamic shared memory of a byte-code l1 launch: the query words, each warp's list per query."""
    return 4 * words * width + (THREADS // 32) * width * (8 * capacity(kp) + 8)


def l1_codes_width(n_queries: int, words: int, kp: int, widest: int = 32) -> int:
    """The query width of the byte-code scan for ``n_queries`` (the narrowest that holds them, at most ``widest``
    and within the shared memory limit), or 0 when none fits."""
    fitting = [w for w in CODES_WIDTHS if w <= widest and l1_codes_shared_bytes(words, w, kp) <= WIDE_SHARED_LIMIT]
    if not fitting:
        return 0
    return next((w for w in fitting if w >= n_queries), fitting[-1])


def l1_codes_layout(n_queries: int, n_rows: int, width: int, sms: int, blocks_per_sm: int | None = None) -> Layout:
    """Splits of a byte-code scan: one per warp, runs of whole 128-row batches, the card filled in one wave."""
    per_sm = CODES_BLOCKS_PER_SM if blocks_per_sm is None else blocks_per_sm
    warps = THREADS // 32
    blocks = max(1, min(_cdiv(n_rows, warps * CODES_BATCH_ROWS), (sms * per_sm) // _cdiv(n_queries, width)))
    per_warp = _cdiv(_cdiv(n_rows, blocks * warps), CODES_BATCH_ROWS) * CODES_BATCH_ROWS
    return Layout(_cdiv(n_rows, per_warp * warps) * warps, per_warp)


def l1_codes_scan(
    query_words: torch.Tensor,
    row_words_t: torch.Tensor,
    kp: int,
    width: int | None = None,
    blocks_per_sm: int | None = None,
) -> Candidates:
    """Byte-code l1 scan (kernels/l1_codes.cu) of int32 ``query_words`` (Q, W) against column-major int32
    ``row_words_t`` (W, N) (gpurag_torch.l1_codes); keys -SAD (exact integers), rows int32."""
    device = row_words_t.device
    _check(query_words, "query_words", torch.int32, device)
    if row_words_t.dtype != torch.int32 or row_words_t.device != device or row_words_t.dim() != 2:
        raise InvalidInputError(f"row_words_t must be a 2-d int32 tensor on {device}; got {row_words_t.dtype} "
                                f"{tuple(row_words_t.shape)} on {row_words_t.device}")  # fmt: skip
    if row_words_t.stride(1) != 1 and row_words_t.shape[1] > 1:
        raise InvalidInputError(f"row_words_t must have contiguous rows; got strides {row_words_t.stride()}")
    _check_kp(kp)
    n_queries, words = query_words.shape
    if row_words_t.shape[0] != words:
        raise InvalidInputError(f"queries have {words} words, rows {row_words_t.shape[0]}")
    n_rows = row_words_t.shape[1]
    if n_rows == 0 or n_queries == 0:
        raise InvalidInputError(f"the byte-code scan needs rows and queries; got {n_rows} rows, {n_queries} queries")
    if width is None:
        width = l1_codes_width(n_queries, words, kp)
    if width not in CODES_WIDTHS or l1_codes_shared_bytes(words, width, kp) > WIDE_SHARED_LIMIT:
        raise InvalidInputError(f"no byte-code scan of width {width} holds {words} words at kp={kp}")
    layout = l1_codes_layout(n_queries, n_rows, width, multiprocessors(device.index or 0), blocks_per_sm)
    warps = THREADS // 32
    keys, out_rows = _outputs(n_queries, layout.splits, kp, device)
    stride = row_words_t.stride(0)
    vec = row_words_t.data_ptr() % 16 == 0 and stride % 4 == 0
    name = f"l1_codes_{width}"
    grid = (_cdiv(n_queries, width), layout.splits // warps)
    _launch("l1_codes", name, device, grid, l1_codes_shared_bytes(words, width, kp), [
        _ptr(query_words), _ptr(row_words_t), np.int64(stride), _i32(int(vec)), _i32(n_queries), _i32(n_rows),
        _i32(words),
        _i32(layout.rows_per_split), _i32(kp), _i32(capacity(kp)), _ptr(keys), _ptr(out_rows),
    ])  # fmt: skip
    return Candidates(keys, out_rows, layout.rows_per_split)


def l1_tile(queries: torch.Tensor, rows: torch.Tensor, kp: int) -> Candidates:
    """Tiled exact l1 scan of float32 ``queries`` (Q, D) against float32 ``rows`` (N, D); keys are -l1."""
    _check(queries, "queries", torch.float32, rows.device)
    _check(rows, "rows", torch.float32, rows.device)
    return _simt_scan("l1_tile", queries, rows, kp)


def hamming_tile(codes: torch.Tensor, database_codes: torch.Tensor, kp: int) -> Candidates:
    """Tiled Hamming scan of uint8 packed codes (Q, W) against (N, W); keys are -distance."""
    device = database_codes.device
    _check(codes, "codes", torch.uint8, device)
    _check(database_codes, "database_codes", torch.uint8, device)
    return _simt_scan("hamming_tile", as_words(codes), as_words(database_codes), kp)


def as_words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (R, W) as int32 words (R, ceil(W / 4)), zero bytes appended where W is not a multiple of 4."""
    width = codes.shape[1]
    words = _cdiv(width, 4)
    if width != 4 * words or codes.data_ptr() % 4:
        padded = torch.zeros((codes.shape[0], 4 * words), dtype=torch.uint8, device=codes.device)
        padded[:, :width] = codes
        codes = padded
    return codes.view(torch.int32)


def rescore(queries: torch.Tensor, rows: torch.Tensor, candidates: torch.Tensor, term: int) -> torch.Tensor:
    """(Q, M) float32 direct sums for int64 ``candidates`` (Q, M): term 0 squared differences, 1 absolute, 2 dot."""
    device = rows.device
    _check(queries, "queries", torch.float32, device)
    _check(rows, "rows", torch.float32, device)
    candidates = candidates.contiguous()
    _check(candidates, "candidates", torch.int64, device)
    n_queries, per_query = candidates.shape
    out = torch.empty((n_queries, per_query), dtype=torch.float32, device=device)
    pairs = n_queries * per_query
    if pairs:
        _launch("rescore", "rescore", device, (_cdiv(pairs, THREADS // 32),), 0, [
            _ptr(queries), _ptr(rows), _ptr(candidates), _i32(n_queries), _i32(per_query),
            _i32(queries.shape[1]), _i32(term), _ptr(out),
        ])  # fmt: skip
    return out
