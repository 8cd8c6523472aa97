"""The distance-backend interface every backend plugin implements, and the database handle it prepares."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import numpy as np

from gpurag.arrays import as_matrix, to_host
from gpurag.metrics import Metric, TopK


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether a backend can run here and, when it cannot, why."""

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available


@dataclasses.dataclass
class Database:
    """Vectors resident where a backend computes, plus whatever the metric wants precomputed.

    ``vectors`` is the backend's own (rows, dim) float32 array of the rows exactly as given (a
    retriever reads them back to save the index); each entry of ``row_data`` is an array with one
    entry per row (norms, normalised rows, a reduced-precision copy) that is sliced with the rows.
    """

    metric: Metric
    vectors: Any
    row_data: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def count(self) -> int:
        """Number of rows."""
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        """Dimension of each row."""
        return int(self.vectors.shape[1])


class DistanceBackend(abc.ABC):
    """Distances, fused top-k selection and LSH primitives on one device.

    A backend implements `prepare`, `topk`, `pairwise`, `sign_codes` and `hamming_topk`; the
    retrievers derive chunking, merging, id mapping and padding from them. Arrays going in and out
    are the backend's own type; `asarray` and `to_numpy` convert at the edges.
    """

    #: The name the backend is registered under (``numpy``, ``torch``, ``cuda``...).
    name: ClassVar[str] = ""
    #: Device kinds the backend runs on: ``cpu``, ``cuda``.
    device_kinds: ClassVar[tuple[str, ...]] = ("cpu",)
    #: Metrics the backend supports.
    metrics: ClassVar[frozenset[Metric]] = frozenset(Metric)
    #: The largest k one `topk` call supports, or None for any k.
    max_k: ClassVar[int | None] = None

    def __init__(self, device: str | None = None) -> None:
        self.device = device or self.default_device()

    @classmethod
    @abc.abstractmethod
    def availability(cls) -> Availability:
        """Whether this backend can run on this machine, and why not when it cannot."""

    @classmethod
    def default_device(cls) -> str:
        """The device used when none is named."""
        return cls.device_kinds[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r})"

    # --- conversion at the edges ---------------------------------------------------------------
    def asarray(self, x: Any, name: str, *, dim: int | None = None) -> Any:
        """``x`` as this backend's float32 (rows, dim) array, checked to be 2-D, numeric and finite."""
        return as_matrix(x, name, dim=dim)

    def to_numpy(self, x: Any) -> np.ndarray[Any, Any]:
        """A host NumPy copy (or view) of one of this backend's arrays."""
        return to_host(x)

    # --- the database --------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, vectors: Any, metric: Metric) -> Database:
        """Place ``vectors`` (float32, rows x dim, from `asarray`) on the device for ``metric``."""

    def append(self, database: Database, vectors: Any) -> Database:
        """A database holding ``database``'s rows followed by ``vectors``."""
        old = self.to_numpy(database.vectors)
        new = self.to_numpy(vectors)
        return self.prepare(np.concatenate([old, new]), database.metric)

    def take(self, database: Database, positions: np.ndarray[Any, Any]) -> Database:
        """A database of the rows at ``positions`` (host int64), in that order."""
        return self.prepare(self.to_numpy(database.vectors)[positions], database.metric)

    def slice(self, database: Database, start: int, stop: int) -> Database:
        """Rows ``start:stop`` of ``database``, without copying where the backend can avoid it."""
        return Database(
            metric=database.metric,
            vectors=database.vectors[start:stop],
            row_data={key: value[start:stop] for key, value in database.row_data.items()},
        )

    # --- distances and selection ---------------------------------------------------------------
    def working_scores(self, queries: int, rows: int) -> int:
        """Most scores (float32-sized values) one `topk` call over ``queries`` x ``rows`` holds at once.

        The default, every score of the block, fits a backend that materialises it; a backend that
        scores in tiles of its own returns less, and the retriever then splits searches less.
        """
        return queries * rows

    @abc.abstractmethod
    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        """The ``k`` best rows of ``database`` for each query, best first.

        ``1 <= k <= database.count``. Scores are float32 and computed directly for the rows
        returned (an l2 score is the sum of squared differences, not a norm expansion); indices
        are int64 row positions. Among equal scores any order is allowed.

        Reduced precision (bf16, fp16, TF32, integer codes) may only *shortlist*: the shortlist is
        widened by a bound on the fast pass's own error, its survivors are scored again in float32
        directly, and the answer is chosen on those scores. Where the bound cannot prove that no
        row left out beats the k-th answer (the kept set would overflow, norms too large for the
        bound), that block is answered in float32 instead: never a wrong id.
        """

    @abc.abstractmethod
    def pairwise(self, queries: Any, vectors: Any, metric: Metric) -> Any:
        """The (Q, N) float32 matrix of ``metric`` between every query and every vector."""

    def merge_topk(self, first: TopK, second: TopK, k: int, metric: Metric) -> TopK:
        """The ``k`` best of two partial results for the same queries; ``first`` wins ties."""
        scores = np.concatenate([self.to_numpy(first.scores), self.to_numpy(second.scores)], axis=1)
        indices = np.concatenate([self.to_numpy(first.indices), self.to_numpy(second.indices)], axis=1)
        key = -scores if metric.higher_is_better else scores
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        return TopK(np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1))

    def concat_topk(self, blocks: list[TopK]) -> TopK:
        """Results for consecutive query blocks, stacked along the queries (on the backend's device)."""
        return TopK(
            np.concatenate([self.to_numpy(b.scores) for b in blocks]),
            np.concatenate([self.to_numpy(b.indices) for b in blocks]),
        )

    def map_ids(self, ids: np.ndarray[Any, Any], positions: Any) -> Any:
        """``ids[positions]``: row positions (the backend's array) to user ids, as the backend's int64 array."""
        return ids[self.to_numpy(positions).astype(np.int64, copy=False)]

    def pad_result(self, scores: Any, ids: Any, width: int, worst: float) -> tuple[Any, Any]:
        """(scores, ids) padded on the right to ``width`` columns with ``worst`` and id -1, as the backend's arrays."""
        pad = width - int(scores.shape[1])
        scores = np.pad(self.to_numpy(scores), ((0, 0), (0, pad)), constant_values=worst)
        ids = np.pad(self.to_numpy(ids), ((0, 0), (0, pad)), constant_values=-1)
        return scores, ids

    # --- LSH primitives ------------------------------------------------------------------------
    @abc.abstractmethod
    def sign_codes(self, vectors: Any, planes: Any) -> Any:
        """Packed sign bits: uint8 (N, ceil(B / 8)) for ``vectors`` (N, D) and ``planes`` (B, D).

        Bit ``j`` is set when ``vectors @ planes[j] > 0``; it is bit ``j % 8`` (least significant
        first) of byte ``j // 8``, as ``np.packbits(..., bitorder="little")`` packs; unused trailing
        bits are zero.
        """

    @abc.abstractmethod
    def hamming_topk(self, codes: Any, database_codes: Any, k: int) -> TopK:
        """The ``k`` database codes nearest each code in Hamming distance, nearest first.

        ``codes`` (Q, W) and ``database_codes`` (N, W) are uint8 from `sign_codes`;
        ``1 <= k <= N``. Scores are int32 Hamming distances; indices int64 row positions.
        """
