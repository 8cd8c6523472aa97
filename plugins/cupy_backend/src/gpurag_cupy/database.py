"""What a CuPy database holds beside its rows: the per-row epilogue of the metric, and its largest norm."""

from __future__ import annotations

import dataclasses
import math

import cupy

from gpurag.backend import Database
from gpurag.metrics import Metric

#: -|x|² per row (float32): added to 2 q·x to rank by l2.
NEG_SQ_NORMS = "neg_sq_norms"
#: 1/|x| per row, 0 for a zero row (float32): multiplies unit-q · x to rank by cosine.
INV_NORMS = "inv_norms"

_squares = cupy.ReductionKernel("T x", "T y", "x * x", "a + b", "y = a", "0", "gpurag_sum_of_squares")
_absolutes = cupy.ReductionKernel("T x", "T y", "fabs(x)", "a + b", "y = a", "0", "gpurag_sum_of_absolutes")


@dataclasses.dataclass
class CupyDatabase(Database):
    """A `Database` of CuPy arrays with ``max_norm``: an upper bound of its rows' norms (l1: l1 norms).

    The bound decides whether float32 terms of a search may overflow; it stays valid (if loose)
    when rows are removed or sliced, and `CupyBackend.append` raises it with the new rows.
    """

    max_norm: float = math.inf


def sum_of_squares(rows: cupy.ndarray) -> cupy.ndarray:
    """Σ x² per row (float32), without a temporary the size of ``rows``."""
    return _squares(rows, axis=1)


def row_norms(rows: cupy.ndarray, metric: Metric) -> cupy.ndarray:
    """|x| per row (l1: Σ|x|), float32."""
    if metric is Metric.L1:
        return _absolutes(rows, axis=1)
    return cupy.sqrt(sum_of_squares(rows))


def prepare_rows(rows: cupy.ndarray, metric: Metric) -> CupyDatabase:
    """A database of ``rows`` (owned, float32, C-contiguous) with what ``metric`` ranks by."""
    data: dict[str, cupy.ndarray] = {}
    norms = row_norms(rows, metric)
    if metric is Metric.L2:
        data[NEG_SQ_NORMS] = -sum_of_squares(rows)
    elif metric is Metric.COSINE:
        data[INV_NORMS] = cupy.where(norms > 0, 1.0 / cupy.where(norms > 0, norms, 1.0), 0.0).astype(cupy.float32)
    largest = float(norms.max()) if rows.shape[0] else 0.0
    return CupyDatabase(metric, rows, data, max_norm=largest if math.isfinite(largest) else math.inf)


def required_keys(metric: Metric) -> set[str]:
    """The row_data keys a database prepared for ``metric`` holds."""
    if metric is Metric.L2:
        return {NEG_SQ_NORMS}
    if metric is Metric.COSINE:
        return {INV_NORMS}
    return set()
