"""The ``count`` nearest database codes of each query code by counting (see `kernels.hamming_select`), any count.

Two kernel launches and a few tensor operations between them, all on the device: no host sync,
no per-query loop, whatever Q, N and ``count`` are. Where the candidates are few against the rows,
`sampled_nearest` finds the same rows in one pass over the codes after a pass over a sample.
"""

from __future__ import annotations

import math

import torch
import triton

from gpurag.errors import InvalidInputError
from gpurag.metrics import TopK
from gpurag_triton import launch
from gpurag_triton.kernels.hamming_select import (
    cut_offsets_kernel,
    hamming_collect_kernel,
    hamming_histogram_kernel,
    hamming_near_kernel,
    hamming_sample_kernel,
    has_popc,
)

#: Most (query, row, word) elements one tile holds (registers per program).
TILE_ELEMENTS = 8192
#: Bytes of one stored distance, and how many fewer bytes than the codes storing must read to be chosen.
STORED_BYTES_PER_DISTANCE = 2
STORE_RATIO = 2
#: Most (split, bin) counts the cut kernel reads at once.
CUT_ELEMENTS = 4096
#: Most bins one histogram pass program counts at once (queries x distances), where one histogram counts a tile.
HISTOGRAM_BINS = 1024
#: Whether a query tile's distances are counted by one histogram per query (the code tile shared); off: by one
#: histogram of queries x bins (slower where queries are many: the layout measured on the H200 in W2).
HISTOGRAM_PER_QUERY = True
#: Rows per tile in the per-query layout.
PER_QUERY_BLOCK_N = 256
#: Candidates are counted up to half the bits only while they are fewer than 1 / FAR_CUT_SHARE of the rows.
FAR_CUT_SHARE = 64
#: The sampled path (`sampled_nearest`): taken where the rows are at least this many times the candidates,
SAMPLED_ROWS_PER_CANDIDATE = 64
#: with a sample of every step-th row, the step a power of two chosen so that about this many sampled rows lie
#: within the cut, and at least SAMPLED_MIN_STEP (fewer candidates: the counting passes).
SAMPLED_UNDER_CUT = 32
SAMPLED_MIN_STEP = 4
SAMPLED_MAX_STEP = 1024
#: The limit keeps about this many times the candidates by the sample's estimate; room for CAPACITY_FACTOR times.
LIMIT_MARGIN: float = 2
CAPACITY_FACTOR: float = 8
#: Keys are int32 (distance << 24 | row: fewer radix passes to pick from) below this many rows, else int64.
NARROW_KEY_ROWS = 1 << 24
#: Whether `nearest_codes` may take the sampled path (off: always the counting passes), and from how many
#: queries: one query's counting passes are quicker (H200, 10M x 128 bits: fewer kernels, less launch latency).
SAMPLED = True
SAMPLED_MIN_QUERIES = 2
#: Set once the per-query histogram layout failed to compile; the one-histogram layout is used from then on.
_PER_QUERY_FAILED: list[bool] = []
#: Set once libdevice's popc failed to compile here; the bit-counting fallback is used from then on.
_POPC_FAILED: list[bool] = []


