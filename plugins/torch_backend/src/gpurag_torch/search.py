"""Top-k search in torch: a float32 pass, and a bf16 shortlist certified by its error bound.

Both walk the database in row chunks whose score matrix fits the backend's working budget, keep
each chunk's best in oriented scores (larger is better, see `gpurag_torch.exact`), then score the
survivors again directly in float32 and pick the k best of those.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from gpurag.backend import Database
from gpurag.metrics import Metric
from gpurag_torch import exact
from gpurag_torch.database import LOW, NORMS, SQ_NORMS, max_norm, normalised, query_norms
from gpurag_torch.tensors import full_precision

#: ``direct_scores``'s signature: (queries, vectors, candidate rows, metric, row norms) -> (Q, M) scores.
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Metric, "torch.Tensor | None"], torch.Tensor]

#: Rows of the bf16 shortlist re-scored per query: the certificate needs the best row left out more
#: than twice the error bound below the k-th (32 failed for most queries on 1M x 768, H200).
SHORTLIST_PER_CHUNK = 256
#: Rows each chunk of the shortlist keeps at least (more when k is larger or chunks are few).
SHORTLIST_KEEP_MIN = 32


def row_chunks(count: int, step: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering ``range(count)`` in steps of ``step``."""
    for start in range(0, count, step):
        yield start, min(count, start + step)


