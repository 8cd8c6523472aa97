"""The full matrix of a metric between every query and every vector, computed in float64 on the CPU."""

from __future__ import annotations

from typing import Any

import numpy as np

from gpurag.errors import InvalidInputError
from gpurag.metrics import Metric
from gpurag_numpy.numerics import CHUNK_ELEMENTS, F32


def pairwise_matrix(queries: Any, vectors: Any, metric: Metric) -> F32:
    """The (Q, N) float32 matrix of ``metric`` between every query and every vector (float64 inside)."""
    q = np.asarray(queries, dtype=np.float32)
    x = np.asarray(vectors, dtype=np.float32)
    if q.ndim != 2 or x.ndim != 2 or q.shape[1] != x.shape[1]:
        raise InvalidInputError(f"queries and vectors must be (Q, D) and (N, D); got {q.shape} and {x.shape}")
    out = np.empty((q.shape[0], x.shape[0]), dtype=np.float32)
    q64 = q.astype(np.float64)
    if metric is Metric.COSINE:
        qn = np.sqrt(np.einsum("ij,ij->i", q64, q64))
        q64 = np.divide(q64, qn[:, None], out=np.zeros_like(q64), where=qn[:, None] > 0)
    q_sq = np.einsum("ij,ij->i", q64, q64)
    dim = max(1, x.shape[1])
    if metric is Metric.L1:
        step_q = max(1, CHUNK_ELEMENTS // (dim * max(1, x.shape[0])))
        step_x = max(1, min(x.shape[0], CHUNK_ELEMENTS // dim))
    else:
        step_q = q.shape[0] or 1
        step_x = max(1, min(CHUNK_ELEMENTS // dim, CHUNK_ELEMENTS // step_q))
    for x0 in range(0, x.shape[0], step_x):
        block = x[x0 : x0 + step_x].astype(np.float64)
        if metric is Metric.L1:
            for q0 in range(0, q.shape[0], step_q):
                diff = q64[q0 : q0 + step_q, None, :] - block[None, :, :]
                np.abs(diff, out=diff)
                out[q0 : q0 + step_q, x0 : x0 + step_x] = diff.sum(axis=2)
            continue
        if metric is Metric.COSINE:
            bn = np.sqrt(np.einsum("ij,ij->i", block, block))
            block = np.divide(block, bn[:, None], out=np.zeros_like(block), where=bn[:, None] > 0)
        dots = q64 @ block.T
        if metric is Metric.L2:
            dots *= -2.0
            dots += q_sq[:, None]
            dots += np.einsum("ij,ij->i", block, block)[None, :]
            np.maximum(dots, 0.0, out=dots)
        with np.errstate(over="ignore"):  # a value beyond float32's range is inf
            out[:, x0 : x0 + step_x] = dots
    return out