def nearest_codes(
    codes: torch.Tensor,
    database_codes: torch.Tensor,
    count: int,
    *,
    ordered: bool = True,
    store_distances: bool | None = None,
    sampled: bool | None = None,
) -> TopK:
    """(int32 distances, int64 rows) (Q, count): each query's ``count`` nearest codes.

    Where `sample_step` allows (and ``sampled`` is not False) `sampled_nearest` answers, nearest
    first, unless its limit missed for some query (checked with one sync): then the counting passes.

    Unordered, where the cut lies at about half the bits or farther (codes as far as random ones), the
    rows kept from there on are the first in row order rather than the nearest.
    ``store_distances``: the first pass writes the (Q, N) distances as int16 and the second reads
    them instead of the codes; None chooses it where that reads fewer bytes (few queries, long codes).

    Ties at the cut go to the lower rows. With ``ordered`` the rows come nearest first (ties by
    row), as `DistanceBackend.hamming_topk` promises; without, rows nearer than the cut come first
    in row order, then the tied rows (the order a re-ranking does not need).
    """
    n_queries, n_rows = check_codes(codes, database_codes, count)
    if sampled is not False and takes_sampled(n_queries, n_rows, count):
        top, failed = sampled_nearest(codes, database_codes, count, ordered=ordered)
        if not bool(failed.item()):  # one sync: the sample's limit held every query's candidates
            return top
    words = triton.cdiv(codes.shape[1], 4)
    a, b = launch._as_words(codes, words), launch._as_words(database_codes, words)
    n_bits = codes.shape[1] * 8
    # Counted distances: all of them where the order must be exact or the cut may lie far out; else
    # those under about half the bits, in a power-of-two of bins (any farther share the last counted
    # bin, their order among themselves then being by row).
    if ordered or count * FAR_CUT_SHARE > n_rows or n_bits < 8:
        clip = n_bits
        bins = launch._pow2(clip + 2)  # distances 0..clip, and one bin for rows past the end
    else:
        bins = launch._pow2(n_bits // 2)
        clip = bins - 2
    words_p2 = launch._pow2(words)
    interpreting = launch.interpreting()
    block_q = min(16, launch._pow2(n_queries))
    block_n = max(16, min(1024, TILE_ELEMENTS // (block_q * words_p2)))
    per_query = HISTOGRAM_PER_QUERY and block_q > 1 and not _PER_QUERY_FAILED
    if per_query:  # one code tile for the query tile, one histogram of `bins` per query row
        hist_block_q = block_q
        hist_block_n = max(16, min(PER_QUERY_BLOCK_N, TILE_ELEMENTS // words_p2))
    else:
        hist_block_q = max(1, min(block_q, HISTOGRAM_BINS // bins))  # tl.histogram's cost grows with its bins
        hist_block_n = max(16, min(1024, TILE_ELEMENTS // (hist_block_q * words_p2)))
    if interpreting:
        block_n = hist_block_n = 16
    query_blocks = triton.cdiv(n_queries, block_q)
    splits = max(1, min(triton.cdiv(launch._sms(codes.device) * 4, query_blocks), triton.cdiv(n_rows, block_n * 4)))
    if interpreting:
        splits = max(1, min(3, triton.cdiv(n_rows, block_n)))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), block_n) * block_n
    splits = triton.cdiv(n_rows, rows_per_split)
    use_popc = not interpreting and has_popc() and not _POPC_FAILED
    grid = (query_blocks, splits)
    hist_grid = (triton.cdiv(n_queries, hist_block_q), splits)
    hist = torch.empty((n_queries, splits, bins), dtype=torch.int32, device=codes.device)
    store = (
        n_queries * STORED_BYTES_PER_DISTANCE * STORE_RATIO <= codes.shape[1]
        if store_distances is None
        else store_distances
    )
    stored = torch.empty((n_queries, n_rows) if store else (1, 1), dtype=torch.int16, device=codes.device)
    try:
        hamming_histogram_kernel[hist_grid](
            a, b, hist, stored, n_queries, n_rows, words, rows_per_split, splits, clip,
            BLOCK_Q=hist_block_q, BLOCK_N=hist_block_n, WORDS_P2=words_p2, BINS=bins, USE_POPC=use_popc,
            STORE_DIST=store, PER_QUERY=per_query,
        )  # fmt: skip
    except triton.CompilationError:
        if per_query:  # this Triton cannot build the per-query layout: count a tile in one histogram instead
            _PER_QUERY_FAILED.append(True)
        elif use_popc:  # this Triton cannot lower libdevice's popc: count bits in registers instead
            _POPC_FAILED.append(True)
        else:
            raise
        return nearest_codes(codes, database_codes, count, ordered=ordered, store_distances=store_distances)
    threshold, below_start, tie_start = cut_and_offsets_fused(hist, count)
    rows = torch.empty((n_queries, count), dtype=torch.int64, device=codes.device)
    distances = torch.empty((n_queries, count), dtype=torch.int32, device=codes.device)
    hamming_collect_kernel[grid](
        a, b, stored, threshold, below_start, tie_start, rows, distances,
        n_queries, n_rows, words, rows_per_split, splits, count, clip,
        BLOCK_Q=block_q, BLOCK_N=block_n, WORDS_P2=words_p2, USE_POPC=use_popc, LOAD_DIST=store,
    )  # fmt: skip
    if ordered:
        order = torch.sort(distances, dim=1, stable=True).indices
        return TopK(torch.gather(distances, 1, order), torch.gather(rows, 1, order))
    return TopK(distances, rows)


def check_codes(codes: torch.Tensor, database_codes: torch.Tensor, count: int) -> tuple[int, int]:
    """(queries, rows) of a nearest-codes search, once its inputs are checked: two uint8 matrices of one code
    width on one device, and ``count`` an integer in 1..rows."""
    for name, x in (("codes", codes), ("database_codes", database_codes)):
        launch._check_matrix(x, name, torch.uint8, codes.device)
    if codes.shape[1] != database_codes.shape[1]:
        raise InvalidInputError(f"codes have {codes.shape[1]} bytes, database codes {database_codes.shape[1]}")
    n_queries, n_rows = codes.shape[0], database_codes.shape[0]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= n_rows:
        raise InvalidInputError(f"count must be an integer in 1..{n_rows} (the database codes); got {count!r}")
    return n_queries, n_rows


def takes_sampled(n_queries: int, n_rows: int, count: int) -> bool:
    """Whether `nearest_codes` answers ``n_queries``' ``count`` candidates among ``n_rows`` by `sampled_nearest`."""
    return SAMPLED and n_queries >= SAMPLED_MIN_QUERIES and sample_step(n_rows, count) > 0


def sample_step(n_rows: int, count: int) -> int:
    """The sampled path's row step for ``count`` candidates among ``n_rows`` rows, or 0 where it is not taken."""
    if count * SAMPLED_ROWS_PER_CANDIDATE > n_rows:
        return 0
    step = min(SAMPLED_MAX_STEP, 1 << max(0, (count // SAMPLED_UNDER_CUT).bit_length() - 1))
    return step if step >= SAMPLED_MIN_STEP else 0


def sampled_nearest(
    codes: torch.Tensor, database_codes: torch.Tensor, count: int, *, ordered: bool = True
) -> tuple[TopK, torch.Tensor]:
    """(each query's ``count`` nearest codes, ties at the cut to the lower rows, as `nearest_codes`;
    ``failed``, a 0-d bool tensor) by a sample, a limit and one pass; no host sync (a CUDA graph may hold it).
    With ``ordered`` nearest first (ties by row); without, in no promised order (the same rows).

    The distances to every `sample_step`-th row set each query's limit, the distance within which the
    sample puts about LIMIT_MARGIN x ``count`` rows; one pass appends every row within the limit
    (up to CAPACITY_FACTOR x ``count``); the ``count`` smallest (distance, row) keys are the answer.
    ``failed`` is True where a query's rows within its limit were fewer than ``count`` or more than
    the room: that answer is then not the nearest rows (its rows are still in range) and the caller
    must ask the counting passes (`nearest_codes` with ``sampled=False``).
    """
    n_queries, n_rows = codes.shape[0], database_codes.shape[0]
    step = sample_step(n_rows, count) or 1
    words = triton.cdiv(codes.shape[1], 4)
    a, b = launch._as_words(codes, words), launch._as_words(database_codes, words)
    n_bits = codes.shape[1] * 8
    interpreting = launch.interpreting()
    use_popc = not interpreting and has_popc() and not _POPC_FAILED
    block_q = min(16, launch._pow2(n_queries))
    query_blocks = triton.cdiv(n_queries, block_q)
    device = codes.device
    # The limit: the distance of the sample's (LIMIT_MARGIN x count / step)-th nearest row.
    n_sample = triton.cdiv(n_rows, step)
    block_n = 16 if interpreting else max(16, min(1024, TILE_ELEMENTS // (2 * block_q)))  # 2-D tiles, any width
    sampled = torch.empty((n_queries, n_sample), dtype=torch.int16, device=device)
    try:
        hamming_sample_kernel[(query_blocks, triton.cdiv(n_sample, block_n))](
            a, b, sampled, n_queries, n_sample, words, step, BLOCK_Q=block_q, BLOCK_N=block_n, USE_POPC=use_popc,
        )  # fmt: skip
    except triton.CompilationError:
        if not use_popc:
            raise
        _POPC_FAILED.append(True)  # this Triton cannot lower libdevice's popc: count bits in registers instead
        return sampled_nearest(codes, database_codes, count, ordered=ordered)
    rank = max(1, min(n_sample, math.ceil(LIMIT_MARGIN * count / step)))
    # torch.kthvalue's one block per query took 0.33 ms at 156k sampled rows on the H200; topk's radix select is quick
    limit = torch.topk(sampled, rank, dim=1, largest=False, sorted=False).values.amax(dim=1).to(torch.int32)
    # One pass: every row within the limit appended as its key.
    capacity = max(count, int(CAPACITY_FACTOR * count))
    splits = _splits(device, query_blocks, n_rows, block_n, interpreting)
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), block_n) * block_n
    splits = triton.cdiv(n_rows, rows_per_split)
    wide = n_rows >= NARROW_KEY_ROWS
    if wide:  # (distance << 32 | row); the empty key lies past every key, its row (0) in range
        shift, keys = 32, torch.full((n_queries, capacity), (n_bits + 1) << 32, dtype=torch.int64, device=device)
    else:  # (distance << 24 | row) in int32, the limit at most 127: fewer rows than count within it fail the answer
        shift, keys = 24, torch.full((n_queries, capacity), 2**31 - 1, dtype=torch.int32, device=device)
        limit = limit.clamp(max=127)
    counter = torch.zeros(n_queries, dtype=torch.int32, device=device)
    hamming_near_kernel[(query_blocks, splits)](
        a, b, limit, counter, keys, n_queries, n_rows, words, rows_per_split, capacity, 0,
        BLOCK_Q=block_q, BLOCK_N=block_n, USE_POPC=use_popc, WIDE=wide,
    )  # fmt: skip
    nearest = torch.topk(keys, count, dim=1, largest=False, sorted=ordered).values
    failed = (counter < count) | (counter > capacity)
    rows = (nearest & ((1 << shift) - 1)).long().clamp_(max=n_rows - 1)  # empty keys' rows kept in range
    return TopK((nearest >> shift).to(torch.int32), rows), failed.any()


def _splits(device: torch.device, query_blocks: int, n_rows: int, block_n: int, interpreting: bool) -> int:
    """How many programs share a query block's rows: about four per SM over all query blocks."""
    if interpreting:
        return max(1, min(3, -(-n_rows // block_n)))
    return max(1, min(-(-launch._sms(device) * 4 // query_blocks), -(-n_rows // (block_n * 4))))


def cut_and_offsets_fused(hist: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`cut_and_offsets` in one kernel launch (a program per query)."""
    n_queries, n_splits, bins = hist.shape
    threshold = torch.empty(n_queries, dtype=torch.int32, device=hist.device)
    below_start = torch.empty((n_queries, n_splits), dtype=torch.int32, device=hist.device)
    tie_start = torch.empty((n_queries, n_splits), dtype=torch.int32, device=hist.device)
    block_s = max(1, min(launch._pow2(n_splits), CUT_ELEMENTS // bins))
    cut_offsets_kernel[(n_queries,)](
        hist, threshold, below_start, tie_start, n_splits, count, BINS=bins, BLOCK_S=block_s
    )
    return threshold, below_start, tie_start


def cut_and_offsets(hist: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From per-split counts (Q, S, bins): the cut distance t (Q,) and where each split writes (Q, S) twice.

    t is the smallest distance at which the running count reaches ``count``; a split's rows below
    t start after the earlier splits' rows below t; its rows at t after every row below t and the
    earlier splits' rows at t. All int32, on the device.
    """
    total = hist.sum(dim=1, dtype=torch.int64)  # (Q, bins)
    threshold = (total.cumsum(dim=1) < count).sum(dim=1)  # (Q,)
    per_split_below = hist.cumsum(dim=2, dtype=torch.int64) - hist  # rows strictly below each bin
    index = threshold[:, None, None].expand(-1, hist.shape[1], 1)
    below = torch.gather(per_split_below, 2, index)[:, :, 0]  # (Q, S)
    tie = torch.gather(hist, 2, index)[:, :, 0].to(torch.int64)
    below_start = below.cumsum(dim=1) - below
    tie_start = below.sum(dim=1, keepdim=True) + tie.cumsum(dim=1) - tie
    return threshold.to(torch.int32), below_start.to(torch.int32), tie_start.to(torch.int32)