def _l1_eager(queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    return (vectors[None, :, :] - queries[:, None, :]).abs().sum(dim=2)


@functools.cache
def _l1_compiled() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    try:
        compiled: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.compile(_l1_eager, dynamic=True)
    except Exception:  # torch.compile unavailable here: the eager form is exact too
        return None
    return compiled


def l1_distances(queries: torch.Tensor, vectors: torch.Tensor, element_budget: int) -> torch.Tensor:
    """(Q, R) float32 l1 distances, each summed directly over its D differences.

    On CUDA the broadcast is fused by ``torch.compile`` into one pass over the rows (the eager form
    writes a Q x R x D temporary); elsewhere, or when compiling fails, row blocks keep that
    temporary under ``element_budget`` elements.
    """
    if vectors.is_cuda:
        compiled = _l1_compiled()
        if compiled is not None:
            try:
                return compiled(queries, vectors)
            except Exception:  # an inductor failure: fall back to the eager form below
                _l1_compiled.cache_clear()
    out = torch.empty((queries.shape[0], vectors.shape[0]), dtype=torch.float32, device=vectors.device)
    per_query = max(1, element_budget // max(1, vectors.shape[0] * vectors.shape[1]))
    step_rows = max(1, element_budget // max(1, vectors.shape[1]))
    for q0, q1 in row_chunks(queries.shape[0], per_query):
        for r0, r1 in row_chunks(vectors.shape[0], step_rows):
            out[q0:q1, r0:r1] = _l1_eager(queries[q0:q1], vectors[r0:r1])
    return out


def oriented_float32(queries: torch.Tensor, database: Database, start: int, stop: int, element_budget: int) -> Any:
    """(Q, stop - start) float32 oriented scores of rows ``start:stop`` (larger is better)."""
    metric = database.metric
    rows = database.vectors[start:stop]
    if metric is Metric.L1:
        return -l1_distances(queries, rows, element_budget)
    with full_precision():
        if metric is Metric.COSINE:
            unit = normalised(queries, torch.linalg.vector_norm(queries, dim=1))
            norms = database.row_data[NORMS][start:stop]
            return (unit @ rows.T) / torch.where(norms > 0, norms, 1.0)[None, :]
        dots = queries @ rows.T
        if metric is Metric.DOT:
            return dots
        return 2 * dots - database.row_data[SQ_NORMS][start:stop][None, :]


def exact_topk(
    queries: torch.Tensor, database: Database, k: int, chunk_scores: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best rows per query by a float32 pass, re-scored directly: (scores (Q, k), rows (Q, k) int64)."""
    metric, n_rows = database.metric, database.count
    step = max(1, chunk_scores // max(1, queries.shape[0]))
    values: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    for start, stop in row_chunks(n_rows, step):
        oriented = oriented_float32(queries, database, start, stop, chunk_scores)
        top = torch.topk(oriented, min(k, stop - start), dim=1)
        values.append(top.values)
        rows.append(top.indices + start)
    union_values, union_rows = torch.cat(values, dim=1), torch.cat(rows, dim=1)
    if union_values.shape[1] > k:
        pick = torch.topk(union_values, k, dim=1).indices
        union_rows = torch.gather(union_rows, 1, pick)
    scores = exact.direct_scores(queries, database.vectors, union_rows, metric, database.row_data.get(NORMS))
    return exact.best_first(scores, union_rows, k, metric)


def approximate_oriented(low_queries: torch.Tensor, database: Database, start: int, stop: int) -> torch.Tensor:
    """(Q, stop - start) oriented scores from the bf16 rows (a bf16 product, its result rounded to bf16)."""
    with full_precision():
        low_rows: torch.Tensor = database.row_data[LOW][start:stop]
        dots = (low_queries @ low_rows.T).float()
    if database.metric is Metric.L2:
        sq_norms: torch.Tensor = database.row_data[SQ_NORMS][start:stop]
        return 2 * dots - sq_norms[None, :]
    return dots


def low_precision_queries(queries: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Queries as the bf16 pass reads them (cosine: normalised first)."""
    if metric is Metric.COSINE:
        queries = normalised(queries, torch.linalg.vector_norm(queries, dim=1))
    return queries.to(torch.bfloat16)


def shortlist_topk(
    queries: torch.Tensor, database: Database, k: int, chunk_scores: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k best rows per query from a bf16 shortlist, re-scored in float32, with a per-query certificate.

    Returns (scores (Q, k), rows (Q, k), certified (Q,) bool). A query whose certificate fails may
    be wrong and must be answered again by `exact_topk`.
    """
    metric, n_rows = database.metric, database.count
    step = max(SHORTLIST_PER_CHUNK, chunk_scores // max(1, queries.shape[0]))
    chunks = -(-n_rows // step)
    # Each chunk keeps its share of the rows re-scored (and at least 2k), so the union holds them.
    keep = max(2 * k, SHORTLIST_KEEP_MIN, -(-SHORTLIST_PER_CHUNK // chunks))
    total = max(2 * k, SHORTLIST_PER_CHUNK)
    low_queries = low_precision_queries(queries, metric)
    neg_inf = torch.full((queries.shape[0],), float("-inf"), device=queries.device)
    cutoff = neg_inf
    values: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    for start, stop in row_chunks(n_rows, step):
        oriented = approximate_oriented(low_queries, database, start, stop)
        kept = min(keep, stop - start)
        top = torch.topk(oriented, kept, dim=1)
        if stop - start > kept:  # rows of this chunk left out score at most its last kept one
            cutoff = torch.maximum(cutoff, top.values[:, -1])
        values.append(top.values)
        rows.append(top.indices + start)
    union_values, union_rows = torch.cat(values, dim=1), torch.cat(rows, dim=1)
    if union_values.shape[1] > total:
        top = torch.topk(union_values, total, dim=1)
        cutoff = torch.maximum(cutoff, top.values[:, -1])
        union_rows = torch.gather(union_rows, 1, top.indices)
    return rescore_and_certify(queries, database, union_rows, cutoff, k, rounded_output=True)


def rescore_and_certify(
    queries: torch.Tensor,
    database: Database,
    candidates: torch.Tensor,
    cutoff: torch.Tensor,
    k: int,
    *,
    rounded_output: bool,
    scorer: Scorer = exact.direct_scores,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score ``candidates`` (Q, M) directly with ``scorer``, keep the k best, certify them against ``cutoff`` (Q,)."""
    metric = database.metric
    scores = scorer(queries, database.vectors, candidates, metric, database.row_data.get(NORMS))
    scores, rows = exact.best_first(scores, candidates, k, metric)
    norms_q = query_norms(queries, metric)
    largest = max_norm(database)
    error = exact.shortlist_error(metric, norms_q, largest, database.dim, rounded_output=rounded_output)
    slack = exact.float32_slack(metric, norms_q, largest, database.dim)
    sq = norms_q * norms_q if metric is Metric.L2 else None
    certified = exact.certify(metric, scores[:, k - 1], cutoff, error, slack, sq)
    return scores, rows, certified
