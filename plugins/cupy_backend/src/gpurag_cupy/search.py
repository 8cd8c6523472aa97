"""Exact top-k with CuPy: float32 score tiles (cuBLAS, or the l1 and Hamming kernels), radix selection,
then the selected rows scored again directly (float64 sums) and ordered best first.

Tiles rank rows by an *oriented* score, larger is better: dot ``q·x``; cosine ``(q/|q|)·x / |x|``;
l2 ``2 q·x - |x|²`` (the true l2 is ``|q|² - o``: screened with, never reported); l1 ``-Σ|q - x|``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import cupy
import numpy as np

from gpurag.metrics import Metric
from gpurag_cupy.database import INV_NORMS, NEG_SQ_NORMS, sum_of_squares
from gpurag_cupy.gemm import scores_into
from gpurag_cupy.kernels import VEC4_WIDTHS, kernel
from gpurag_cupy.select import BLOCK, Candidates, multiprocessors, pointer

#: Metric codes of the kernels in ``scores.cu``.
METRIC_CODES = {Metric.DOT: 0, Metric.L2: 1, Metric.COSINE: 2, Metric.L1: 3}
#: Per query group of the streaming (warp per row) kernels, the register widths (elements per lane) they
#: are compiled for.
REGISTER_WIDTHS = {1: (4, 8, 16, 24, 32), 8: (4, 8), 16: (4, 8)}
#: Most queries whose dot products the streaming kernel computes instead of cuBLAS (0: cuBLAS always).
STREAM_DOT_MAX_QUERIES = 0
#: Whether one query's dot products come from ``dot_one_query_vec4`` (float4 loads) instead of cuBLAS.
VEC4_ONE_QUERY = False
#: Largest k whose final scores are ordered by one block per query (``rescore_sorted``).
SORTED_MAX = 1024
#: Most queries one kernel grid covers (CUDA's limit on gridDim.y).
MAX_GRID_QUERIES = 65535
#: Most queries the few-query path serves (0: never); see `few_query_topk`.
FEW_MAX_QUERIES = 16
#: Rows of one chunk of the few-query path (``CHUNK_KEYS`` in ``kernels/small.cu``).
CHUNK_KEYS = 4096
#: Most candidates (chunks times k) per query the few-query path's merge block selects from.
FEW_MAX_CANDIDATES = 65536
#: Whether a captured one-query search scores by ``dot_one_query_vec4`` (else the streaming kernel).
GRAPH_VEC4 = True


class LibraryCallError(RuntimeError):
    """A search step would call cuBLAS, which CuPy refuses while a stream is captured into a graph."""


def kernel_scored(n_queries: int, dim: int, metric: Metric) -> bool:
    """Whether every score pass of a few-query search runs on the backend's own kernels (no cuBLAS): the
    condition for capturing it into a graph."""
    if metric is Metric.L1:
        return True
    if GRAPH_VEC4 and vec4_width(n_queries, dim) is not None:
        return True
    return n_queries <= FEW_MAX_QUERIES and register_width(n_queries, dim) is not None


def tiles(n_rows: int, tile_rows: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each tile of rows."""
    for start in range(0, n_rows, tile_rows):
        yield start, min(n_rows, start + tile_rows)


def unit_rows(queries: cupy.ndarray) -> cupy.ndarray:
    """Each query divided by its norm (a zero query stays zero)."""
    norms = cupy.sqrt(sum_of_squares(queries))
    return queries / cupy.where(norms > 0, norms, 1.0)[:, None]


def query_group(n_queries: int) -> int:
    """Queries one warp of the streaming kernels scores at once."""
    return 1 if n_queries == 1 else 8 if n_queries <= 8 else 16


