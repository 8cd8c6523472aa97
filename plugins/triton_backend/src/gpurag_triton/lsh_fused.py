"""An LSH search's device stages with every selection in Triton (`kernels.lsh_select`): no `torch.topk`, no sync.

`nearest_rows` finds each query's ``count`` nearest code rows in three launches (a sample's distance
histogram, one pass appending the rows within the limit read off it, a radix select of the nearest
appended keys); `rerank_best` scores candidate rows exactly and returns the best k in two (blocks'
best keys, then a merge). A captured LSH graph (`lsh_graphs`) holds both, so a small search is one
graph of about six kernels.
"""

from __future__ import annotations

import math

import torch
import triton

from gpurag.errors import InvalidInputError
from gpurag.metrics import Metric, TopK
from gpurag_triton import candidates, launch
from gpurag_triton.kernels.hamming_select import hamming_near_kernel, has_popc
from gpurag_triton.kernels.lsh_select import (
    DIGIT_BITS,
    best_merge_kernel,
    hamming_sample_histogram_kernel,
    rescore_best_kernel,
    select_nearest_keys_kernel,
)

#: Whether the captured LSH graphs use these stages (off: `candidates` and the backend's `rerank`), and up to how
#: many queries a search: measured on the H200 (S4 W2b, 10M x 128 bits, 3,000 candidates) one query is 25 % quicker
#: this way (4,037 against 3,224 q/s), 16 and 1,024 queries slower (1.77x against 2.12x exact at 16; 0.29x against
#: 0.37x at 1,024: the sample's histogram of queries x distances costs more than torch's selections there).
FUSED = True
MAX_QUERIES = 1
#: Why these kernels could not be built here, once they could not (then they are not asked again).
BROKEN: list[str] = []
#: Whether `nearest_rows` (rather than the counting passes) picks the candidates, and from how many queries on.
SAMPLED = True
SAMPLED_MIN_QUERIES = 1
#: Largest k `rerank_best` selects (each block keeps the next power of two of k keys).
MAX_K = 64
#: Keys one step of the select kernel reads, and its warps: a query's appended keys (about 2 x count) in one
#: or a few steps (a smaller block under the interpreter crosses more chunk edges).
SELECT_BLOCK = 8192
SELECT_WARPS = 16
#: Most (query x distance) bins one sample-histogram program counts at once.
SAMPLE_BINS = 4096
#: The near pass's rows per tile and warps (None: `candidates.TILE_ELEMENTS` / 2 elements a tile, Triton's warps),
#: and whether a tile skips its appends when no row is near (one tile-wide max; off: predicated appends only).
NEAR_BLOCK_N: int | None = None
NEAR_WARPS: int | None = None
NEAR_CHECK_TILE = True
#: Near-pass programs per SM over all query blocks (None: `candidates._splits`' four).
NEAR_PROGRAMS_PER_SM: int | None = None


def usable(k: int, n_queries: int) -> bool:
    """Whether a search of ``n_queries`` for ``k`` neighbours takes these stages: on, built here, k within `MAX_K`
    and the queries within `MAX_QUERIES`."""
    return FUSED and not BROKEN and k <= MAX_K and n_queries <= MAX_QUERIES


def build_errors() -> tuple[type[Exception], ...]:
    """The errors that mean a kernel cannot be built on this GPU and Triton (a fallback answers instead)."""
    from triton.runtime.errors import OutOfResources

    return (triton.CompilationError, OutOfResources)


