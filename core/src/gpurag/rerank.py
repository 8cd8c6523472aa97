"""Exact re-ranking of per-query candidate rows, on whatever device the arrays live (NumPy, torch, CuPy).

The default behind `DistanceBackend.rerank`: it gathers each query's candidate rows with the
array's own indexing, scores them with the metric by broadcasting arithmetic and keeps the best k,
so the rows never leave the backend's device.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from gpurag.metrics import Metric, TopK


def array_module(x: Any) -> Any:
    """The module an array belongs to: ``numpy``, ``torch`` or ``cupy`` (by the array's type)."""
    if isinstance(x, np.ndarray):
        return np
    return importlib.import_module(type(x).__module__.split(".")[0])


def like(template: Any, host: np.ndarray[Any, Any]) -> Any:
    """``host`` as an array of ``template``'s library on ``template``'s device."""
    if isinstance(template, np.ndarray):
        return host
    xp = array_module(template)
    if hasattr(xp, "from_numpy"):  # torch
        return xp.from_numpy(np.ascontiguousarray(host)).to(template.device)
    return xp.asarray(host)


def concat_rows(*parts: Any) -> Any:
    """The arrays ``parts`` one after another along the rows, in their own array library."""
    if len(parts) == 1:
        return parts[0]
    xp = array_module(parts[0])
    join = getattr(xp, "cat", None) or xp.concatenate
    return join(list(parts))


def candidate_scores(queries: Any, vectors: Any, candidates: Any, metric: Metric) -> Any:
    """(Q, C) float32 scores of each query against its candidate rows ``vectors[candidates[q]]``.

    l2 is the sum of squared differences, l1 of absolute differences; cosine with a zero vector is 0.
    """
    rows = vectors[candidates]  # (Q, C, D), gathered where the vectors are
    q = queries[:, None, :]
    if metric is Metric.L2:
        diff = rows - q
        return (diff * diff).sum(-1)
    if metric is Metric.L1:
        return abs(rows - q).sum(-1)
    xp = array_module(rows)
    dots = xp.einsum("qcd,qxd->qc", rows, q)
    if metric is Metric.DOT:
        return dots
    norms = ((rows * rows).sum(-1) * (q * q).sum(-1)) ** 0.5
    return xp.where(norms > 0, dots / xp.where(norms > 0, norms, 1.0), 0.0 * dots)


def best_k(scores: Any, candidates: Any, k: int, higher_is_better: bool) -> TopK:
    """The ``k`` best of each row of ``scores`` (Q, C) with their ``candidates`` entries, best first."""
    if isinstance(scores, np.ndarray):
        key = -scores if higher_is_better else scores
        if k < key.shape[1]:
            part = np.argpartition(key, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(key.shape[1]), key.shape)
        order = np.take_along_axis(part, np.argsort(np.take_along_axis(key, part, 1), axis=1, kind="stable"), 1)
        return TopK(np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1))
    if hasattr(scores, "topk"):  # torch
        values, order = scores.topk(k, dim=1, largest=higher_is_better, sorted=True)
        return TopK(values, candidates.gather(1, order))
    xp = array_module(scores)
    key = -scores if higher_is_better else scores
    order = xp.argsort(key, axis=1)[:, :k]
    return TopK(xp.take_along_axis(scores, order, 1), xp.take_along_axis(candidates, order, 1))


def rerank(queries: Any, vectors: Any, candidates: Any, k: int, metric: Metric) -> TopK:
    """The ``k`` best rows among each query's ``candidates`` (Q, C) of ``vectors``, scored exactly."""
    scores = candidate_scores(queries, vectors, candidates, metric)
    return best_k(scores, candidates, k, metric.higher_is_better)
