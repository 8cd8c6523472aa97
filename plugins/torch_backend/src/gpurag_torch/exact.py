"""Exact answers from a reduced-precision shortlist: direct float32 re-scoring and the bound that certifies it.

Every fast pass ranks rows by an *oriented* score, larger is better: dot ``q·x``, cosine
``q·x / (|q| |x|)``, l2 ``2 q·x - |x|²`` (the true l2 is ``|q|² - o``), l1 ``-Σ|q - x|``. A bf16 pass
computes it to within `shortlist_error` of the true value. It hands over, per query, candidate rows
and a *cutoff*: no row left out has an approximate score above it. `certify` then proves, per query,
that every row left out is worse than the k-th best re-scored candidate by more than the error
bound plus float32 rounding; a query it cannot prove is answered again in float32 by the caller.
"""

from __future__ import annotations

import math

import torch

from gpurag.metrics import Metric

#: float32 unit roundoff.
U32 = 2.0**-24
#: bf16 unit roundoff (8-bit significand).
U16 = 2.0**-8
#: Margin on every bound (tensor cores truncate rather than round; leave room).
BOUND_MARGIN = 1.25


def bf16_relative_error(dim: int, *, rounded_output: bool) -> float:
    """Bound on ``|ŝ - s| / (|q| |x|)`` for a dot product of bf16-rounded inputs summed in float32.

    Each product of rounded inputs is off by at most ``(2u + u²) |q_i x_i|`` (u = 2⁻⁸); a float32
    sum of D terms that truncates adds at most ``D 2⁻²³`` of ``Σ|q_i x_i| <= |q| |x|``; a result
    rounded to bf16 adds ``u |ŝ|``.
    """
    inputs = 2 * U16 + U16 * U16
    accumulation = (dim + 2) * 2 * U32 * (1 + inputs)
    output = U16 * (1 + inputs + accumulation) if rounded_output else 0.0
    return BOUND_MARGIN * (inputs + accumulation + output)


def bf16_l1_relative_error(dim: int, *, rounded_output: bool) -> float:
    """Bound on ``|ŝ - s| / (Σ|q| + Σ|x|)`` for an l1 distance of bf16-rounded inputs summed in float32."""
    inputs = U16
    accumulation = (dim + 2) * 2 * U32 * (1 + inputs)
    output = U16 * (1 + inputs + accumulation) if rounded_output else 0.0
    return BOUND_MARGIN * (inputs + accumulation + output)


#: Absolute error allowance for products that underflow (flushed to zero on tensor cores), per term.
UNDERFLOW = 2.0**-120


def shortlist_error(
    metric: Metric,
    query_norms: torch.Tensor,
    max_norm: torch.Tensor,
    dim: int,
    *,
    rounded_output: bool,
) -> torch.Tensor:
    """Per query (Q,), the bound on how far a bf16 oriented score may stray from the true oriented score.

    ``query_norms`` are ``|q|`` (l1: ``Σ|q|``), ``max_norm`` the largest row norm of the database in
    the same norm (0-d). For cosine both sides are unit vectors, normalised in float32.
    """
    floor = dim * UNDERFLOW
    if metric is Metric.L1:
        rel = bf16_l1_relative_error(dim, rounded_output=rounded_output)
        return rel * (query_norms + max_norm) + floor
    rel = bf16_relative_error(dim, rounded_output=rounded_output)
    if metric is Metric.COSINE:
        unit = 1.0 + 8 * (dim + 4) * U32  # normalised rows and queries are unit up to rounding
        return torch.full_like(query_norms, rel * unit * unit + 8 * (dim + 4) * U32 + floor)
    dot = rel * query_norms * max_norm + floor
    if metric is Metric.DOT:
        return dot
    # l2's oriented score 2 q·x - |x|²: twice the product's error, plus float32 rounding of the terms.
    return 2 * dot + 4 * U32 * (max_norm * max_norm + 2 * query_norms * max_norm) + floor


def float32_slack(metric: Metric, query_norms: torch.Tensor, max_norm: torch.Tensor, dim: int) -> torch.Tensor:
    """Per query, how far a float32 score computed directly may stray from the true one (as the kit allows)."""
    scale = 4 * (dim + 4) * U32
    if metric is Metric.COSINE:
        return torch.full_like(query_norms, scale)
    if metric is Metric.L1:
        return scale * (query_norms + max_norm)
    if metric is Metric.DOT:
        return scale * query_norms * max_norm
    return scale * (query_norms + max_norm) ** 2


def direct_scores(
    queries: torch.Tensor, vectors: torch.Tensor, rows: torch.Tensor, metric: Metric, row_norms: torch.Tensor | None
) -> torch.Tensor:
    """(Q, M) float32 scores of ``metric`` between each query and its candidate ``rows`` (Q, M), computed directly.

    l2 is the sum of squared differences and l1 of absolute differences (never a norm expansion);
    cosine divides the dot product by both norms (``row_norms`` (N,)), and is 0 where either is zero.
    """
    picked = vectors[rows]  # (Q, M, D)
    if metric is Metric.L2:
        diff = picked - queries[:, None, :]
        return (diff * diff).sum(dim=2)
    if metric is Metric.L1:
        return (picked - queries[:, None, :]).abs().sum(dim=2)
    dots = torch.bmm(picked, queries[:, :, None])[:, :, 0] if picked.is_cuda else (picked * queries[:, None]).sum(2)
    if metric is Metric.DOT:
        return dots
    assert row_norms is not None
    denominator = row_norms[rows] * torch.linalg.vector_norm(queries, dim=1)[:, None]
    return torch.where(denominator > 0, dots / torch.where(denominator > 0, denominator, 1.0), 0.0)


def best_first(scores: torch.Tensor, rows: torch.Tensor, k: int, metric: Metric) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each query's (scores, rows), best first; among equal scores the lower row first."""
    # Sort by row, then stably by score, so ties come out in row order.
    by_row = torch.argsort(rows, dim=1)
    rows = torch.gather(rows, 1, by_row)
    scores = torch.gather(scores, 1, by_row)
    order = torch.sort(scores, dim=1, descending=metric.higher_is_better, stable=True).indices[:, :k]
    return torch.gather(scores, 1, order), torch.gather(rows, 1, order)


def certify(
    metric: Metric,
    kth_score: torch.Tensor,
    cutoff: torch.Tensor,
    error: torch.Tensor,
    slack: torch.Tensor,
    query_sq_norms: torch.Tensor | None,
) -> torch.Tensor:
    """Per query (Q,) bool: every row left out of the shortlist is provably worse than the k-th answer.

    ``kth_score`` is the k-th best re-scored candidate (in the metric's own score), ``cutoff`` the
    highest approximate oriented score of any row left out (-inf when none was), ``error`` the
    bound of the approximate pass and ``slack`` that of the float32 re-scoring.
    """
    best_left_out = cutoff + error  # the true oriented score of a left-out row is at most this
    if metric is Metric.L2:
        assert query_sq_norms is not None
        oriented_kth = query_sq_norms - kth_score
    elif metric is Metric.L1:
        oriented_kth = -kth_score
    else:
        oriented_kth = kth_score
    ok = best_left_out + slack < oriented_kth
    return ok | torch.isneginf(cutoff)


def pow2_at_least(value: int) -> int:
    """The smallest power of two >= value."""
    return 1 << max(0, math.ceil(math.log2(max(1, value))))
