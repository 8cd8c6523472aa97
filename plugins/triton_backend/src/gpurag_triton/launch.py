"""Host wrappers of the Triton kernels: check shapes, dtypes, devices and strides, pick block sizes, launch.

A wrapper returns the kernels' packed keys (Q, splits, KP) float64; `decode` turns them into
float32 oriented scores and int64 rows.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import torch
import triton

from gpurag.errors import InvalidInputError
from gpurag_triton.kernels.finish import finish_kernel
from gpurag_triton.kernels.hamming import hamming_topk_kernel
from gpurag_triton.kernels.l1 import l1_scan_kernel
from gpurag_triton.kernels.merge import merge_groups_kernel
from gpurag_triton.kernels.queries import unit_rows_kernel
from gpurag_triton.kernels.rescore import rescore_kernel
from gpurag_triton.kernels.scan import scan_topk_kernel

#: Multiprocessors of the card this was tuned on (an H200 has 132); read from the device when there is one.
DEFAULT_SMS = 132
#: Largest KP the kernels keep per (query, split).
MAX_KP = 256
#: Dimensions the float16 l1 path sums in float16 before adding to float32 (`kernels.l1`): its error bound
#: (`gpurag_triton.backend.half_l1_bounds`) and range (chunk sums stay below 65504) assume this.
L1_HALF_CHUNK = 8
#: Whether scans merge tiles into their running top-KP by `select.offer_tile_by_index` (float32 steps)
#: rather than `select.offer_tile` (steps over the tile's packed 64-bit keys). On an H200 (W1): l2
#: 1M x 768 Q=1 search 0.69 -> 0.55 ms; Q=1024 dot / l2 / cosine 5.80 / 6.16 / 6.22 -> 5.66 / 6.00 / 6.16 ms.
SELECT_BY_INDEX = True
#: (BLOCK_N, BLOCK_D, warps, stages, programs per SM) of the tensor-core scan below 16 queries.
SMALL_Q_SCAN = (64, 128, 4, 3, 4)
#: Whether `finish` below `split_below` queries re-scores by `rescore`'s wide programs, sums |q| in one step,
#: and (one query) writes its flags without a zeroed buffer: a shorter tail for one-query searches. With the
#: merge's top-k (H200, S4 W2, 1M x 768 Q=1 search, against main's tail, interleaved): dot / l2 / cosine
#: 0.492 / 0.523 / 0.587 -> 0.480 / 0.484 / 0.562 ms.
FINISH_WIDE = True
#: (BLOCK_Q, BLOCK_N, BLOCK_D, warps, stages, programs per SM) of the tensor-core scan from 512 queries.
BIG_Q_SCAN = (128, 128, 64, 8, 3, 2)
#: Whether `merge_groups` keeps each group's KP best keys by a bitonic top-k rather than a sort of all of them,
#: for up to `MERGE_TOPK_MAX_QUERIES` queries (one query's groups are 33 splits, 1,024 keys sorted for 16).
MERGE_TOPK = True
#: Above it the groups are a few splits (48 keys at Q=1024) and the sort stays (H200, S4 W2, 1M x 768
#: Q=1024: dot / l2 / cosine 6.23 / 5.77 / 5.95 ms with the top-k, 6.05 / 5.80 / 5.93 with the sort).
MERGE_TOPK_MAX_QUERIES = 16


#: (BLOCK_Q, BLOCK_N, words a step, warps, programs per SM, stages) of the byte-code l1 scan, for at most 16 queries
#: and for more (`choose_l1_config` with ``codes``). In sm_90 code a 16 x 256 tile of 4 words a step issues
#: one load per 2.9 VABSDIFF4 and spills nothing; 8 words a step, or 32 x 128 tiles of 4, spill addresses.
#: On an H200 (S4 W2): 10M x 128 x 16 2.21 ms (x4 programs per SM 2.40, a 16 x 512 tile 2.51); 1M x 128 x 1024
#: 11.0 ms with 8 programs per SM, 12.5 with 4 (32 x 128 x 8: 18.2); more programs per SM also keep more
#: keys for the shortlist (x4 kept 144 per query, and 27 % of the queries failed their certificate).
L1_CODES_FEW = (16, 256, 4, 4, 2, 2)
L1_CODES_MANY = (16, 256, 4, 4, 16, 2)


def tuning() -> tuple[object, ...]:
    """The module-level choices above, as one value (part of a captured graph's key)."""
    return (SELECT_BY_INDEX, SMALL_Q_SCAN, BIG_Q_SCAN, MERGE_TOPK, MERGE_TOPK_MAX_QUERIES, FINISH_WIDE,
            L1_CODES_FEW, L1_CODES_MANY)  # fmt: skip


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Scan(NamedTuple):
    """A launch's packed keys (Q, splits, kp) float64, and how many rows each split covered."""

    keys: torch.Tensor
    rows_per_split: int

    def kept_per_query(self, n_rows: int) -> int:
        """How many keys of each query hold a real row (the others are -inf padding)."""
        kp = self.keys.shape[2]
        full, rest = divmod(n_rows, self.rows_per_split)
        return full * min(kp, self.rows_per_split) + min(kp, rest)


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Block sizes and launch shape of one `scan_topk_kernel` launch."""

    use_dot: bool
    block_q: int
    block_n: int
    block_d: int
    splits: int
    num_warps: int = 4
    num_stages: int = 2
    #: False only to time the scan without its selection (diagnostics; the output is then no top-k).
    select: bool = True
    #: Merge tiles by `select.offer_tile_by_index` (float32 steps) rather than `select.offer_tile`.
    by_index: bool = False


def _pow2(value: int) -> int:
    return 1 << max(0, (max(1, value) - 1).bit_length())


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return DEFAULT_SMS


def split_rows(n_rows: int, splits: int, block_n: int) -> tuple[int, int]:
    """(rows per split, splits): ``n_rows`` cut into at most ``splits`` runs of whole ``block_n`` blocks."""
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), block_n) * block_n
    return rows_per_split, triton.cdiv(n_rows, rows_per_split)


def choose_scan_config(
    n_queries: int, n_rows: int, dim: int, *, l1: bool, low: bool, device: torch.device
) -> ScanConfig:
    """Block sizes by Q: a streaming SIMT scan for small Q (and l1), a tensor-core tile kernel from Q = 16."""
    if interpreting():  # small blocks, several splits: every boundary is crossed on tiny inputs
        use_dot = not l1 and not low and n_queries >= 16
        block_q = 16 if use_dot else min(4, _pow2(n_queries))
        splits = max(1, min(3, triton.cdiv(n_rows, 16)))
        return ScanConfig(use_dot, block_q, 16, 16, splits, by_index=SELECT_BY_INDEX)
    use_dot = not l1
    # Block sizes picked by the sweep in benchmarks/gpu_report.py on an H200 (see benchmarks/results).
    if use_dot and n_queries >= 512:  # tensor-core tiles, wgmma on 128-query blocks
        block_q, block_n, block_d, warps, stages, per_sm = BIG_Q_SCAN
    elif use_dot and n_queries >= 16:
        block_q, block_n, block_d, warps, stages, per_sm = 64, 128, 64, 4, 3, 4
    elif use_dot:  # small Q: a 16-query tile keeps the loads wide; all SMs split the rows
        block_q = 16
        block_n, block_d, warps, stages, per_sm = SMALL_Q_SCAN
    elif l1 and low and n_queries == 1:  # bf16 rows, abs-difference sums over D tiles: bandwidth-bound
        block_q, block_n, block_d, warps, stages, per_sm = 1, 64, 128, 4, 3, 4
    elif l1 and low and n_queries <= 16:
        block_q, block_n, block_d, warps, stages, per_sm = _pow2(n_queries), 16, 64, 4, 3, 2
    else:
        block_q, block_n, warps, stages, per_sm = min(_pow2(n_queries), 32), 64, 4, 2, 4
        block_d = max(4, min(_pow2(dim), 8192 // (block_q * block_n)))
    block_d = min(block_d, max(16, _pow2(dim)))
    query_blocks = triton.cdiv(n_queries, block_q)
    splits = max(1, min(triton.cdiv(_sms(device) * per_sm, query_blocks), triton.cdiv(n_rows, block_n * 4)))
    return ScanConfig(use_dot, block_q, block_n, block_d, splits, warps, stages, by_index=SELECT_BY_INDEX)


def _check_matrix(x: torch.Tensor, name: str, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D tensor; got {type(x).__name__} {getattr(x, 'shape', '')}")
    if x.dtype != dtype:
        raise InvalidInputError(f"{name} must be {dtype}; got {x.dtype}")
    if x.device != device:
        raise InvalidInputError(f"{name} must be on {device}; got {x.device}")
    if (x.stride(1) != 1 and x.shape[1] > 1) or x.shape[0] == 0:
        raise InvalidInputError(f"{name} must be non-empty with contiguous rows; got strides {x.stride()}")


def scan_topk(
    queries: torch.Tensor,
    rows: torch.Tensor,
    extra: torch.Tensor | None,
    metric_code: int,
    kp: int,
    config: ScanConfig | None = None,
    tau: torch.Tensor | None = None,
) -> Scan:
    """Packed keys (Q, splits, kp) of each query's kp best rows per split (see `kernels.scan`).

    ``rows`` are bf16 (the reduced-precision pass; ``queries`` bf16, or float32 rounded to bf16 in the
    kernel) or float32 (``queries`` float32 too); ``extra``
    is the float32 per-row term of l2 (|x|²) and of the scaled dot (1/|x|). ``tau`` (Q,) float32, if
    given, is a floor per query: rows scoring at most it are left out (their slots hold -inf keys).
    """
    low = rows.dtype == torch.bfloat16
    query_dtype = torch.float32 if low and queries.dtype == torch.float32 else rows.dtype
    _check_matrix(queries, "queries", query_dtype, rows.device)
    _check_matrix(rows, "rows", torch.bfloat16 if low else torch.float32, queries.device)
    if queries.shape[1] != rows.shape[1]:
        raise InvalidInputError(f"queries have dimension {queries.shape[1]}, rows {rows.shape[1]}")
    if kp < 1 or kp > MAX_KP or kp & (kp - 1):
        raise InvalidInputError(f"kp must be a power of two in 1..{MAX_KP}; got {kp}")
    n_queries, dim = queries.shape
    n_rows = rows.shape[0]
    if extra is None:
        extra = torch.empty(1, dtype=torch.float32, device=rows.device)
    elif extra.dtype != torch.float32 or extra.shape != (n_rows,) or not extra.is_contiguous():
        raise InvalidInputError(f"extra must be contiguous float32 ({n_rows},); got {extra.dtype} {tuple(extra.shape)}")
    l1 = metric_code == 2
    if tau is not None and (tau.dtype != torch.float32 or tau.shape != (n_queries,) or tau.device != rows.device):
        raise InvalidInputError(
            f"tau must be float32 ({n_queries},) on {rows.device}; got {tau.dtype} {tuple(tau.shape)}"
        )
    if config is None:
        config = choose_scan_config(n_queries, n_rows, dim, l1=l1, low=low, device=rows.device)
    rows_per_split, splits = split_rows(n_rows, config.splits, config.block_n)
    out = torch.empty((n_queries, splits, kp), dtype=torch.float64, device=rows.device)
    grid = (triton.cdiv(n_queries, config.block_q), splits)
    # A padding query (zero) scores -|x|² in l2 and -Σ|x| in l1, not a constant as in dot: masked, it takes no steps.
    pads_queries = n_queries % config.block_q != 0 and metric_code in (1, 2)
    scan_topk_kernel[grid](
        queries, rows, extra, extra if tau is None else tau.contiguous(), out,
        n_queries, n_rows, dim, rows_per_split, splits,
        queries.stride(0), rows.stride(0),
        METRIC=metric_code, USE_DOT=config.use_dot, LOW=low,
        BLOCK_Q=config.block_q, BLOCK_N=config.block_n, BLOCK_D=config.block_d, KP=kp, SELECT=config.select,
        HAS_TAU=tau is not None, BY_INDEX=config.by_index, MASK_QUERIES=pads_queries,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return Scan(out, rows_per_split)


@dataclasses.dataclass(frozen=True)
class L1Config:
    """Block sizes and launch shape of one `l1_scan_kernel` launch."""

    block_q: int
    block_n: int
    splits: int
    num_warps: int = 4
    num_stages: int = 2
    #: Dimensions summed per loaded chunk (the (BLOCK_D, BLOCK_Q, BLOCK_N) differences live in registers).
    block_d: int = 4


def choose_l1_config(
    n_queries: int, n_rows: int, *, device: torch.device, half: bool = False, codes: bool = False
) -> L1Config:
    """A (BLOCK_Q, BLOCK_N) accumulator tile of about 32 values a thread; all SMs split the rows.

    ``half``: the float16 path, whose chunks are `L1_HALF_CHUNK` dimensions (its error bound assumes it).
    ``codes``: the byte-code path (`block_d` then counts int32 words of four codes).
    """
    if interpreting():  # small blocks, several splits and chunks: every boundary is crossed on tiny inputs
        block_d = L1_HALF_CHUNK if half else 4
        return L1Config(min(4, _pow2(n_queries)), 16, max(1, min(3, triton.cdiv(n_rows, 16))), block_d=block_d)
    # Picked by the sweep in benchmarks/l1_probe.py on an H200 (benchmarks/results/gpu_h200_l1.md).
    stages = 2
    if codes:
        block_q, block_n, block_d, warps, per_sm, stages = L1_CODES_FEW if n_queries <= 16 else L1_CODES_MANY
        block_q = min(block_q, max(2, _pow2(n_queries)))
    elif half:
        block_q, block_n, block_d, warps, per_sm = 32, 128, L1_HALF_CHUNK, 4, 8
    elif n_queries == 1:  # bandwidth-bound: wide (BLOCK_D, BLOCK_N) row tiles in flight
        block_q, block_n, block_d, warps, per_sm = 1, 512, 16, 4, 4
    elif n_queries <= 16:
        block_q, block_n, block_d, warps, per_sm = _pow2(n_queries), 256, 8, 4, 2
    else:
        block_q, block_n, block_d, warps, per_sm = 32, 128, 4, 4, 8
    query_blocks = triton.cdiv(n_queries, block_q)
    splits = max(1, min(triton.cdiv(_sms(device) * per_sm, query_blocks), triton.cdiv(n_rows, block_n * 4)))
    return L1Config(block_q, block_n, splits, warps, stages, block_d=block_d)


def l1_scan(
    queries_t: torch.Tensor,
    rows_t: torch.Tensor,
    kp: int,
    config: L1Config | None = None,
    tau: torch.Tensor | None = None,
) -> Scan:
    """Packed keys (Q, splits, kp) of each query's kp nearest rows in l1 per split (score: -l1).

    ``queries_t`` (D, Q) and ``rows_t`` (D, N) are column-major, both float32, both bf16 (or float32
    queries with bf16 rows) or both float16 (float16: each chunk of ``block_d`` dimensions is summed in
    float16, see `kernels.l1`), or both int32 words of byte codes, (W, Q) and (W, N) (keys: minus the
    code distance, `gpurag_torch.l1_codes`). ``tau``
    (Q,) float32, if given, is a floor per query on the score: rows scoring at most it are left out.
    """
    dtype = rows_t.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.int32):
        raise InvalidInputError(f"rows must be float32, bfloat16, float16 or int32 (byte codes); got {dtype}")
    # bf16 rows take float32 queries too (bf16-rounded ones give the same sums, without conversions in the loop).
    query_dtype = torch.float32 if dtype == torch.bfloat16 and queries_t.dtype == torch.float32 else dtype
    _check_matrix(queries_t, "queries_t", query_dtype, rows_t.device)
    _check_matrix(rows_t, "rows_t", dtype, queries_t.device)
    if queries_t.shape[0] != rows_t.shape[0]:
        raise InvalidInputError(f"queries have dimension {queries_t.shape[0]}, rows {rows_t.shape[0]}")
    if kp < 1 or kp > MAX_KP or kp & (kp - 1):
        raise InvalidInputError(f"kp must be a power of two in 1..{MAX_KP}; got {kp}")
    dim, n_queries = queries_t.shape
    n_rows = rows_t.shape[1]
    if config is not None and dtype == torch.float16 and config.block_d % L1_HALF_CHUNK:
        raise InvalidInputError(
            f"float16 steps cover a multiple of {L1_HALF_CHUNK} dimensions (its chunks); got block_d={config.block_d}"
        )
    if tau is not None and (tau.dtype != torch.float32 or tau.shape != (n_queries,) or tau.device != rows_t.device):
        raise InvalidInputError(
            f"tau must be float32 ({n_queries},) on {rows_t.device}; got {tau.dtype} {tuple(tau.shape)}"
        )
    codes = dtype == torch.int32
    if config is None:
        config = choose_l1_config(n_queries, n_rows, device=rows_t.device, half=dtype == torch.float16, codes=codes)
    rows_per_split, splits = split_rows(n_rows, config.splits, config.block_n)
    out = torch.empty((n_queries, splits, kp), dtype=torch.float64, device=rows_t.device)
    l1_scan_kernel[(triton.cdiv(n_queries, config.block_q), splits)](
        queries_t, rows_t, out if tau is None else tau.contiguous(), out,
        n_queries, n_rows, dim, rows_per_split, splits,
        queries_t.stride(0), rows_t.stride(0),
        BLOCK_Q=config.block_q, BLOCK_N=config.block_n, BLOCK_D=config.block_d, KP=kp, HAS_TAU=tau is not None,
        HALF=dtype == torch.float16, PACKED=not interpreting(), EVEN_D=dim % config.block_d == 0,
        CHUNK=L1_HALF_CHUNK, CODES=codes,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return Scan(out, rows_per_split)


def hamming_topk(codes: torch.Tensor, database_codes: torch.Tensor, kp: int) -> Scan:
    """Packed keys (Q, splits, kp) of each code's kp nearest database codes per split (score: -distance)."""
    for name, x in (("codes", codes), ("database_codes", database_codes)):
        _check_matrix(x, name, torch.uint8, codes.device)
    if codes.shape[1] != database_codes.shape[1]:
        raise InvalidInputError(f"codes have {codes.shape[1]} bytes, database codes {database_codes.shape[1]}")
    if kp < 1 or kp > MAX_KP or kp & (kp - 1):
        raise InvalidInputError(f"kp must be a power of two in 1..{MAX_KP}; got {kp}")
    words = triton.cdiv(codes.shape[1], 4)
    a, b = _as_words(codes, words), _as_words(database_codes, words)
    n_queries, n_rows = a.shape[0], b.shape[0]
    block_q = min(16, _pow2(n_queries))
    block_n = 16 if interpreting() else 64
    query_blocks = triton.cdiv(n_queries, block_q)
    splits = max(1, min(triton.cdiv(_sms(codes.device) * 4, query_blocks), triton.cdiv(n_rows, block_n * 4)))
    if interpreting():
        splits = max(1, min(3, triton.cdiv(n_rows, block_n)))
    rows_per_split, splits = split_rows(n_rows, splits, block_n)
    out = torch.empty((n_queries, splits, kp), dtype=torch.float64, device=codes.device)
    hamming_topk_kernel[(query_blocks, splits)](
        a, b, out, n_queries, n_rows, words, rows_per_split, splits, BLOCK_Q=block_q, BLOCK_N=block_n, KP=kp
    )
    return Scan(out, rows_per_split)


def _as_words(codes: torch.Tensor, words: int) -> torch.Tensor:
    padded = codes
    if codes.shape[1] != words * 4 or not codes.is_contiguous():
        padded = torch.zeros((codes.shape[0], words * 4), dtype=torch.uint8, device=codes.device)
        padded[:, : codes.shape[1]] = codes
    return padded.view(torch.int32)


def rescore(
    queries: torch.Tensor, rows: torch.Tensor, candidates: torch.Tensor, term: int, *, wide: bool = False
) -> torch.Tensor:
    """(Q, M) float32 sums over D of ``term`` (0: squared difference, 1: absolute difference, 2: product)
    between each query and the rows ``candidates`` (Q, M) of ``rows``, read in place. ``candidates``
    are integer rows, or the scan's float64 packed keys (rows past the end, padding, read the last row).
    ``wide``: programs of 4 candidates whose whole rows (up to 1,024 dimensions) load in one step: more
    programs, fewer dependent loads each (few queries, where the launch's latency is the cost)."""
    _check_matrix(queries, "queries", torch.float32, rows.device)
    _check_matrix(rows, "rows", torch.float32, queries.device)
    if candidates.ndim != 2 or candidates.shape[0] != queries.shape[0] or candidates.device != rows.device:
        raise InvalidInputError(f"candidates must be (Q, M) on {rows.device}; got {tuple(candidates.shape)}")
    n_queries, n_candidates = candidates.shape
    dim = queries.shape[1]
    candidates = candidates.contiguous()
    out = torch.empty((n_queries, n_candidates), dtype=torch.float32, device=rows.device)
    block_m = 8 if interpreting() else 32
    block_d = max(16, min(128, _pow2(dim)))
    if wide and not interpreting():
        block_m, block_d = 4, max(16, min(1024, _pow2(dim)))
    rescore_kernel[(n_queries, triton.cdiv(n_candidates, block_m))](
        queries, rows, candidates, out, n_candidates, rows.shape[0], dim, queries.stride(0), rows.stride(0),
        TERM=term, BLOCK_M=block_m, BLOCK_D=block_d, FROM_KEYS=candidates.dtype == torch.float64,
    )  # fmt: skip
    return out


def unit_queries(queries: torch.Tensor) -> torch.Tensor:
    """(Q, D) float32 ``queries`` each divided by its norm (zero rows stay zero), by one launch."""
    _check_matrix(queries, "queries", torch.float32, queries.device)
    n_queries, dim = queries.shape
    out = torch.empty((n_queries, dim), dtype=torch.float32, device=queries.device)
    block_d = 16 if interpreting() else max(16, min(_pow2(dim), 4096))
    unit_rows_kernel[(n_queries,)](queries, out, dim, queries.stride(0), BLOCK_D=block_d)
    return out


class Finished(NamedTuple):
    """`finish`'s answer: the k best (scores, int64 rows) per query, the certificate per query, and
    flags (2,) int32: queries not answered (certificate failed or overflow), queries that may overflow."""

    scores: torch.Tensor
    rows: torch.Tensor
    certified: torch.Tensor
    flags: torch.Tensor
    #: With ``packed``: one int32 buffer holding the scores' bits, the rows (int32) and the flags, in
    #: that order (``scores``, ``rows`` and ``flags`` are views of it).
    packed: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The dimension-only factors of the shortlist's certificate (see `gpurag_torch.exact`)."""

    rel: float
    floor: float
    cosine_error: float
    slack_scale: float
    safe_reach: float


def finish(
    queries: torch.Tensor,
    vectors: torch.Tensor,
    keys: torch.Tensor,
    cutoff_keys: torch.Tensor,
    max_norm: torch.Tensor,
    row_norms: torch.Tensor | None,
    k: int,
    metric_code: int,
    bounds: Bounds,
    split_below: int = 0,
    packed: bool = False,
) -> Finished:
    """Re-score the candidate ``keys`` (Q, M) in float32, keep the k best, certify them (`kernels.finish`).

    ``metric_code``: 0 dot, 1 l2, 2 l1, 3 cosine (``row_norms`` then the rows' norms). Below
    ``split_below`` queries the candidates are summed by `rescore` first (its grid is wider).
    ``packed``: the answer in one int32 buffer (`Finished.packed`; rows as int32), one copy to the host.
    """
    _check_matrix(queries, "queries", torch.float32, vectors.device)
    _check_matrix(vectors, "vectors", torch.float32, queries.device)
    n_queries, n_candidates = keys.shape
    if keys.dtype != torch.float64 or n_queries != queries.shape[0] or not 1 <= k <= n_candidates:
        raise InvalidInputError(f"keys must be float64 (Q, >= k); got {keys.dtype} {tuple(keys.shape)} for k={k}")
    device = vectors.device
    keys = keys.contiguous()
    if cutoff_keys.ndim not in (1, 2) or cutoff_keys.shape[0] != n_queries or cutoff_keys.dtype != torch.float64:
        raise InvalidInputError(
            f"cutoff_keys must be float64 ({n_queries},) or ({n_queries}, G); got {cutoff_keys.dtype} "
            f"{tuple(cutoff_keys.shape)}"
        )
    cutoff_keys = cutoff_keys.reshape(n_queries, -1).contiguous()
    m = _pow2(n_candidates)
    sums = None
    if n_queries < split_below:  # few queries: gather and sum the candidates over many programs first
        term = {0: 2, 1: 0, 2: 1, 3: 2}[metric_code]
        sums = rescore(queries, vectors, keys, term, wide=FINISH_WIDE)  # rows decoded from the keys in the kernel
    if sums is not None and FINISH_WIDE and not interpreting():  # only |q| is summed here: one wide step
        block_d = max(16, min(_pow2(queries.shape[1]), 4096))
    else:
        block_d = max(4, min(_pow2(queries.shape[1]), 8192 // m))
    once = n_queries == 1 and FINISH_WIDE  # one program writes the flags: no zeroed buffer
    allocate = torch.empty if once else torch.zeros
    buffer = None
    if packed:
        count = n_queries * k
        buffer = allocate(2 * count + 2, dtype=torch.int32, device=device)
        scores = buffer[:count].view(torch.float32).view(n_queries, k)
        rows = buffer[count : 2 * count].view(n_queries, k)
        flags = buffer[2 * count :]
    else:
        scores = torch.empty((n_queries, k), dtype=torch.float32, device=device)
        rows = torch.empty((n_queries, k), dtype=torch.int64, device=device)
        flags = allocate(2, dtype=torch.int32, device=device)
    certified = torch.empty(n_queries, dtype=torch.int8, device=device)
    norms = row_norms if row_norms is not None else max_norm
    finish_kernel[(n_queries,)](
        queries, vectors, keys, keys if sums is None else sums, cutoff_keys, max_norm, norms,
        scores, rows, certified, flags,
        n_candidates, vectors.shape[0], queries.shape[1], queries.stride(0), vectors.stride(0), k,
        bounds.rel, bounds.floor, bounds.cosine_error, bounds.slack_scale, bounds.safe_reach,
        METRIC=metric_code, M=m, BLOCK_D=block_d, HAS_SUMS=sums is not None, ROWS32=packed,
        n_cutoffs=cutoff_keys.shape[1], BLOCK_C=_pow2(cutoff_keys.shape[1]), FLAGS_ONCE=once,
        num_warps=4 if m <= 256 else 8,
    )  # fmt: skip
    return Finished(scores, rows, certified.view(torch.bool), flags, buffer)


def merged_groups(n_splits: int, groups: int) -> int:
    """How many groups `merge_groups` forms from ``n_splits`` splits asked for ``groups`` (whole splits per group)."""
    per_group = triton.cdiv(n_splits, max(1, min(groups, n_splits)))
    return int(triton.cdiv(n_splits, per_group))


def merge_groups(keys: torch.Tensor, groups: int, *, reduce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, groups * KP) keys: each group of consecutive splits' KP best, and the (Q,) cutoff key bounding
    every row left out (by a split or by its group); see `kernels.merge`. ``keys`` is a scan's (Q, S, KP).
    ``reduce=False``: the cutoff as each group's (Q, groups), whose largest bounds them all (`finish` takes it so)."""
    if keys.ndim != 3 or keys.dtype != torch.float64:
        raise InvalidInputError(f"keys must be float64 (Q, splits, KP); got {keys.dtype} {tuple(keys.shape)}")
    n_queries, n_splits, kp = keys.shape
    if kp & (kp - 1) or not 1 <= groups <= n_splits:
        raise InvalidInputError(f"groups must be in 1..{n_splits} and KP a power of two; got {groups}, {kp}")
    per_group = triton.cdiv(n_splits, groups)
    groups = triton.cdiv(n_splits, per_group)
    out = torch.empty((n_queries, groups * kp), dtype=torch.float64, device=keys.device)
    cutoff = torch.empty((n_queries, groups), dtype=torch.float64, device=keys.device)
    merge_groups_kernel[(n_queries, groups)](
        keys.contiguous(), out, cutoff, n_splits, per_group, groups, KP=kp, BLOCK=_pow2(per_group * kp),
        TOPK=MERGE_TOPK and n_queries <= MERGE_TOPK_MAX_QUERIES,
    )  # fmt: skip
    return out, cutoff.amax(dim=1) if reduce else cutoff


def decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 oriented scores, int64 rows) packed in float64 ``keys``."""
    bits = keys.view(torch.int64)
    return (bits >> 32).to(torch.int32).view(torch.float32), bits & 0xFFFFFFFF