def register_width(n_queries: int, dim: int) -> int | None:
    """Elements per lane the streaming kernels hold a query of ``dim`` in; None where no instance fits."""
    lanes_share = -(-dim // 32)  # elements of a row each lane reads
    held = [w for w in REGISTER_WIDTHS[query_group(n_queries)] if w >= lanes_share]
    return held[0] if held else None


def _streaming_launch(n_queries: int, n_rows: int, dim: int) -> tuple[int, int, int, int | None]:
    """(query group, groups, blocks, register width or None) of a one-warp-per-row kernel."""
    group = query_group(n_queries)
    sms = multiprocessors(cupy.cuda.Device().id)
    groups = -(-n_queries // group)
    blocks = max(1, min(-(-n_rows // (BLOCK // 32)), -(-8 * sms // groups)))
    return group, groups, blocks, register_width(n_queries, dim)


def l1_tile(queries: cupy.ndarray, rows: cupy.ndarray, out: cupy.ndarray, ld: int) -> None:
    """``out[q, j] = -Σ|queries[q] - rows[j]|`` (row stride ``ld``)."""
    n_queries, dim = queries.shape
    group, groups, blocks, width = _streaming_launch(n_queries, rows.shape[0], dim)
    name = f"l1_scores_registers<{group}, {width}>" if width else f"l1_scores<{group}>"
    kernel(name)(
        (blocks, groups),
        (BLOCK,),
        (queries, np.int32(n_queries), rows, np.int64(rows.shape[0]), np.int32(dim), out, np.int64(ld)),
    )


def vec4_width(n_queries: int, dim: int) -> int | None:
    """The float4s per lane `dot_one_query_vec4` holds a query of ``dim`` in; None where it does not apply."""
    held = [w for w in VEC4_WIDTHS if 32 * w >= dim // 4]
    return held[0] if n_queries == 1 and dim % 4 == 0 and held else None


def dot_one_query_vec4(query: cupy.ndarray, rows: cupy.ndarray, out: cupy.ndarray, alpha: float) -> bool:
    """``out[0, j] = alpha * query · rows[j]`` in 16-byte loads; False where it does not apply."""
    width = vec4_width(query.shape[0], query.shape[1])
    if width is None or any(a.data.ptr % 16 for a in (query, rows)):
        return False
    quads = query.shape[1] // 4
    n = rows.shape[0]
    blocks = max(1, min(-(-n // (BLOCK // 32)), 8 * multiprocessors(cupy.cuda.Device().id)))
    kernel(f"dot_one_query_vec4<{width}>")(
        (blocks,), (BLOCK,), (query, rows, np.int64(n), np.int32(quads), np.float32(alpha), out)
    )
    return True


def dot_tile(
    queries: cupy.ndarray, rows: cupy.ndarray, out: cupy.ndarray, ld: int, alpha: float, *, kernels_only: bool = False
) -> bool:
    """``out[q, j] = alpha * queries[q] · rows[j]`` by a streaming kernel; False where none applies.

    ``kernels_only`` (a search being captured into a graph, where cuBLAS cannot be called): the
    float4 kernel for one query where `GRAPH_VEC4` holds, else the streaming kernel, whatever the
    switches of the uncaptured path say."""
    if (VEC4_ONE_QUERY or (kernels_only and GRAPH_VEC4)) and dot_one_query_vec4(queries, rows, out, alpha):
        return True
    n_queries, dim = queries.shape
    if n_queries > (FEW_MAX_QUERIES if kernels_only else STREAM_DOT_MAX_QUERIES):
        return False
    group, groups, blocks, width = _streaming_launch(n_queries, rows.shape[0], dim)
    if width is None:
        return False
    kernel(f"dot_scores_registers<{group}, {width}>")(
        (blocks, groups),
        (BLOCK,),
        (queries, np.int32(n_queries), rows, np.int64(rows.shape[0]), np.int32(dim), np.float32(alpha), out,
         np.int64(ld)),
    )  # fmt: skip
    return True


def oriented_tile(
    queries: cupy.ndarray,
    database: Any,
    start: int,
    stop: int,
    out: cupy.ndarray,
    ld: int,
    *,
    kernels_only: bool = False,
) -> tuple[Any, Any]:
    """Oriented scores of rows ``start:stop`` into ``out`` (row stride ``ld``); returns the (mul, add) epilogue.

    ``queries`` are as `prepared_queries` made them (unit rows for cosine). ``kernels_only``: by the
    backend's own kernels (`dot_tile`), a `LibraryCallError` where none applies.
    """
    metric = database.metric
    rows = database.vectors[start:stop]
    if metric is Metric.L1:
        l1_tile(queries, rows, out, ld)
        return None, None
    alpha = 2.0 if metric is Metric.L2 else 1.0
    if not dot_tile(queries, rows, out, ld, alpha, kernels_only=kernels_only):
        if kernels_only:
            raise LibraryCallError(f"no score kernel for {queries.shape[0]} queries of dimension {queries.shape[1]}")
        scores_into(queries, rows, out, ld, alpha=alpha)
    if metric is Metric.L2:
        return None, database.row_data[NEG_SQ_NORMS][start:stop]
    if metric is Metric.COSINE:
        return database.row_data[INV_NORMS][start:stop], None
    return None, None


def prepared_queries(queries: cupy.ndarray, metric: Metric) -> cupy.ndarray:
    """The queries as the tiles read them: unit rows for cosine, as given otherwise."""
    return unit_rows(queries) if metric is Metric.COSINE else queries


def direct_scores(queries: cupy.ndarray, vectors: cupy.ndarray, rows: cupy.ndarray, metric: Metric) -> cupy.ndarray:
    """(Q, M) float32 scores of each query against its rows (Q, M), each summed directly in float64."""
    n_queries, width = rows.shape
    out = cupy.empty((n_queries, width), dtype=cupy.float32)
    warps = n_queries * width
    kernel("rescore")(
        (-(-warps * 32 // BLOCK),),
        (BLOCK,),
        (queries, vectors, np.int32(vectors.shape[1]), rows, np.int32(width), np.int32(n_queries),
         np.int32(METRIC_CODES[metric]), out),
    )  # fmt: skip
    return out


def final_scores(
    queries: cupy.ndarray, vectors: cupy.ndarray, rows: cupy.ndarray, metric: Metric
) -> tuple[cupy.ndarray, cupy.ndarray]:
    """Each query's selected rows (Q, k) scored directly and ordered best first (ties by row)."""
    n_queries, k = rows.shape
    if k > SORTED_MAX:
        return best_first(direct_scores(queries, vectors, rows, metric), rows, metric.higher_is_better)
    scores = cupy.empty((n_queries, k), dtype=cupy.float32)
    ordered = cupy.empty((n_queries, k), dtype=cupy.int64)
    kernel("rescore_sorted")(
        (n_queries,),
        (BLOCK,),
        (queries, vectors, np.int32(vectors.shape[1]), rows, np.int32(k), np.int32(METRIC_CODES[metric]),
         np.int32(metric.higher_is_better), scores, ordered),
    )  # fmt: skip
    return scores, ordered


def best_first(scores: cupy.ndarray, rows: cupy.ndarray, higher_is_better: bool) -> tuple[cupy.ndarray, cupy.ndarray]:
    """(scores, rows) of each query ordered best first."""
    order = cupy.argsort(-scores if higher_is_better else scores, axis=1)
    return cupy.take_along_axis(scores, order, 1), cupy.take_along_axis(rows, order, 1)


def few_query_tile(n_queries: int, tile_scores: int) -> int:
    """Rows per tile of the few-query path where the rows need several: whole chunks within `tile_scores`."""
    return tile_scores // n_queries // CHUNK_KEYS * CHUNK_KEYS


def few_query_tile_rows(n_queries: int, n_rows: int, k: int, tile_scores: int) -> int | None:
    """Rows per tile of the few-query path (whole chunks), or None where the path does not apply: more
    than `FEW_MAX_QUERIES` queries, k above `SORTED_MAX`, tiles of less than a chunk, or more than
    `FEW_MAX_CANDIDATES` candidates per query."""
    if n_queries > FEW_MAX_QUERIES or k > SORTED_MAX:
        return None
    if n_queries * n_rows <= tile_scores:
        tile_rows = n_rows
    else:
        tile_rows = few_query_tile(n_queries, tile_scores)
        if tile_rows < CHUNK_KEYS:
            return None
    if -(-n_rows // CHUNK_KEYS) * k > FEW_MAX_CANDIDATES:
        return None
    return tile_rows


@dataclasses.dataclass
class FewQueryResult:
    """A few-query answer in one device buffer: rows (int64, Q x k), scores (float32, Q x k), then four bytes
    for a query check's largest magnitude; `scores` and `rows` are views of it."""

    scores: cupy.ndarray
    rows: cupy.ndarray
    buffer: cupy.ndarray
    magnitude: cupy.ndarray

    @classmethod
    def empty(cls, n_queries: int, k: int, *, zeroed: bool) -> FewQueryResult:
        """A buffer for Q x k answers (``zeroed``: its magnitude starts at 0, as the check's kernel needs)."""
        count = n_queries * k
        buffer = (cupy.zeros if zeroed else cupy.empty)(count * 12 + 4, dtype=cupy.uint8)
        rows = cupy.ndarray((n_queries, k), cupy.int64, buffer.data)
        scores = cupy.ndarray((n_queries, k), cupy.float32, buffer.data + count * 8)
        return cls(scores, rows, buffer, cupy.ndarray((1,), cupy.uint32, buffer.data + count * 12))

    def fetch(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], float]:
        """(scores, rows, largest magnitude) on the host, in one copy (waits for the answer)."""
        host = self.buffer.get()
        n_queries, k = self.rows.shape
        count = n_queries * k
        rows = host[: count * 8].view(np.int64).reshape(n_queries, k)
        scores = host[count * 8 : count * 12].view(np.float32).reshape(n_queries, k)
        return scores, rows, float(host[count * 12 :].view(np.float32)[0])


@dataclasses.dataclass
class FewQueryWork:
    """The device buffers of one few-query search: a tile of scores, the chunks' winners (keys and rows)
    and the answer."""

    tile: cupy.ndarray
    keys: cupy.ndarray
    rows: cupy.ndarray
    result: FewQueryResult

    @classmethod
    def allocate(
        cls, n_queries: int, n_rows: int, k: int, tile_rows: int, *, zeroed: bool, tile: cupy.ndarray | None = None
    ) -> FewQueryWork:
        """Buffers for Q queries over ``n_rows`` rows in tiles of ``tile_rows`` (``zeroed``: as
        `FewQueryResult.empty`; ``tile``: the score tile, where allocated already)."""
        width = -(-n_rows // CHUNK_KEYS) * k
        return cls(
            cupy.empty((n_queries, tile_rows), dtype=cupy.float32) if tile is None else tile,
            cupy.empty((n_queries, width), dtype=cupy.uint32),
            cupy.empty((n_queries, width), dtype=cupy.int64),
            FewQueryResult.empty(n_queries, k, zeroed=zeroed),
        )


def few_query_topk(queries: cupy.ndarray, database: Any, k: int, tile_rows: int, check: Any = None) -> FewQueryResult:
    """`float32_topk` for a few queries, as a fixed short sequence of launches and no host round trip.

    Per tile of ``tile_rows`` rows (a multiple of `CHUNK_KEYS`, or all rows): the score pass (cuBLAS,
    or the l1 kernel), then ``chunk_select`` narrows each chunk of `CHUNK_KEYS` rows to its best k in
    shared memory. Once: ``merge_rescore`` selects each query's k best of the chunks' winners, scores
    them again directly and orders them. Cosine ranks by ``q·x / |x|``: per query the same order as
    the cosine (|q| is one positive factor), so the queries are not normalised first. With ``check``
    (an `arrays.PendingCheck` of the queries), its magnitude kernel is queued last, into the answer's buffer.
    """
    n_queries = queries.shape[0]
    tile = cupy.empty((n_queries, tile_rows), dtype=cupy.float32)
    mul, add = oriented_tile(queries, database, 0, min(tile_rows, database.count), tile, tile_rows)
    # The rest is allocated once the first score pass is queued.
    work = FewQueryWork.allocate(n_queries, database.count, k, tile_rows, zeroed=check is not None, tile=tile)
    queue_few_query(queries, database, k, work, first_epilogue=(mul, add))
    if check is not None:
        check.queue(work.result.magnitude)
    return work.result


def queue_few_query(
    queries: cupy.ndarray,
    database: Any,
    k: int,
    work: FewQueryWork,
    *,
    first_epilogue: tuple[Any, Any] | None = None,
    kernels_only: bool = False,
) -> None:
    """Queue the launches of `few_query_topk` into ``work``'s buffers (no allocation, no host round trip).

    ``first_epilogue``: the first tile's score pass was queued already, with this (mul, add);
    ``kernels_only``: as `oriented_tile` (for a graph's capture).
    """
    metric, n_rows = database.metric, database.count
    n_queries, dim = queries.shape
    tile_rows = work.tile.shape[1]
    width = work.keys.shape[1]
    select = kernel("chunk_select")
    for start, stop in tiles(n_rows, tile_rows):
        if start == 0 and first_epilogue is not None:
            mul, add = first_epilogue
        else:
            mul, add = oriented_tile(queries, database, start, stop, work.tile, tile_rows, kernels_only=kernels_only)
        select(
            (-(-(stop - start) // CHUNK_KEYS), n_queries),
            (BLOCK,),
            (work.tile, np.int64(tile_rows), np.int64(stop - start), pointer(mul), pointer(add), np.int64(start),
             np.int32(k), work.keys, work.rows, np.int64(width), np.int64(start // CHUNK_KEYS)),
        )  # fmt: skip
    kernel("merge_rescore")(
        (n_queries,),
        (BLOCK,),
        (work.keys, work.rows, np.int32(width), np.int32(k), queries, database.vectors, np.int32(dim),
         np.int32(METRIC_CODES[metric]), np.int32(metric.higher_is_better), work.result.scores, work.result.rows),
    )  # fmt: skip


def few_query_search(
    queries: cupy.ndarray, database: Any, k: int, tile_scores: int, check: Any = None
) -> FewQueryResult | None:
    """`few_query_topk` where the few-query path applies (`few_query_tile_rows`), else None."""
    tile_rows = few_query_tile_rows(queries.shape[0], database.count, k, tile_scores)
    return None if tile_rows is None else few_query_topk(queries, database, k, tile_rows, check)


def float32_topk(queries: cupy.ndarray, database: Any, k: int, tile_scores: int) -> tuple[cupy.ndarray, cupy.ndarray]:
    """The k best rows per query: (scores (Q, k) float32 computed directly, rows (Q, k) int64), best first."""
    metric, n_rows = database.metric, database.count
    few = few_query_search(queries, database, k, tile_scores)
    if few is not None:
        return few.scores, few.rows
    out_scores, out_rows = [], []
    for q0 in range(0, queries.shape[0], MAX_GRID_QUERIES):
        block = queries[q0 : q0 + MAX_GRID_QUERIES]
        n_queries = block.shape[0]
        tile_rows = min(n_rows, max(1, tile_scores // n_queries))
        total = sum(min(k, stop - start) for start, stop in tiles(n_rows, tile_rows))
        candidates = Candidates.for_tiles(n_queries, k, total, filtering=n_rows > tile_rows > k)
        ranked = prepared_queries(block, metric)
        buffer = cupy.empty((n_queries, tile_rows), dtype=cupy.float32)
        for start, stop in tiles(n_rows, tile_rows):
            mul, add = oriented_tile(ranked, database, start, stop, buffer, tile_rows)
            candidates.add_scores(buffer, tile_rows, stop - start, start, mul=mul, add=add)
        scores, rows = final_scores(block, database.vectors, candidates.best(), metric)
        out_scores.append(scores)
        out_rows.append(rows)
    if len(out_scores) == 1:
        return out_scores[0], out_rows[0]
    return cupy.concatenate(out_scores), cupy.concatenate(out_rows)


def float64_topk(queries: cupy.ndarray, vectors: cupy.ndarray, k: int, metric: Metric) -> tuple[Any, Any]:
    """The same answer computed in float64 (terms too large for float32): a full sort, for rare inputs only."""
    q = queries.astype(cupy.float64)
    x = vectors.astype(cupy.float64)
    if metric is Metric.L1:
        scores = cupy.stack([cupy.abs(x - row[None, :]).sum(axis=1) for row in q])
    elif metric is Metric.L2:
        scores = cupy.stack([((x - row[None, :]) ** 2).sum(axis=1) for row in q])
    else:
        if metric is Metric.COSINE:
            scale = cupy.max(cupy.abs(x)) or 1.0
            xn = x / scale
            xn = xn / cupy.where((n := cupy.sqrt((xn * xn).sum(1))) > 0, n, 1.0)[:, None]
            qs = q / (cupy.max(cupy.abs(q)) or 1.0)
            qn = qs / cupy.where((m := cupy.sqrt((qs * qs).sum(1))) > 0, m, 1.0)[:, None]
            scores = qn @ xn.T
        else:
            scores = q @ x.T
    order = cupy.argsort(-scores if metric.higher_is_better else scores, axis=1)[:, :k]
    return cupy.take_along_axis(scores, order, 1).astype(cupy.float32), order.astype(cupy.int64)


def hamming_tile(
    codes: cupy.ndarray, database_codes: cupy.ndarray, start: int, stop: int, out: cupy.ndarray, ld: int
) -> None:
    """``out[q, j] = -hamming(codes[q], database_codes[start + j])`` (row stride ``ld``)."""
    n = stop - start
    kernel("hamming_scores")(
        (-(-n // BLOCK), codes.shape[0]),
        (BLOCK,),
        (codes, database_codes[start:stop], np.int32(codes.shape[1]), np.int64(n), out, np.int64(ld)),
    )


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)


def hamming_topk(codes: cupy.ndarray, database_codes: cupy.ndarray, k: int, tile_scores: int) -> tuple[Any, Any]:
    """The k database codes nearest each code, nearest first: (int32 distances, int64 rows)."""
    n_rows = database_codes.shape[0]
    out_distances, out_rows = [], []
    table = cupy.asarray(_POPCOUNT)
    for q0 in range(0, codes.shape[0], MAX_GRID_QUERIES):
        block = codes[q0 : q0 + MAX_GRID_QUERIES]
        n_queries = block.shape[0]
        tile_rows = min(n_rows, max(1, tile_scores // n_queries))
        total = sum(min(k, stop - start) for start, stop in tiles(n_rows, tile_rows))
        candidates = Candidates.for_tiles(n_queries, k, total)
        buffer = cupy.empty((n_queries, tile_rows), dtype=cupy.float32)
        for start, stop in tiles(n_rows, tile_rows):
            hamming_tile(block, database_codes, start, stop, buffer, tile_rows)
            candidates.add_scores(buffer, tile_rows, stop - start, start)
        rows = candidates.best()
        distances = table[block[:, None, :] ^ database_codes[rows]].sum(axis=2, dtype=cupy.int32)
        distances, rows = best_first(distances, rows, higher_is_better=False)
        out_distances.append(distances)
        out_rows.append(rows)
    if len(out_rows) == 1:
        return out_distances[0], out_rows[0]
    return cupy.concatenate(out_distances), cupy.concatenate(out_rows)


def pairwise(queries: cupy.ndarray, vectors: cupy.ndarray, metric: Metric) -> cupy.ndarray:
    """The (Q, N) float32 matrix of ``metric``, every entry summed directly in float64."""
    n_queries, n = queries.shape[0], vectors.shape[0]
    out = cupy.empty((n_queries, n), dtype=cupy.float32)
    for q0 in range(0, n_queries, MAX_GRID_QUERIES):
        block = queries[q0 : q0 + MAX_GRID_QUERIES]
        kernel("pairwise_direct")(
            (-(-n // BLOCK), block.shape[0]),
            (BLOCK,),
            (block, vectors, np.int32(vectors.shape[1]), np.int64(n), np.int32(METRIC_CODES[metric]), out[q0:]),
        )
    return out
