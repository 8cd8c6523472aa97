"""What a torch database holds beside its rows: norms, and a bf16 copy for the reduced-precision shortlist."""

from __future__ import annotations

import dataclasses

import torch

from gpurag.backend import Database
from gpurag.metrics import Metric

#: Row norms |x| (float32): l2, dot, cosine.
NORMS = "norms"
#: Row l1 norms Σ|x| (float32): l1.
L1_NORMS = "l1_norms"
#: Squared row norms |x|² (float32): l2's oriented score.
SQ_NORMS = "sq_norms"
#: The rows rounded to bf16 (cosine: the normalised rows), for the shortlist pass.
LOW = "low"
#: Suffix of column-major (D, N) layouts of the rows, which slice and gather along axis 1.
COLUMN_MAJOR = "_t"


def row_axis(key: str) -> int:
    """The axis of row_data[key] that runs over rows: 1 for column-major layouts, else 0."""
    return 1 if key.endswith(COLUMN_MAJOR) else 0


@dataclasses.dataclass
class TorchDatabase(Database):
    """A `Database` of torch tensors whose column-major (``_t``) layouts hold their rows along axis 1."""

    def row_axes(self) -> dict[str, int]:
        """``vectors`` and each ``row_data.<key>``, with the axis its rows lie along (see `row_axis`)."""
        return {"vectors": 0, **{f"row_data.{key}": row_axis(key) for key in self.row_data}}


def row_data_for(vectors: torch.Tensor, metric: Metric, *, low_precision: bool) -> dict[str, torch.Tensor]:
    """The per-row arrays ``metric`` needs, for float32 (N, D) ``vectors``."""
    data: dict[str, torch.Tensor] = {}
    if metric is Metric.L1:
        data[L1_NORMS] = vectors.abs().sum(dim=1)
    else:
        data[NORMS] = torch.linalg.vector_norm(vectors, dim=1)
    if metric is Metric.L2:
        data[SQ_NORMS] = (vectors * vectors).sum(dim=1)
    if low_precision:
        data[LOW] = (
            normalised(vectors, data[NORMS]).to(torch.bfloat16)
            if metric is Metric.COSINE
            else vectors.to(torch.bfloat16)
        )
    return data


def normalised(vectors: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Each row divided by its norm; zero rows stay zero."""
    return vectors / torch.where(norms > 0, norms, 1.0)[:, None]


def max_norm(database: Database) -> torch.Tensor:
    """The largest row norm (l1 norm for l1) of ``database``, a 0-d tensor on its device."""
    norms: torch.Tensor = database.row_data[L1_NORMS if database.metric is Metric.L1 else NORMS]
    return norms.max()


def query_norms(queries: torch.Tensor, metric: Metric) -> torch.Tensor:
    """|q| per query (l1: Σ|q|), float32."""
    if metric is Metric.L1:
        return queries.abs().sum(dim=1)
    return torch.linalg.vector_norm(queries, dim=1)  # type: ignore[no-any-return]


def required_keys(metric: Metric, *, low_precision: bool) -> set[str]:
    """The row_data keys a database prepared for ``metric`` holds."""
    keys = {L1_NORMS} if metric is Metric.L1 else {NORMS}
    if metric is Metric.L2:
        keys.add(SQ_NORMS)
    if low_precision:
        keys.add(LOW)
    return keys
