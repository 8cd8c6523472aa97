"""The NumPy backend's compiled LSH loops answer exactly as its NumPy fallback and the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpurag.metrics import Metric
from gpurag.testing import reference as ref
from gpurag_numpy import lsh, lsh_kernels

needs_numba = pytest.mark.skipif(lsh_kernels.load() is None, reason="Numba is not installed")


@pytest.fixture
def without_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lsh_kernels, "load", lambda: None)


@needs_numba
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_compiled_hamming_topk_matches_the_reference_across_groups_and_samples(data: st.DataObject) -> None:
    n_rows = data.draw(st.integers(1, 300), label="rows")  # crosses the 16-row groups and the 1-in-16 sample
    width = data.draw(st.sampled_from([1, 3, 8, 9, 16, 24]), label="bytes")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    database = rng.integers(0, 256, (n_rows, width), dtype=np.uint8)
    database[rng.integers(0, n_rows, n_rows // 3)] = database[0]  # many exact ties
    queries = np.concatenate([database[:1], rng.integers(0, 256, (3, width), dtype=np.uint8)])
    k = data.draw(st.integers(1, n_rows), label="k")
    top = lsh.hamming_topk(queries, database, k)
    ref.assert_hamming_topk_matches(queries, database, top.scores, top.indices, k)


@needs_numba
def test_compiled_hamming_topk_widens_a_threshold_guessed_too_tight() -> None:
    # Every 16th row equals the query, so the sample guesses distance 0; k asks for more rows than that.
    rng = np.random.default_rng(0)
    database = rng.integers(0, 256, (1000, 16), dtype=np.uint8)
    database[::16] = 0
    queries = np.zeros((2, 16), np.uint8)
    top = lsh.hamming_topk(queries, database, 200)
    ref.assert_hamming_topk_matches(queries, database, top.scores, top.indices, 200)
    assert (top.indices[0, :63] == np.arange(0, 1000, 16)).all()


@pytest.mark.usefixtures("without_numba")
def test_the_numpy_fallback_matches_the_reference() -> None:
    rng = np.random.default_rng(1)
    database = rng.integers(0, 256, (500, 9), dtype=np.uint8)
    queries = rng.integers(0, 256, (5, 9), dtype=np.uint8)
    top = lsh.hamming_topk(queries, database, 37)
    ref.assert_hamming_topk_matches(queries, database, top.scores, top.indices, 37)
    vectors = rng.standard_normal((60, 5)).astype(np.float32)
    candidates = np.stack([rng.permutation(60)[:25] for _ in range(5)])
    ranked = lsh.rerank(vectors[:5], vectors, candidates, 6, Metric.L2)
    for q in range(5):
        ref.assert_topk_matches(
            vectors[q : q + 1],
            vectors[candidates[q]],
            "l2",
            ranked.scores[q : q + 1],
            ranked.indices[q : q + 1],
            6,
            row_ids=candidates[q],
        )


@needs_numba
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_compiled_rerank_matches_the_reference_for_every_metric(metric: Metric) -> None:
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((300, 33)).astype(np.float32)
    vectors[7] = 0.0
    queries = rng.standard_normal((9, 33)).astype(np.float32)
    queries[1] = 0.0
    candidates = np.stack([rng.permutation(300)[:50] for _ in range(9)])
    ranked = lsh.rerank(queries, vectors, candidates, 10, metric)
    assert ranked.scores.dtype == np.float32
    assert ranked.indices.dtype == np.int64
    for q in range(9):
        ref.assert_topk_matches(
            queries[q : q + 1],
            vectors[candidates[q]],
            metric,
            ranked.scores[q : q + 1],
            ranked.indices[q : q + 1],
            10,
            row_ids=candidates[q],
        )


def test_rerank_refuses_candidates_outside_the_rows() -> None:
    vectors = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="candidates"):
        lsh.rerank(vectors[:1], vectors, np.array([[0, 4]]), 1, Metric.DOT)
    with pytest.raises(ValueError, match="k must"):
        lsh.rerank(vectors[:1], vectors, np.array([[0, 1]]), 3, Metric.DOT)
