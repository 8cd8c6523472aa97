"""ExactRetriever: add, remove, search, ids, padding, chunking, and every kind of bad input."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest

import gpurag
from gpurag import ExactRetriever, InvalidInputError, get_settings
from gpurag.retriever import plan_chunks
from gpurag.testing.reference import pairwise_reference


def random_data(n: int = 300, d: int = 16, q: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((q, d)).astype(np.float32)


def reference_ids(queries: np.ndarray, vectors: np.ndarray, metric: str, k: int) -> np.ndarray:
    scores = pairwise_reference(queries, vectors, gpurag.Metric(metric))
    key = -scores if gpurag.Metric(metric).higher_is_better else scores
    return np.argsort(key, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("metric", ["l2", "dot", "cosine", "l1"])
def test_search_returns_float32_int64_best_first(metric: str) -> None:
    vectors, queries = random_data()
    index = ExactRetriever(metric=metric, backend="numpy")
    index.add(vectors)
    scores, ids = index.search(queries, k=5)
    assert scores.dtype == np.float32
    assert ids.dtype == np.int64
    assert scores.shape == ids.shape == (7, 5)
    np.testing.assert_array_equal(ids, reference_ids(queries, vectors, metric, 5))
    expected = np.take_along_axis(pairwise_reference(queries, vectors, gpurag.Metric(metric)), ids, 1)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-4)


def test_ids_are_assigned_then_continue_after_the_largest() -> None:
    vectors, _ = random_data(n=10)
    index = ExactRetriever(backend="numpy")
    np.testing.assert_array_equal(index.add(vectors[:4]), [0, 1, 2, 3])
    np.testing.assert_array_equal(index.add(vectors[4:6], ids=[100, 50]), [100, 50])
    np.testing.assert_array_equal(index.add(vectors[6:8]), [101, 102])
    assert len(index) == 8


def test_search_maps_positions_to_the_given_ids() -> None:
    vectors, _ = random_data(n=5, d=4)
    index = ExactRetriever(backend="numpy")
    index.add(vectors, ids=[50, 40, 30, 20, 10])
    _, ids = index.search(vectors[[3]], k=1)
    assert ids[0, 0] == 20


def test_remove_takes_vectors_out_of_results() -> None:
    vectors, _ = random_data(n=6, d=4)
    index = ExactRetriever(backend="numpy")
    index.add(vectors)
    assert index.remove([3, 7]) == 1  # 7 was never there
    assert len(index) == 5
    _, ids = index.search(vectors[[3]], k=5)
    assert 3 not in ids
    assert index.remove(np.array([0, 1, 2, 4, 5])) == 5
    assert len(index) == 0
    index.add(vectors[:2])
    assert len(index) == 2


def test_k_larger_than_the_index_pads_with_minus_one_and_the_worst_value() -> None:
    vectors, queries = random_data(n=3, d=4, q=2)
    for metric, worst in (("l2", np.inf), ("cosine", -np.inf)):
        index = ExactRetriever(metric=metric, backend="numpy")
        index.add(vectors)
        scores, ids = index.search(queries, k=5)
        assert set(ids[:, :3].ravel()) == {0, 1, 2}
        np.testing.assert_array_equal(ids[:, 3:], -1)
        np.testing.assert_array_equal(scores[:, 3:], worst)


@pytest.mark.parametrize("budget", [1, 64, 1000, 10**9])
def test_chunked_search_equals_unchunked_search(budget: int) -> None:
    vectors, queries = random_data(n=257, d=8, q=9, seed=3)
    whole = ExactRetriever(metric="l2", backend="numpy")
    whole.add(vectors)
    chunked = ExactRetriever(metric="l2", backend="numpy", memory_budget_bytes=budget)
    chunked.add(vectors)
    expected = whole.search(queries, k=20)
    got = chunked.search(queries, k=20)
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-6)


@pytest.mark.parametrize(
    ("budget", "queries_as", "out", "one_round_trip"),
    [
        (10**9, "array", "numpy", True),  # one chunk, host answer: the backend's whole search at once
        (64, "array", "numpy", False),  # chunks: sliced and merged, never through host_topk
        (10**9, "list", "numpy", False),  # no shape to plan by: converted first
        (10**9, "array", "device", False),  # the answer stays with the backend
    ],
)
def test_a_one_chunk_search_is_one_host_topk_call(budget: int, queries_as: str, out: str, one_round_trip: bool) -> None:
    from gpurag_numpy.backend import NumpyBackend

    calls: list[str] = []

    class Counting(NumpyBackend):
        def host_topk(self, queries: Any, database: Any, k: int, *, dim: int | None = None) -> Any:
            calls.append("host_topk")
            return super().host_topk(queries, database, k, dim=dim)

        def topk(self, queries: Any, database: Any, k: int) -> Any:
            calls.append("topk")
            return super().topk(queries, database, k)

    vectors, queries = random_data(n=257, d=8, q=9, seed=4)
    index = ExactRetriever(metric="l2", backend=Counting(), memory_budget_bytes=budget)
    index.add(vectors)
    given = queries.tolist() if queries_as == "list" else queries
    _, ids = index.search(given, k=6, out=out)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(index.ids)[reference_ids(queries, vectors, "l2", 6)])
    assert (calls == ["host_topk", "topk"]) if one_round_trip else ("host_topk" not in calls and "topk" in calls)
    with pytest.raises(InvalidInputError, match="queries must be finite"):
        index.search(np.full((2, 8), np.nan, np.float32), k=3)


def test_chunk_plan_respects_the_budget() -> None:
    for queries, rows, budget in [(1000, 200_000, 256 << 20), (5, 3, 1), (4096, 10**7, 1 << 20), (1, 1, 4)]:
        q, r = plan_chunks(queries, rows, budget, 4096)
        assert 1 <= q <= queries
        assert 1 <= r <= rows
        assert q * r * 4 <= max(budget, 4)


def test_a_backend_that_scores_in_tiles_of_its_own_gets_whole_rows() -> None:
    def tiled(queries: int, rows: int) -> int:
        return min(queries * rows, 1 << 20)

    assert plan_chunks(1000, 200_000, 256 << 20, 4096, tiled) == (1000, 200_000)
    q, r = plan_chunks(1000, 200_000, 64, 4096, tiled)  # a tiny budget still bounds it
    assert q == 1
    assert tiled(q, r) * 4 <= 64


def test_input_in_other_layouts_and_types_is_accepted() -> None:
    vectors, queries = random_data(n=20, d=6, q=3)
    expected_index = ExactRetriever(backend="numpy")
    expected_index.add(vectors)
    expected = expected_index.search(queries, 4)
    for converted in (
        vectors.astype(np.float64),
        np.asfortranarray(vectors),
        np.repeat(vectors, 2, axis=1)[:, ::2],  # non-contiguous view
        vectors.tolist(),
    ):
        index = ExactRetriever(backend="numpy")
        index.add(converted)
        np.testing.assert_array_equal(index.search(queries, 4).ids, expected.ids)
    ints = ExactRetriever(backend="numpy")
    ints.add(np.arange(12).reshape(4, 3))
    assert ints.search(np.array([[0, 1, 2]]), 1).ids[0, 0] == 0


def test_torch_tensors_are_accepted() -> None:
    torch = pytest.importorskip("torch")
    vectors, queries = random_data(n=20, d=6, q=3)
    index = ExactRetriever(backend="numpy")
    index.add(torch.from_numpy(vectors))
    np.testing.assert_array_equal(index.search(torch.from_numpy(queries), 2).ids, index.search(queries, 2).ids)


def test_the_index_keeps_its_own_copy_of_the_vectors() -> None:
    vectors, _ = random_data(n=5, d=3)
    index = ExactRetriever(backend="numpy")
    index.add(vectors)
    vectors[:] = 0
    assert np.abs(index.vectors()).sum() > 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ix: ix.search(np.zeros((2, 5)), 1), "queries has dimension 5, the index has 4"),
        (lambda ix: ix.add(np.zeros((2, 5))), "vectors has dimension 5, the index has 4"),
        (lambda ix: ix.search(np.full((1, 4), np.nan), 1), "queries must be finite; row 0, column 0 holds NaN"),
        (lambda ix: ix.add(np.array([[0, 1, np.inf, 0]])), "vectors must be finite; row 0, column 2"),
        (lambda ix: ix.add(np.full((1, 4), 1e300)), "too large for float32"),
        (lambda ix: ix.search(np.zeros((1, 4)), 0), "k must be >= 1; got 0"),
        (lambda ix: ix.search(np.zeros((1, 4)), -3), "k must be >= 1; got -3"),
        (lambda ix: ix.search(np.zeros((1, 4)), 2.5), "k must be an integer >= 1; got 2.5"),
        (lambda ix: ix.search(np.zeros((1, 4)), True), "k must be an integer"),
        (lambda ix: ix.add(np.zeros((2, 4)), ids=[1]), "ids has 1 entries, expected 2"),
        (lambda ix: ix.add(np.zeros((2, 4)), ids=[7, 7]), r"ids must be distinct; repeated: \[7\]"),
        (lambda ix: ix.add(np.zeros((1, 4)), ids=[0]), r"ids are already in the index: \[0\]"),
        (lambda ix: ix.add(np.zeros((1, 4)), ids=[-1]), "ids must be >= 0"),
        (lambda ix: ix.add(np.zeros((1, 4)), ids=["a"]), "ids must be integers"),
        (lambda ix: ix.add(np.array([["a", "b", "c", "d"]])), "vectors must hold real numbers; got dtype <U1"),
        (lambda ix: ix.add(np.zeros((2, 2, 4))), r"vectors must be 2-D \(rows, dim\); got shape \(2, 2, 4\)"),
        (lambda ix: ix.search(np.zeros(4), 1), r"use x.reshape\(1, -1\)"),
        (lambda ix: ix.add(np.zeros((0, 4))), "vectors must have at least one row"),
        (lambda ix: ix.add(np.array([[1 + 2j] * 4])), "vectors must hold real numbers; got dtype complex128"),
        (lambda ix: ix.remove([[1, 2]]), "ids must be 1-D"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_problem(call: object, message: str) -> None:
    index = ExactRetriever(backend="numpy")
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(InvalidInputError, match=message) as caught:
        call(index)  # type: ignore[operator]
    assert isinstance(caught.value, ValueError)
    assert len(index) == 4  # nothing half-added


def test_searching_an_empty_index_is_an_error() -> None:
    index = ExactRetriever(backend="numpy")
    with pytest.raises(InvalidInputError, match="the index is empty"):
        index.search(np.zeros((1, 3)), 1)


def test_unknown_metric_is_an_error() -> None:
    with pytest.raises(InvalidInputError, match="metric must be one of l2, dot, cosine, l1; got 'hamming'"):
        ExactRetriever(metric="hamming", backend="numpy")


def test_metric_names_and_directions() -> None:
    assert gpurag.Metric.parse("L2") is gpurag.Metric.L2
    assert [m.higher_is_better for m in gpurag.Metric] == [False, True, True, False]
    assert gpurag.Metric.DOT.worst == -np.inf
    assert gpurag.Metric.L1.worst == np.inf


# --- k: checked for type and against max_k before anything is allocated -------------------------
@pytest.mark.parametrize("k", [10**8, 2**62, np.uint64(2**63), 65537])
def test_k_above_the_max_k_setting_is_refused_before_anything_is_allocated(k: Any) -> None:
    index = ExactRetriever(backend="numpy")
    index.add(np.eye(4, dtype=np.float32))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInputError, match=r"k must be <= 65536 \(the max_k setting; set GPURAG_MAX_K"):
            index.search(np.zeros((1, 4)), k)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes were allocated before k was refused"


def test_max_k_can_be_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    index = ExactRetriever(backend="numpy")
    index.add(np.random.default_rng(0).standard_normal((70000, 2)))
    with pytest.raises(InvalidInputError, match="max_k"):
        index.search(np.zeros((1, 2)), 70000)
    monkeypatch.setenv("GPURAG_MAX_K", "100000")
    get_settings.cache_clear()
    try:
        assert index.search(np.zeros((1, 2)), 70000).ids.shape == (1, 70000)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


@pytest.mark.parametrize("k", [np.int8(3), np.uint64(3), np.int64(3), 3])
def test_k_of_any_integer_type_is_accepted(k: Any) -> None:
    index = ExactRetriever(backend="numpy")
    index.add(np.eye(4, dtype=np.float32))
    assert index.search(np.zeros((1, 4)), k).ids.shape == (1, 3)


@pytest.mark.parametrize("k", [3.0, np.float32(3), True, np.bool_(True), "3", None])
def test_k_that_is_not_an_integer_is_refused_naming_its_type(k: Any) -> None:
    index = ExactRetriever(backend="numpy")
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(InvalidInputError, match=r"k must be an integer >= 1; got .* \("):
        index.search(np.zeros((1, 4)), k)


# --- ids: integer dtypes only, within int64 ------------------------------------------------------
@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([1.0, 2.0], "ids must be integers .*got dtype float64"),
        (np.array([2**53 + 1, 3], dtype=np.float64), "ids must be integers .*got dtype float64"),
        ([2**63, 5], "outside the int64 range: 9223372036854775808"),
        (np.array([2**64 - 1, 5], dtype=np.uint64), "above the int64 range"),
        ([2**70, 5], "outside the int64 range"),
        ([True, False], "ids must be integers .*got dtype bool"),
        (3.0, "ids must be integers; got 3.0 \\(float\\)"),
    ],
)
def test_ids_that_are_not_int64_integers_are_refused_naming_the_argument(ids: Any, message: str) -> None:
    index = ExactRetriever(backend="numpy")
    vectors = np.eye(2, dtype=np.float32) if not np.isscalar(ids) else np.eye(1, 2, dtype=np.float32)
    with pytest.raises(InvalidInputError, match=message):
        index.add(vectors, ids=ids)
    with pytest.raises(InvalidInputError, match=message):
        index.remove(ids)


def test_automatic_ids_past_the_int64_range_are_refused_naming_ids() -> None:
    index = ExactRetriever(backend="numpy")
    index.add(np.ones((1, 2)), ids=[2**63 - 2])
    index.add(np.ones((1, 2)))  # takes 2**63 - 1, the last one
    with pytest.raises(InvalidInputError, match=r"ids: the next 1 automatic ids would pass 9223372036854775807"):
        index.add(np.ones((1, 2)))
    assert len(index) == 2


@pytest.mark.parametrize(("option", "value"), [("memory_budget_bytes", "x"), ("memory_budget_bytes", 0), ("dim", 2.0)])
def test_constructor_options_are_checked_naming_them(option: str, value: Any) -> None:
    with pytest.raises(InvalidInputError, match=f"{option} must be (an integer )?>= 1"):
        ExactRetriever(backend="numpy", **{option: value})


# --- add and remove: amortised O(rows changed), results right after churn -------------------------
def test_add_grows_the_capacity_by_doubling_and_remove_moves_the_last_rows_into_the_holes() -> None:
    index = ExactRetriever(backend="numpy")
    index.add(np.arange(40, dtype=np.float32).reshape(20, 2))
    database = index._database
    assert database is not None
    index.add(np.ones((1, 2)))
    grown = index._database
    assert grown is not None
    assert grown.capacity == 40, "the first add past the rows doubles the capacity"
    storage_before = grown.storage["vectors"]
    for _ in range(10):
        index.add(np.ones((1, 2)))
    assert index._database is not None
    assert index._database.storage["vectors"] is storage_before, "adds within the capacity copy nothing"
    assert index.remove([3, 7]) == 2
    ids = index.ids
    assert (ids[3], ids[7]) == (29, 30), f"the last rows fill the holes; got {ids[:10]}"
    np.testing.assert_array_equal(index.vectors()[3], np.ones(2))
    assert len(index) == 29


def test_remove_work_is_proportional_to_the_ids_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    index = ExactRetriever(backend="numpy")
    index.add(np.random.default_rng(0).standard_normal((5000, 4)))
    moved: list[int] = []
    original = index.backend.move_rows

    def counting(database: Any, moves: Any) -> Any:
        moved.append(int(moves.sources.size))
        return original(database, moves)

    monkeypatch.setattr(index.backend, "move_rows", counting)
    monkeypatch.setattr(index.backend, "take", lambda *a: pytest.fail("remove must not rebuild the database"))
    monkeypatch.setattr(index.backend, "prepare", lambda *a: pytest.fail("remove must not prepare rows again"))
    assert index.remove([10, 20, 4999]) == 3
    assert moved == [2]  # two holes before the end, filled by the two last live rows
