"""Metrics, and the result types of a k-nearest-neighbour search."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from gpurag.errors import InvalidInputError


class Metric(enum.StrEnum):
    """A way to compare two vectors.

    - ``l2``: squared Euclidean distance (as FAISS); lower is better.
    - ``dot``: inner product; higher is better.
    - ``cosine``: cosine similarity; higher is better. A zero vector has similarity 0 with everything.
    - ``l1``: Manhattan distance; lower is better.
    """

    L2 = "l2"
    DOT = "dot"
    COSINE = "cosine"
    L1 = "l1"

    @property
    def higher_is_better(self) -> bool:
        """True where a larger score means a nearer neighbour (dot, cosine)."""
        return self in (Metric.DOT, Metric.COSINE)

    @property
    def worst(self) -> float:
        """The value that pads a result past the index size: -inf where higher is better, else +inf."""
        return float("-inf") if self.higher_is_better else float("inf")

    @classmethod
    def parse(cls, value: Metric | str) -> Metric:
        """The metric named by ``value`` (case-insensitive); an unknown name is an `InvalidInputError`."""
        if isinstance(value, Metric):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        names = ", ".join(m.value for m in cls)
        raise InvalidInputError(f"metric must be one of {names}; got {value!r}")


class TopK(NamedTuple):
    """A backend's answer for one block of queries: scores and row positions, best first.

    Arrays are the backend's own (NumPy, torch, CuPy); ``indices`` are positions in the database
    the backend was handed, not user ids.
    """

    scores: Any
    indices: Any


class SearchResult(NamedTuple):
    """``(scores, ids)``: float32 and int64 arrays of shape (Q, k), best first.

    Where k exceeds the index size the tail holds id -1 and the metric's worst value.
    ``D, I = index.search(xq, k)`` reads as it does with FAISS.
    """

    scores: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int64]
