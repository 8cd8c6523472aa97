"""Hypothesis strategies for the conformance kit: metrics, data sets, k, LSH planes and codes.

The data are small and chosen to hit the edges: one row, dimension one, exact ties (small
integers, repeated rows, a query equal to a row), zero vectors (cosine), and magnitudes from 1e-3
to 1e5 that float32 holds without overflow or underflow. Needs the ``test`` extra (hypothesis).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpurag.metrics import Metric

FloatMatrix = npt.NDArray[np.float32]

#: The kinds of values `datasets` draws from.
VALUE_KINDS = ("integers", "floats", "scaled")


def metrics(allowed: Iterable[Metric] | None = None) -> st.SearchStrategy[Metric]:
    """One of ``allowed`` (every `Metric` by default), in a fixed order so shrinking is stable."""
    choices = sorted(Metric if allowed is None else allowed, key=lambda m: list(Metric).index(m))
    return st.sampled_from(choices)


def _values(kind: str) -> st.SearchStrategy[float]:
    if kind == "integers":
        # Few distinct values: exact ties everywhere, and every float32 sum is exact.
        return st.integers(-3, 3).map(float)
    # Moderate float32 values; anything tiny is rounded to zero so no product underflows.
    return st.floats(-100.0, 100.0, width=32, allow_nan=False, allow_infinity=False).map(
        lambda v: v if abs(v) >= 1e-3 else 0.0
    )


@st.composite
def matrices(draw: st.DrawFn, rows: int, dim: int, kind: str = "floats") -> FloatMatrix:
    """A (rows, dim) float32 matrix of ``kind`` values (see `datasets`)."""
    array = draw(hnp.arrays(np.float64, (rows, dim), elements=_values(kind)))
    if kind == "scaled":
        exponents = draw(hnp.arrays(np.int64, (rows, 1), elements=st.integers(-3, 3)))
        array = array * np.power(10.0, exponents)
    return np.ascontiguousarray(array, dtype=np.float32)


@st.composite
def datasets(
    draw: st.DrawFn,
    *,
    max_queries: int = 4,
    max_rows: int = 24,
    max_dim: int = 8,
    min_rows: int = 1,
    rows: int | None = None,
    dim: int | None = None,
    kinds: Iterable[str] = VALUE_KINDS,
) -> tuple[FloatMatrix, FloatMatrix]:
    """(queries, vectors): float32 (Q, D) and (N, D), C-contiguous and finite.

    Shrinks towards Q = N = D = 1. Value kinds: ``integers`` (-3..3: exact ties), ``floats``
    (|v| <= 100), ``scaled`` (rows of floats scaled by 1e-3..1e3). Some rows may be zeroed, some
    repeated, and some queries copied from rows, so ties and zero vectors come up often.
    """
    kind = draw(st.sampled_from(tuple(kinds)))
    n_dim = dim if dim is not None else draw(st.integers(1, max_dim))
    n_rows = rows if rows is not None else draw(st.integers(min_rows, max_rows))
    n_queries = draw(st.integers(1, max_queries))
    vectors = draw(matrices(n_rows, n_dim, kind))
    queries = draw(matrices(n_queries, n_dim, kind))

    zero_rows = draw(st.lists(st.integers(0, n_rows - 1), max_size=2))
    vectors[zero_rows] = 0.0
    for target, source in draw(st.lists(st.tuples(st.integers(0, n_rows - 1), st.integers(0, n_rows - 1)), max_size=3)):
        vectors[target] = vectors[source]
    if draw(st.booleans()):
        queries[draw(st.integers(0, n_queries - 1))] = 0.0
    for target, source in draw(
        st.lists(st.tuples(st.integers(0, n_queries - 1), st.integers(0, n_rows - 1)), max_size=2)
    ):
        queries[target] = vectors[source]
    return queries, vectors


def ks(n_rows: int, *, beyond: int = 0, max_k: int | None = None) -> st.SearchStrategy[int]:
    """k for a search over ``n_rows`` rows: 1, ``n_rows``, or anything up to ``n_rows + beyond``.

    ``max_k`` caps it (a backend's limit).
    """
    top = n_rows + beyond
    if max_k is not None:
        top = min(top, max_k)
    edges = sorted({1, min(n_rows, top), top})
    return st.one_of(st.sampled_from(edges), st.integers(1, top))


def bit_counts(max_bits: int = 130) -> st.SearchStrategy[int]:
    """Numbers of LSH planes B, often not a multiple of 8 or of 64 (1..24, 63, 64, 65, 100, 128, 129)."""
    special = [b for b in (63, 64, 65, 100, 128, 129) if b <= max_bits]
    return st.one_of(st.integers(1, min(24, max_bits)), st.sampled_from(special or [max_bits]))


@st.composite
def lsh_cases(
    draw: st.DrawFn, *, max_rows: int = 12, max_dim: int = 8, max_bits: int = 130
) -> tuple[FloatMatrix, FloatMatrix]:
    """(vectors, planes): float32 (N, D) and (B, D); integer-valued ones give exact zero projections."""
    vectors, _ = draw(datasets(max_queries=1, max_rows=max_rows, max_dim=max_dim))
    n_bits = draw(bit_counts(max_bits))
    kind = draw(st.sampled_from(("integers", "floats")))
    planes = draw(matrices(n_bits, vectors.shape[1], kind))
    return vectors, planes


@st.composite
def sign_patterns(draw: st.DrawFn, rows: int, n_bits: int) -> FloatMatrix:
    """(rows, n_bits) float32 of ±1: with identity planes, their sign codes are exactly these bits.

    Rows are often repeated, so Hamming distances tie.
    """
    bits = draw(hnp.arrays(np.bool_, (rows, n_bits), elements=st.booleans()))
    for target, source in draw(st.lists(st.tuples(st.integers(0, rows - 1), st.integers(0, rows - 1)), max_size=3)):
        bits[target] = bits[source]
    return np.where(bits, 1.0, -1.0).astype(np.float32)
