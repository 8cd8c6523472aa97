"""The NumPy backend's database: the rows, what each metric needs precomputed per row, and the l1
integer codes (int16, a power-of-two scale) that shortlist l1 search.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from gpurag.backend import Database
from gpurag.metrics import Metric
from gpurag_numpy.numerics import F32, F64, I16, norms64

#: Dimensions whose int16 codes are summed before widening to int32; fixes the l1 code range.
L1_GROUP_DIMS = 128


@dataclasses.dataclass
class NumpyDatabase(Database):
    """A `Database` that may also hold the l1 codes: int16, transposed (dim, rows), and their scale.

    The codes are ``rint(vectors / l1_scale)``; with ``l1_scale`` a power of two they shortlist l1
    search. ``row_data`` holds, per metric: ``half_sq_norms`` (l2), ``norms`` (dot),
    ``inv_norms`` (cosine, 0 for a zero row), ``l1_code_sums`` and ``l1_errors`` (l1).
    """

    l1_codes: Any = None
    l1_scale: float = 0.0
    #: The largest value of each ``row_data`` array, computed once per database (see `row_max`).
    maxima: dict[str, float] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def row_axes(self) -> dict[str, int]:
        """`Database.row_axes` plus the l1 codes, whose rows lie along axis 1."""
        axes = super().row_axes()
        if self.l1_codes is not None:
            axes["l1_codes"] = 1
        return axes

    def row_arrays(self) -> dict[str, Any]:
        """`Database.row_arrays` plus the l1 codes."""
        arrays = super().row_arrays()
        if self.l1_codes is not None:
            arrays["l1_codes"] = self.l1_codes
        return arrays

    def with_rows(self, count: int, storage: dict[str, Any]) -> NumpyDatabase:
        """`Database.with_rows`, the l1 codes included."""
        result = super().with_rows(count, storage)
        assert isinstance(result, NumpyDatabase)
        if "l1_codes" in storage:
            result.l1_codes = storage["l1_codes"][:, :count]
        result.maxima = {}  # other rows: other maxima
        return result


def row_max(database: Database, key: str) -> float:
    """The largest value of ``database.row_data[key]`` (0 for no rows), kept on a `NumpyDatabase`."""
    if isinstance(database, NumpyDatabase):
        cached = database.maxima.get(key)
        if cached is None:
            cached = database.maxima[key] = float(np.max(database.row_data[key], initial=0.0))
        return cached
    return float(np.max(database.row_data[key], initial=0.0))


#: What `NumpyBackend.prepare` puts in ``row_data`` for each metric.
ROW_DATA: dict[Metric, tuple[str, ...]] = {
    Metric.L2: ("half_sq_norms",),
    Metric.DOT: ("norms",),
    Metric.COSINE: ("inv_norms",),
    Metric.L1: ("l1_code_sums", "l1_errors"),
}


def row_data_for(x: F32, metric: Metric) -> dict[str, Any]:
    """The ``row_data`` that ``metric`` needs for rows ``x``; for l1 none: `set_l1_codes` adds it with the codes."""
    if metric is Metric.L2:
        return {"half_sq_norms": 0.5 * np.einsum("ij,ij->i", x, x, dtype=np.float64)}
    if metric is Metric.DOT:
        return {"norms": norms64(x)}
    if metric is Metric.COSINE:
        norms = norms64(x)
        return {"inv_norms": np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)}
    return {}


def l1_levels(dim: int) -> int:
    """The largest code magnitude: a sum of `L1_GROUP_DIMS` codes must fit in int16."""
    return 32767 // min(dim, L1_GROUP_DIMS)


def l1_scale_for(max_abs: float, dim: int) -> float:
    """The power-of-two scale that maps values of magnitude ``max_abs`` into the code range."""
    if not max_abs > 0.0:
        return 1.0
    return float(2.0 ** math.ceil(math.log2(max_abs / l1_levels(dim))))


def l1_encode(vectors: F32, scale: float) -> tuple[I16, F32, F64]:
    """Codes (rows, dim), their row sums (float32, exact) and each row's l1 rounding error (float64)."""
    scaled = vectors.astype(np.float64) / scale
    codes = np.rint(scaled)
    errors = np.abs(scaled - codes).sum(axis=1) * scale
    sums = codes.sum(axis=1)
    return codes.astype(np.int16), sums.astype(np.float32), errors


def set_l1_codes(database: NumpyDatabase, x: F32, scale: float) -> None:
    """Give ``database`` (of rows ``x``) the l1 codes at ``scale`` and their ``row_data``."""
    codes, sums, errors = l1_encode(x, scale)
    database.l1_codes = np.ascontiguousarray(codes.T)
    database.l1_scale = scale
    database.row_data["l1_code_sums"] = sums
    database.row_data["l1_errors"] = errors