def nearest_rows(codes: torch.Tensor, database_codes: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (Q, count) int64, failed (Q,) int32): each query's ``count`` nearest code rows, ties at the cut to
    the lower rows (the rows `candidates.nearest_codes` finds), in no promised order; no host sync.

    The limit is the distance of the sample's (LIMIT_MARGIN x count / step)-th nearest row (every
    row where `candidates.sample_step` gives no step, the count-th). ``failed[q]`` is 1 where query
    q's rows within its limit were fewer than ``count`` or more than the room for them: its rows are
    then all 0 and the caller must ask the counting passes.
    """
    n_queries, n_rows = candidates.check_codes(codes, database_codes, count)
    device = codes.device
    step = candidates.sample_step(n_rows, count) or 1
    words = triton.cdiv(codes.shape[1], 4)
    a, b = launch._as_words(codes, words), launch._as_words(database_codes, words)
    n_bits = codes.shape[1] * 8
    interpreting = launch.interpreting()
    use_popc = not interpreting and has_popc() and not candidates._POPC_FAILED
    bins = launch._pow2(n_bits + 2)
    scratch = torch.zeros(n_queries * (bins + 1), dtype=torch.int32, device=device)  # one memset
    hist, counter = scratch[: n_queries * bins].view(n_queries, bins), scratch[n_queries * bins :]
    n_sample = triton.cdiv(n_rows, step)
    sample_q = max(1, min(16, launch._pow2(n_queries), SAMPLE_BINS // bins))
    sample_n = 16 if interpreting else max(16, min(1024, candidates.TILE_ELEMENTS // (2 * sample_q)))
    hamming_sample_histogram_kernel[(triton.cdiv(n_queries, sample_q), triton.cdiv(n_sample, sample_n))](
        a, b, hist, n_queries, n_sample, words, step, BLOCK_Q=sample_q, BLOCK_N=sample_n, BINS=bins,
        USE_POPC=use_popc,
    )  # fmt: skip
    margin = candidates.LIMIT_MARGIN if step > 1 else 1.0
    rank = max(1, min(n_sample, math.ceil(margin * count / step)))
    capacity = max(count, int(candidates.CAPACITY_FACTOR * count))
    wide = n_rows >= candidates.NARROW_KEY_ROWS
    keys = torch.empty((n_queries, capacity), dtype=torch.int64 if wide else torch.int32, device=device)
    block_q = min(16, launch._pow2(n_queries))
    query_blocks = triton.cdiv(n_queries, block_q)
    block_n = 16 if interpreting else max(16, min(1024, candidates.TILE_ELEMENTS // (2 * block_q)))
    if NEAR_BLOCK_N is not None and not interpreting:
        block_n = NEAR_BLOCK_N
    tuning = {} if NEAR_WARPS is None else {"num_warps": NEAR_WARPS}
    splits = candidates._splits(device, query_blocks, n_rows, block_n, interpreting)
    if NEAR_PROGRAMS_PER_SM is not None and not interpreting:
        splits = max(1, min(triton.cdiv(launch._sms(device) * NEAR_PROGRAMS_PER_SM, query_blocks),
                            triton.cdiv(n_rows, block_n * 4)))  # fmt: skip
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), block_n) * block_n
    splits = triton.cdiv(n_rows, rows_per_split)
    hamming_near_kernel[(query_blocks, splits)](
        a, b, hist, counter, keys, n_queries, n_rows, words, rows_per_split, capacity, rank,
        BLOCK_Q=block_q, BLOCK_N=block_n, USE_POPC=use_popc, WIDE=wide, BINS=bins, LIMIT_FROM_HISTOGRAM=True,
        CHECK_TILE=NEAR_CHECK_TILE, **tuning,
    )  # fmt: skip
    rows = torch.empty((n_queries, count), dtype=torch.int64, device=device)
    failed = torch.empty(n_queries, dtype=torch.int32, device=device)
    key_bits = (32 + max(1, n_bits + 1).bit_length()) if wide else 31
    select_nearest_keys_kernel[(n_queries,)](
        keys, counter, rows, failed, count, capacity,
        PASSES=triton.cdiv(key_bits, DIGIT_BITS), ROW_BITS=32 if wide else 24,
        BLOCK=64 if interpreting else SELECT_BLOCK, num_warps=4 if interpreting else SELECT_WARPS,
    )  # fmt: skip
    return rows, failed


def rerank_best(
    queries: torch.Tensor,
    vectors: torch.Tensor,
    rows: torch.Tensor,
    k: int,
    metric: Metric,
    row_norms: torch.Tensor | None = None,
) -> TopK:
    """The ``k`` best of each query's candidate ``rows`` (Q, M) of ``vectors``, scored exactly in float32 as
    `direct_scores` scores them, best first (equal scores: by row, the order packed keys give).

    ``row_norms`` (cosine only): the rows' float32 norms. k must be at most `MAX_K` and ``M``.
    """
    launch._check_matrix(queries, "queries", torch.float32, vectors.device)
    launch._check_matrix(vectors, "vectors", torch.float32, queries.device)
    if rows.ndim != 2 or rows.shape[0] != queries.shape[0] or rows.device != vectors.device:
        raise InvalidInputError(f"rows must be (Q, M) on {vectors.device}; got {tuple(rows.shape)}")
    n_queries, n_candidates = rows.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(MAX_K, n_candidates):
        raise InvalidInputError(f"k must be an integer in 1..{min(MAX_K, n_candidates)}; got {k!r}")
    if metric is Metric.COSINE and row_norms is None:
        raise InvalidInputError("row_norms must be given for the cosine metric; got None")
    dim = queries.shape[1]
    kp = launch._pow2(k)
    interpreting = launch.interpreting()
    block_m = max(kp, 16 if interpreting else (64 if n_candidates <= 4096 else 128))
    n_blocks = triton.cdiv(n_candidates, block_m)
    partial = torch.empty((n_queries, n_blocks, kp), dtype=torch.float64, device=vectors.device)
    cosine = metric is Metric.COSINE
    norms = row_norms if row_norms is not None else vectors
    term = {Metric.L2: 0, Metric.L1: 1, Metric.DOT: 2, Metric.COSINE: 2}[metric]
    lower = not metric.higher_is_better
    rescore_best_kernel[(n_queries, n_blocks)](
        queries, vectors, rows.contiguous(), norms, partial, n_candidates, vectors.shape[0], n_blocks, dim,
        queries.stride(0), vectors.stride(0), TERM=term, COSINE=cosine, LOWER_IS_BETTER=lower,
        BLOCK_M=block_m, BLOCK_D=max(16, min(128, launch._pow2(dim))), KP=kp, num_warps=8 if block_m > 64 else 4,
    )  # fmt: skip
    scores = torch.empty((n_queries, k), dtype=torch.float32, device=vectors.device)
    best = torch.empty((n_queries, k), dtype=torch.int64, device=vectors.device)
    best_merge_kernel[(n_queries,)](
        partial, scores, best, n_blocks * kp, k, LOWER_IS_BETTER=lower, BLOCK=launch._pow2(n_blocks * kp)
    )
    return TopK(scores, best)
