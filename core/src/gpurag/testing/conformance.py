"""`BackendConformance`: the contract every distance backend is tested against.

A backend's test module subclasses it in a few lines; hypothesis and the float64 reference do the rest::

    from gpurag.testing.conformance import BackendConformance

    class TestNumpy(BackendConformance):
        backend_name = "numpy"

    class TestTorch(BackendConformance):
        backend_name = "torch"
        devices = ("cpu", "cuda")      # cuda runs are marked `gpu` and skipped where unavailable

The backend comes from `gpurag.get_backend(backend_name, device=...)`, so the test also proves that
the plugin is registered. Each test is named for the rule it checks. Answers are compared with
`gpurag.testing.reference`: ids exact except among scores within float32 tolerance of each other,
scores float32-accurate. Needs the ``test`` extra (pytest, hypothesis).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpurag
from gpurag.backend import Availability, Database, DistanceBackend, RowMoves
from gpurag.errors import BackendUnavailableError
from gpurag.metrics import Metric, SearchResult, TopK
from gpurag.testing import reference as ref
from gpurag.testing import strategies as gst

FloatMatrix = npt.NDArray[np.float32]

_HEALTH = [HealthCheck.differing_executors, HealthCheck.too_slow, HealthCheck.data_too_large]
#: Hypothesis settings for the kit's tests: modest, so a backend's whole suite runs in seconds.
FEW = settings(max_examples=15, deadline=None, suppress_health_check=_HEALTH)
SOME = settings(max_examples=30, deadline=None, suppress_health_check=_HEALTH)

ALL_METRICS = list(Metric)


class BackendConformance:
    """Tests every `DistanceBackend` must pass; subclass and set `backend_name` (and `devices`)."""

    #: The name the backend is registered under.
    backend_name: ClassVar[str] = ""
    #: Devices to run on; ``cuda`` ones are marked ``gpu`` and skipped when the backend is unavailable.
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    #: ``memory_budget_bytes`` for the retriever tests: tiny, so every search crosses chunk boundaries.
    tiny_memory_budget_bytes: ClassVar[int] = 64
    #: Most (query, row) pairs one boundary case may hold; declared boundaries beyond it are not crossed.
    max_boundary_pairs: ClassVar[int] = 1 << 22
    #: Most rows one boundary case may hold.
    max_boundary_rows: ClassVar[int] = 1 << 21

    # --- fixtures ------------------------------------------------------------------------------
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Run every test once per device in `devices`."""
        if "device" in metafunc.fixturenames:
            params = [
                pytest.param(d, id=d, marks=[pytest.mark.gpu] if d.startswith("cuda") else []) for d in self.devices
            ]
            metafunc.parametrize("device", params, scope="class")

    @classmethod
    def make_backend(cls, device: str) -> DistanceBackend:
        """The backend under test, looked up by name; skipped with the reason when it cannot run here."""
        if not cls.backend_name:
            raise TypeError(f"{cls.__name__} must set backend_name")
        try:
            return gpurag.get_backend(cls.backend_name, device=device)
        except BackendUnavailableError as exc:
            pytest.skip(f"backend {cls.backend_name!r} on {device}: {exc}")

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, device: str) -> DistanceBackend:
        """The backend under test on one device."""
        return cls.make_backend(device)

    # --- helpers -------------------------------------------------------------------------------
    @staticmethod
    def require(backend: DistanceBackend, metric: Metric) -> None:
        """Skip when ``backend`` does not support ``metric``."""
        if metric not in type(backend).metrics:
            pytest.skip(f"backend {backend.name!r} does not support metric {metric.value}")

    @staticmethod
    def draw_case(
        backend: DistanceBackend, data: st.DataObject, **options: Any
    ) -> tuple[Metric, FloatMatrix, FloatMatrix]:
        """A metric the backend supports and a (queries, vectors) data set drawn with ``options``."""
        metric = data.draw(gst.metrics(type(backend).metrics), label="metric")
        queries, vectors = data.draw(gst.datasets(**options), label="queries, vectors")
        return metric, queries, vectors

    @staticmethod
    def host_topk(backend: DistanceBackend, result: TopK, n_queries: int, k: int) -> tuple[Any, Any]:
        """``result`` on the host, checked to be float32 scores and int64 indices of shape (Q, k)."""
        assert isinstance(result, tuple), f"topk must return a TopK; got {type(result).__name__}"
        scores = np.asarray(backend.to_numpy(result.scores))
        indices = np.asarray(backend.to_numpy(result.indices))
        assert scores.dtype == np.float32, f"topk scores must be float32; got {scores.dtype}"
        assert indices.dtype == np.int64, f"topk indices must be int64; got {indices.dtype}"
        assert scores.shape == (n_queries, k), f"topk scores have shape {scores.shape}, expected {(n_queries, k)}"
        assert indices.shape == (n_queries, k), f"topk indices have shape {indices.shape}, expected {(n_queries, k)}"
        return scores, indices

    def prepared(self, backend: DistanceBackend, vectors: FloatMatrix, metric: Metric) -> Database:
        """``vectors`` prepared for ``metric``, checked to hold every row."""
        database = backend.prepare(backend.asarray(vectors, "vectors"), metric)
        assert database.count == vectors.shape[0], f"prepared {database.count} rows of {vectors.shape[0]}"
        assert database.dim == vectors.shape[1], f"prepared dimension {database.dim}, expected {vectors.shape[1]}"
        assert database.metric is metric, f"prepared for {database.metric}, expected {metric}"
        return database

    def search(self, backend: DistanceBackend, queries: FloatMatrix, database: Database, k: int) -> tuple[Any, Any]:
        """`DistanceBackend.topk` on the host, types and shapes checked."""
        result = backend.topk(backend.asarray(queries, "queries"), database, k)
        return self.host_topk(backend, result, queries.shape[0], k)

    def check_topk(
        self, backend: DistanceBackend, queries: FloatMatrix, vectors: FloatMatrix, metric: Metric, k: int
    ) -> None:
        """prepare + topk over ``vectors`` agrees with the float64 reference."""
        database = self.prepared(backend, vectors, metric)
        scores, indices = self.search(backend, queries, database, k)
        ref.assert_topk_matches(queries, vectors, metric, scores, indices, k)

    def retriever(self, backend: DistanceBackend, metric: Metric) -> Any:
        """An `ExactRetriever` on ``backend`` whose memory budget forces many chunks."""
        return gpurag.ExactRetriever(
            metric=metric.value, backend=backend, memory_budget_bytes=self.tiny_memory_budget_bytes
        )

    @staticmethod
    def host_search_result(result: Any, n_queries: int, k: int) -> tuple[Any, Any]:
        """A retriever's `SearchResult`, checked to be float32 / int64 NumPy arrays of shape (Q, k)."""
        assert isinstance(result, SearchResult), f"search must return a SearchResult; got {type(result).__name__}"
        scores, ids = result
        assert isinstance(scores, np.ndarray), f"search scores must be a NumPy array; got {type(scores).__name__}"
        assert isinstance(ids, np.ndarray), f"search ids must be a NumPy array; got {type(ids).__name__}"
        assert scores.dtype == np.float32, f"search scores must be float32; got {scores.dtype}"
        assert ids.dtype == np.int64, f"search ids must be int64; got {ids.dtype}"
        assert scores.shape == ids.shape == (n_queries, k), f"search shapes {scores.shape}, {ids.shape}"
        return scores, ids

    def max_k(self, backend: DistanceBackend, n_rows: int) -> int:
        """The largest k one `topk` call may be asked for over ``n_rows`` rows."""
        limit = type(backend).max_k
        return n_rows if limit is None else min(n_rows, limit)

    def boundary_cases(self, backend: DistanceBackend, metric: Metric, dim: int) -> list[tuple[int, int]]:
        """(queries, rows) shapes that together cross every boundary `DistanceBackend.boundaries` declares.

        Query counts are 1, 3 and one past each query boundary declared for one query; each gets a
        row count past its largest declared row boundary and past twice its smallest (so that a row
        split into two parts still crosses a block in each), within `max_boundary_pairs` and `max_boundary_rows`.
        """
        query_counts = {1, 3}
        for b in backend.boundaries(metric, 1, dim).queries:
            if 0 < b < self.max_boundary_pairs:
                query_counts.add(b + 1)
        cases = []
        for q in sorted(query_counts):
            found = backend.boundaries(metric, q, dim)
            limit = max(2, min(self.max_boundary_rows, self.max_boundary_pairs // q))
            reachable = [b for b in found.rows if 0 < b < limit]
            rows = max(2 * min(reachable) + 37, max(reachable) + 37) if reachable else 37
            cases.append((q, min(rows, limit)))
        return cases

    @staticmethod
    def boundary_data(rng: np.random.Generator, queries: int, rows: int, dim: int) -> tuple[Any, Any]:
        """Gaussian (queries, rows) data with ties across blocks and a last row some query must find.

        The first rows, a middle one and the one before last repeat row 0, and query 0 lies near row
        0, so it ties with many rows in the first block (uneven candidate counts per query) and with
        rows in later blocks. The last row is long and unique, and the last query equals it.
        """
        vectors = rng.standard_normal((rows, dim)).astype(np.float32)
        vectors[1 : 1 + min(120, rows // 10)] = vectors[0]
        vectors[rows // 2] = vectors[0]
        if rows > 2:
            vectors[-2] = vectors[0]
            vectors[-1] *= np.float32(4.0)
        q = rng.standard_normal((queries, dim)).astype(np.float32)
        q[0] = vectors[0] + np.float32(0.01)
        if queries > 1:
            q[-1] = vectors[-1]
        return q, vectors

    # --- identity ------------------------------------------------------------------------------
    def test_backend_is_registered_under_its_name_and_available(self, backend: DistanceBackend, device: str) -> None:
        assert isinstance(backend, DistanceBackend)
        assert type(backend).name == self.backend_name
        assert backend.name == self.backend_name
        availability = type(backend).availability()
        assert isinstance(availability, Availability)
        assert availability.available, availability.reason
        assert str(backend.device).split(":")[0] == device.split(":")[0]
        assert device.split(":")[0] in type(backend).device_kinds

    # --- pairwise ------------------------------------------------------------------------------
    @SOME
    @given(data=st.data())
    def test_pairwise_matches_float64_reference_for_every_metric(
        self, backend: DistanceBackend, data: st.DataObject
    ) -> None:
        metric, queries, vectors = self.draw_case(backend, data)
        before = (queries.copy(), vectors.copy())
        result = backend.pairwise(backend.asarray(queries, "queries"), backend.asarray(vectors, "vectors"), metric)
        ref.assert_pairwise_matches(queries, vectors, metric, backend.to_numpy(result))
        np.testing.assert_array_equal(queries, before[0], err_msg="pairwise changed its queries")
        np.testing.assert_array_equal(vectors, before[1], err_msg="pairwise changed its vectors")

    def test_cosine_similarity_with_a_zero_vector_is_zero(self, backend: DistanceBackend) -> None:
        self.require(backend, Metric.COSINE)
        vectors = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [-3.0, 0.0, 4.0]], np.float32)
        queries = np.array([[0.0, 0.0, 0.0], [2.0, 4.0, 4.0]], np.float32)
        result = backend.to_numpy(
            backend.pairwise(backend.asarray(queries, "queries"), backend.asarray(vectors, "vectors"), Metric.COSINE)
        )
        ref.assert_pairwise_matches(queries, vectors, Metric.COSINE, result)
        zero = np.zeros((2, 4), dtype=bool)
        zero[0, :] = True
        zero[:, [0, 2]] = True
        assert np.all(result[zero] == 0.0), f"cosine with a zero vector must be exactly 0; got\n{result}"
        database = self.prepared(backend, vectors, Metric.COSINE)
        scores, indices = self.search(backend, queries, database, 4)
        assert np.isfinite(scores).all(), f"cosine top-k with zero vectors must be finite; got\n{scores}"
        ref.assert_topk_matches(queries, vectors, Metric.COSINE, scores, indices, 4)

    # --- topk ----------------------------------------------------------------------------------
    @SOME
    @given(data=st.data())
    def test_topk_matches_float64_reference_up_to_ties(self, backend: DistanceBackend, data: st.DataObject) -> None:
        metric, queries, vectors = self.draw_case(backend, data)
        k = data.draw(gst.ks(vectors.shape[0], max_k=self.max_k(backend, vectors.shape[0])), label="k")
        before = (queries.copy(), vectors.copy())
        self.check_topk(backend, queries, vectors, metric, k)
        np.testing.assert_array_equal(queries, before[0], err_msg="topk changed its queries")
        np.testing.assert_array_equal(vectors, before[1], err_msg="prepare changed its vectors")

    @FEW
    @given(data=st.data())
    def test_topk_matches_reference_in_higher_dimensions(self, backend: DistanceBackend, data: st.DataObject) -> None:
        metric = data.draw(gst.metrics(type(backend).metrics), label="metric")
        dim = data.draw(st.sampled_from([17, 64, 100]), label="dim")
        queries, vectors = data.draw(gst.datasets(max_rows=40, dim=dim, kinds=("floats",)), label="queries, vectors")
        k = data.draw(gst.ks(vectors.shape[0], max_k=self.max_k(backend, vectors.shape[0])), label="k")
        self.check_topk(backend, queries, vectors, metric, k)

    @pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
    def test_topk_on_gaussian_data_matches_reference(self, backend: DistanceBackend, metric: Metric) -> None:
        self.require(backend, metric)
        rng = np.random.default_rng(20240601)
        vectors = rng.standard_normal((300, 48)).astype(np.float32)
        vectors[1] = vectors[0] + np.float32(1e-6)  # a near-duplicate
        queries = rng.standard_normal((7, 48)).astype(np.float32)
        queries[0] = vectors[5]
        self.check_topk(backend, queries, vectors, metric, min(10, self.max_k(backend, 300)))

    @pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
    def test_topk_across_every_declared_boundary_matches_reference(
        self, backend: DistanceBackend, metric: Metric
    ) -> None:
        """Blocks, tiles, thread splits and chunks the backend declares are each crossed and checked."""
        self.require(backend, metric)
        rng = np.random.default_rng(12)
        dim = 4
        for n_queries, n_rows in self.boundary_cases(backend, metric, dim):
            queries, vectors = self.boundary_data(rng, n_queries, n_rows, dim)
            database = self.prepared(backend, vectors, metric)
            for k in sorted({1, min(10, self.max_k(backend, n_rows))}):
                scores, indices = self.search(backend, queries, database, k)
                label = f"{metric.value}, {n_queries} queries x {n_rows} rows, k={k}"
                ref.assert_topk_matches(queries, vectors, metric, scores, indices, k, label=label)

    def test_topk_of_dot_products_whose_float32_terms_overflow_matches_reference(
        self, backend: DistanceBackend
    ) -> None:
        """Terms near 1e40 that cancel: float32 products overflow, so a backend must widen (float64 tiles)."""
        self.require(backend, Metric.DOT)
        rng = np.random.default_rng(13)
        n_queries, n_rows = self.boundary_cases(backend, Metric.DOT, 4)[-1]
        n_queries, n_rows = min(n_queries, 64), min(n_rows, 5000)
        big = np.float32(1e20)
        queries = np.zeros((n_queries, 4), np.float32)
        queries[:, :2] = big * rng.uniform(0.5, 1.0, (n_queries, 1)).astype(np.float32)
        queries[:, 2:] = rng.standard_normal((n_queries, 2)).astype(np.float32)
        vectors = np.zeros((n_rows, 4), np.float32)
        vectors[:, 0] = big * rng.uniform(0.5, 1.0, n_rows).astype(np.float32)
        vectors[:, 1] = -vectors[:, 0] + np.float32(1e17) * rng.standard_normal(n_rows).astype(np.float32)
        vectors[:, 2:] = rng.standard_normal((n_rows, 2)).astype(np.float32)
        database = self.prepared(backend, vectors, Metric.DOT)
        k = min(5, self.max_k(backend, n_rows))
        scores, indices = self.search(backend, queries, database, k)
        ref.assert_topk_matches(queries, vectors, Metric.DOT, scores, indices, k, label="float32 terms overflow")

    @pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
    def test_topk_with_k_one_returns_the_nearest_row(self, backend: DistanceBackend, metric: Metric) -> None:
        self.require(backend, metric)
        vectors = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [-2.0, -2.0], [5.0, 5.0]], np.float32)
        queries = np.array([[0.9, 0.1], [-1.0, -1.5], [0.5, 4.0]], np.float32)
        self.check_topk(backend, queries, vectors, metric, 1)

    @pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
    def test_topk_with_k_equal_to_the_row_count_returns_every_row_once(
        self, backend: DistanceBackend, metric: Metric
    ) -> None:
        self.require(backend, metric)
        rng = np.random.default_rng(7)
        vectors = rng.standard_normal((9, 5)).astype(np.float32)
        queries = rng.standard_normal((3, 5)).astype(np.float32)
        k = self.max_k(backend, 9)
        database = self.prepared(backend, vectors, metric)
        scores, indices = self.search(backend, queries, database, k)
        ref.assert_topk_matches(queries, vectors, metric, scores, indices, k)
        if k == 9:
            for row in indices:
                assert sorted(row.tolist()) == list(range(9)), f"k = N must return every row once; got {row}"

    @pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
    def test_topk_over_a_single_row(self, backend: DistanceBackend, metric: Metric) -> None:
        self.require(backend, metric)
        vectors = np.array([[1.5, -2.0, 0.5]], np.float32)
        queries = np.array([[0.0, 0.0, 0.0], [1.5, -2.0, 0.5], [-4.0, 1.0, 2.0]], np.float32)
        self.check_topk(backend, queries, vectors, metric, 1)

    @pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
    def test_topk_in_dimension_one(self, backend: DistanceBackend, metric: Metric) -> None:
        self.require(backend, metric)
        vectors = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [2.0], [3.0]], np.float32)
        queries = np.array([[-1.5], [0.0], [2.0], [7.0]], np.float32)
        for k in range(1, self.max_k(backend, 7) + 1):
            self.check_topk(backend, queries, vectors, metric, k)

    @pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
    def test_topk_among_exact_ties_returns_tied_rows_in_any_order(
        self, backend: DistanceBackend, metric: Metric
    ) -> None:
        self.require(backend, metric)
        vectors = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [2, 2], [0, 0]], np.float32)
        queries = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
        database = self.prepared(backend, vectors, metric)
        scores, indices = self.search(backend, queries, database, 3)
        ref.assert_topk_matches(queries, vectors, metric, scores, indices, 3)
        if metric in (Metric.L2, Metric.L1, Metric.COSINE):
            assert set(indices[0].tolist()) == {0, 2, 3}, f"the three rows equal to the query tie; got {indices[0]}"

    # --- the database: prepare, append, take, slice ---------------------------------------------
    @FEW
    @given(data=st.data())
    def test_prepare_keeps_every_row_unchanged(self, backend: DistanceBackend, data: st.DataObject) -> None:
        metric = data.draw(gst.metrics(type(backend).metrics), label="metric")
        _, vectors = data.draw(gst.datasets(max_queries=1), label="vectors")
        database = self.prepared(backend, vectors, metric)
        np.testing.assert_array_equal(backend.to_numpy(database.vectors), vectors)

    @FEW
    @given(data=st.data())
    def test_topk_after_append_matches_reference_over_all_rows(
        self, backend: DistanceBackend, data: st.DataObject
    ) -> None:
        metric, queries, vectors = self.draw_case(backend, data, min_rows=2)
        n_rows = vectors.shape[0]
        split = data.draw(st.integers(1, n_rows - 1), label="split")
        database = self.prepared(backend, vectors[:split], metric)
        database = backend.append(database, backend.asarray(vectors[split:], "vectors"))
        assert database.count == n_rows, f"append kept {database.count} rows, expected {n_rows}"
        k = data.draw(gst.ks(n_rows, max_k=self.max_k(backend, n_rows)), label="k")
        scores, indices = self.search(backend, queries, database, k)
        ref.assert_topk_matches(queries, vectors, metric, scores, indices, k, label="after append")

    @FEW
    @given(data=st.data())
    def test_topk_after_take_matches_reference_over_the_taken_rows_in_order(
        self, backend: DistanceBackend, data: st.DataObject
    ) -> None:
        metric, queries, vectors = self.draw_case(backend, data)
        n_rows = vectors.shape[0]
        positions = np.array(
            data.draw(st.lists(st.integers(0, n_rows - 1), min_size=1, max_size=n_rows, unique=True), label="take"),
            dtype=np.int64,
        )
        database = self.prepared(backend, vectors, metric)
        taken = backend.take(database, positions)
        assert taken.count == positions.size, f"take kept {taken.count} rows, expected {positions.size}"
        assert database.count == n_rows, "take changed the database it was given"
        k = data.draw(gst.ks(positions.size, max_k=self.max_k(backend, positions.size)), label="k")
        scores, indices = self.search(backend, queries, taken, k)
        ref.assert_topk_matches(queries, vectors[positions], metric, scores, indices, k, label="after take")
        scores, indices = self.search(backend, queries, database, 1)
        ref.assert_topk_matches(queries, vectors, metric, scores, indices, 1, label="the original, after take")

    @FEW
    @given(data=st.data())
    def test_topk_after_slice_matches_reference_over_rows_start_to_stop(
        self, backend: DistanceBackend, data: st.DataObject
    ) -> None:
        metric, queries, vectors = self.draw_case(backend, data)
        n_rows = vectors.shape[0]
        start = data.draw(st.integers(0, n_rows - 1), label="start")
        stop = data.draw(st.integers(start + 1, n_rows), label="stop")
        database = self.prepared(backend, vectors, metric)
        part = backend.slice(database, start, stop)
        assert part.count == stop - start, f"slice({start}, {stop}) holds {part.count} rows"
        k = data.draw(gst.ks(stop - start, max_k=self.max_k(backend, stop - start)), label="k")
        scores, indices = self.search(backend, queries, part, k)
        ref.assert_topk_matches(queries, vectors[start:stop], metric, scores, indices, k, label="after slice")

    @pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
    def test_append_and_move_rows_under_random_churn_match_reference(
        self, backend: DistanceBackend, metric: Metric
    ) -> None:
        """Rows appended in place, holes filled by moving the last rows: the database holds the model's rows."""
        self.require(backend, metric)
        rng = np.random.default_rng(14)
        dim = 5
        model = rng.standard_normal((3, dim)).astype(np.float32)
        database = self.prepared(backend, model, metric)
        queries = rng.standard_normal((3, dim)).astype(np.float32)
        for step in range(60):
            if rng.random() < 0.6 or model.shape[0] < 4:
                new = rng.standard_normal((int(rng.integers(1, 30)), dim)).astype(np.float32)
                if rng.random() < 0.3:
                    new[0] = model[0]  # an exact tie with an older row
                database = backend.append(database, backend.asarray(new, "vectors"))
                model = np.concatenate([model, new])
            else:
                removed = rng.choice(model.shape[0], size=int(rng.integers(1, model.shape[0] // 2 + 1)), replace=False)
                moves = RowMoves.plan(model.shape[0], removed)
                database = backend.move_rows(database, moves)
                model[moves.destinations] = model[moves.sources]
                model = model[: moves.count]
            assert database.count == model.shape[0], (
                f"step {step}: {database.count} rows, the model has {model.shape[0]}"
            )
            if step % 6 == 5:
                held = np.asarray(backend.to_numpy(database.vectors))
                np.testing.assert_array_equal(held, model, err_msg=f"step {step}: rows differ from the model")
                k = min(7, self.max_k(backend, model.shape[0]))
                scores, indices = self.search(backend, queries, database, k)
                ref.assert_topk_matches(queries, model, metric, scores, indices, k, label=f"churn step {step}")

    @pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
    def test_append_keeps_the_rows_of_the_database_it_was_given(self, backend: DistanceBackend, metric: Metric) -> None:
        self.require(backend, metric)
        rng = np.random.default_rng(15)
        first = rng.standard_normal((20, 3)).astype(np.float32)
        database = self.prepared(backend, first, metric)
        grown = database
        for _ in range(5):
            grown = backend.append(grown, backend.asarray(rng.standard_normal((9, 3)).astype(np.float32), "vectors"))
        assert database.count == 20, "append changed the row count of the database it was given"
        np.testing.assert_array_equal(np.asarray(backend.to_numpy(database.vectors)), first)
        scores, indices = self.search(backend, first[:2], database, 3)
        ref.assert_topk_matches(first[:2], first, metric, scores, indices, 3, label="the database before append")

    # --- merging partial results ---------------------------------------------------------------
    @FEW
    @given(data=st.data())
    def test_merge_topk_of_two_slices_matches_topk_of_all_rows(
        self, backend: DistanceBackend, data: st.DataObject
    ) -> None:
        metric, queries, vectors = self.draw_case(backend, data, min_rows=2)
        n_rows = vectors.shape[0]
        split = data.draw(st.integers(1, n_rows - 1), label="split")
        k = data.draw(gst.ks(n_rows, max_k=self.max_k(backend, n_rows)), label="k")
        database = self.prepared(backend, vectors, metric)
        q = backend.asarray(queries, "queries")
        first = backend.topk(q, backend.slice(database, 0, split), min(k, split))
        second = backend.topk(q, backend.slice(database, split, n_rows), min(k, n_rows - split))
        second = TopK(second.scores, second.indices + split)
        merged = backend.merge_topk(first, second, k, metric)
        scores, indices = self.host_topk(backend, merged, queries.shape[0], k)
        ref.assert_topk_matches(queries, vectors, metric, scores, indices, k, label="merged")

    @pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
    def test_merge_topk_keeps_the_first_result_among_ties(self, backend: DistanceBackend, metric: Metric) -> None:
        self.require(backend, metric)
        vectors = np.tile(np.array([[1.0, 2.0]], np.float32), (4, 1))
        queries = np.array([[0.5, -1.0], [1.0, 2.0]], np.float32)
        database = self.prepared(backend, vectors, metric)
        q = backend.asarray(queries, "queries")
        first = backend.topk(q, backend.slice(database, 0, 2), 2)
        second = backend.topk(q, backend.slice(database, 2, 4), 2)
        second = TopK(second.scores, second.indices + 2)
        for a, b, winners in ((first, second, {0, 1}), (second, first, {2, 3})):
            _, indices = self.host_topk(backend, backend.merge_topk(a, b, 2, metric), 2, 2)
            for row in indices:
                assert set(row.tolist()) == winners, (
                    f"merge_topk must keep the first result's ties {winners}; got {row}"
                )

    # --- through the retriever: chunking, padding, ids -----------------------------------------
    @SOME
    @given(data=st.data())
    def test_retriever_search_across_chunk_boundaries_matches_reference(
        self, backend: DistanceBackend, data: st.DataObject
    ) -> None:
        metric, queries, vectors = self.draw_case(backend, data, max_queries=6)
        k = data.draw(gst.ks(vectors.shape[0], beyond=3), label="k")
        index = self.retriever(backend, metric)
        index.add(vectors)
        assert len(index) == vectors.shape[0]
        scores, ids = self.host_search_result(index.search(queries, k), queries.shape[0], k)
        ref.assert_topk_matches(queries, vectors, metric, scores, ids, k, label=f"retriever {metric.value}")

    @pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
    def test_retriever_pads_past_the_index_size_with_id_minus_one_and_the_worst_value(
        self, backend: DistanceBackend, metric: Metric
    ) -> None:
        self.require(backend, metric)
        vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
        queries = np.array([[1.0, 0.2], [0.0, 0.0]], np.float32)
        index = self.retriever(backend, metric)
        index.add(vectors)
        scores, ids = self.host_search_result(index.search(queries, 6), 2, 6)
        assert (ids[:, 3:] == -1).all(), f"ids past the 3 rows must be -1; got\n{ids}"
        assert (scores[:, 3:] == np.float32(metric.worst)).all(), f"scores past the 3 rows must be {metric.worst}"
        ref.assert_topk_matches(queries, vectors, metric, scores, ids, 6)

    @FEW
    @given(data=st.data())
    def test_retriever_returns_the_ids_given_to_add(self, backend: DistanceBackend, data: st.DataObject) -> None:
        metric, queries, vectors = self.draw_case(backend, data, min_rows=2)
        n_rows = vectors.shape[0]
        row_ids = np.array(
            data.draw(st.lists(st.integers(0, 2**40), min_size=n_rows, max_size=n_rows, unique=True), label="ids"),
            dtype=np.int64,
        )
        split = data.draw(st.integers(1, n_rows - 1), label="split")
        k = data.draw(gst.ks(n_rows, beyond=2), label="k")
        index = self.retriever(backend, metric)
        index.add(vectors[:split], ids=row_ids[:split])
        index.add(vectors[split:], ids=row_ids[split:])
        assert len(index) == n_rows
        scores, ids = self.host_search_result(index.search(queries, k), queries.shape[0], k)
        ref.assert_topk_matches(queries, vectors, metric, scores, ids, k, row_ids=row_ids, label="retriever ids")

    @FEW
    @given(data=st.data())
    def test_retriever_search_never_returns_a_removed_id(self, backend: DistanceBackend, data: st.DataObject) -> None:
        metric, queries, vectors = self.draw_case(backend, data, min_rows=2)
        n_rows = vectors.shape[0]
        removed = data.draw(st.lists(st.integers(0, n_rows - 1), min_size=1, max_size=n_rows - 1, unique=True))
        kept = np.array([i for i in range(n_rows) if i not in set(removed)], dtype=np.int64)
        k = data.draw(gst.ks(kept.size, beyond=2), label="k")
        index = self.retriever(backend, metric)
        index.add(vectors)
        index.remove(removed)
        assert len(index) == kept.size
        scores, ids = self.host_search_result(index.search(queries, k), queries.shape[0], k)
        ref.assert_topk_matches(queries, vectors[kept], metric, scores, ids, k, row_ids=kept, label="after remove")

    @pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
    def test_retriever_search_after_random_add_remove_churn_matches_reference(
        self, backend: DistanceBackend, metric: Metric
    ) -> None:
        self.require(backend, metric)
        rng = np.random.default_rng(16)
        dim = 6
        index = gpurag.ExactRetriever(metric=metric.value, backend=backend)
        held: dict[int, Any] = {}
        queries = rng.standard_normal((4, dim)).astype(np.float32)
        for step in range(80):
            if rng.random() < 0.55 or len(held) < 5:
                new = rng.standard_normal((int(rng.integers(1, 40)), dim)).astype(np.float32)
                for user_id, row in zip(index.add(new).tolist(), new, strict=True):
                    held[user_id] = row
            else:
                present = np.array(sorted(held), dtype=np.int64)
                gone = rng.choice(present, size=int(rng.integers(1, len(present) // 2 + 1)), replace=False)
                absent = np.array([-5, 10**12], dtype=np.int64)
                assert index.remove(np.concatenate([gone, absent])) == gone.size
                for user_id in gone.tolist():
                    del held[user_id]
            assert len(index) == len(held)
            if step % 8 == 7:
                row_ids = np.array(sorted(held), dtype=np.int64)
                vectors = np.stack([held[i] for i in row_ids.tolist()])
                order = np.argsort(index.ids)
                np.testing.assert_array_equal(index.ids[order], row_ids, err_msg=f"step {step}: ids")
                np.testing.assert_array_equal(index.vectors()[order], vectors, err_msg=f"step {step}: vectors")
                k = min(9, self.max_k(backend, row_ids.size))
                scores, ids = self.host_search_result(index.search(queries, k), queries.shape[0], k)
                ref.assert_topk_matches(queries, vectors, metric, scores, ids, k, row_ids=row_ids, label=f"step {step}")

    # --- LSH primitives ------------------------------------------------------------------------
    @SOME
    @given(data=st.data())
    def test_sign_codes_match_the_bit_by_bit_reference(self, backend: DistanceBackend, data: st.DataObject) -> None:
        vectors, planes = data.draw(gst.lsh_cases(), label="vectors, planes")
        codes = backend.sign_codes(backend.asarray(vectors, "vectors"), backend.asarray(planes, "planes"))
        ref.assert_sign_codes_match(vectors, planes, backend.to_numpy(codes))

    @pytest.mark.parametrize("n_bits", [1, 7, 8, 9, 13, 63, 64, 65, 70])
    def test_sign_codes_pack_bit_j_into_byte_j_div_8_and_leave_unused_bits_zero(
        self, backend: DistanceBackend, n_bits: int
    ) -> None:
        rng = np.random.default_rng(n_bits)
        planes = rng.standard_normal((n_bits, 4)).astype(np.float32)
        vectors = rng.standard_normal((6, 4)).astype(np.float32)
        codes = np.asarray(
            backend.to_numpy(backend.sign_codes(backend.asarray(vectors, "vectors"), backend.asarray(planes, "planes")))
        )
        ref.assert_sign_codes_match(vectors, planes, codes)
        identity = np.eye(n_bits, dtype=np.float32)
        pattern = np.where(rng.random((5, n_bits)) < 0.5, 1.0, -1.0).astype(np.float32)
        codes = np.asarray(
            backend.to_numpy(
                backend.sign_codes(backend.asarray(pattern, "vectors"), backend.asarray(identity, "planes"))
            )
        )
        expected = np.packbits(pattern > 0, axis=1, bitorder="little")
        np.testing.assert_array_equal(codes, expected, err_msg=f"sign codes of {n_bits} bits, packed little-endian")

    @SOME
    @given(data=st.data())
    def test_hamming_topk_matches_reference_with_ties_in_any_order(
        self, backend: DistanceBackend, data: st.DataObject
    ) -> None:
        n_bits = data.draw(gst.bit_counts(), label="bits")
        n_rows = data.draw(st.integers(1, 16), label="rows")
        n_queries = data.draw(st.integers(1, 4), label="queries")
        pattern = data.draw(gst.sign_patterns(n_rows + n_queries, n_bits), label="pattern")
        planes = backend.asarray(np.eye(n_bits, dtype=np.float32), "planes")
        codes = backend.sign_codes(backend.asarray(pattern, "vectors"), planes)
        host_codes = np.asarray(backend.to_numpy(codes))
        np.testing.assert_array_equal(host_codes, np.packbits(pattern > 0, axis=1, bitorder="little"))
        query_codes = backend.sign_codes(backend.asarray(pattern[n_rows:], "vectors"), planes)
        database_codes = backend.sign_codes(backend.asarray(pattern[:n_rows], "vectors"), planes)
        k = data.draw(gst.ks(n_rows, max_k=self.max_k(backend, n_rows)), label="k")
        result = backend.hamming_topk(query_codes, database_codes, k)
        scores = np.asarray(backend.to_numpy(result.scores))
        indices = np.asarray(backend.to_numpy(result.indices))
        assert scores.dtype == np.int32, f"hamming_topk scores must be int32; got {scores.dtype}"
        assert indices.dtype == np.int64, f"hamming_topk indices must be int64; got {indices.dtype}"
        ref.assert_hamming_topk_matches(host_codes[n_rows:], host_codes[:n_rows], scores, indices, k)

    def test_hamming_topk_finds_each_code_at_distance_zero_from_itself(self, backend: DistanceBackend) -> None:
        rng = np.random.default_rng(3)
        vectors = rng.standard_normal((20, 6)).astype(np.float32)
        planes = backend.asarray(rng.standard_normal((70, 6)).astype(np.float32), "planes")
        codes = backend.sign_codes(backend.asarray(vectors, "vectors"), planes)
        result = backend.hamming_topk(codes, codes, 1)
        scores = np.asarray(backend.to_numpy(result.scores))
        assert (scores[:, 0] == 0).all(), f"each code is at distance 0 from itself; got {scores[:, 0]}"
        host = np.asarray(backend.to_numpy(codes))
        ref.assert_hamming_topk_matches(host, host, scores, backend.to_numpy(result.indices), 1)

    @pytest.mark.parametrize(
        ("n_queries", "n_rows", "n_bytes", "count"),
        [(1, 1, 1, 1), (5, 100, 1, 37), (17, 333, 2, 333), (3, 1000, 4, 250), (2, 2049, 32, 100)],
    )
    def test_hamming_candidates_are_the_rows_hamming_topk_keeps(
        self, backend: DistanceBackend, n_queries: int, n_rows: int, n_bytes: int, count: int
    ) -> None:
        """Any order, but the same distances as `hamming_topk`'s and every row at most the count-th distance."""
        rng = np.random.default_rng(n_rows)
        host = rng.integers(0, 256, (n_queries + n_rows, n_bytes), dtype=np.uint8)  # few bits: many ties
        planes = backend.asarray(np.eye(8 * n_bytes, dtype=np.float32), "planes")
        signs = np.where(np.unpackbits(host, axis=1, bitorder="little"), 1.0, -1.0).astype(np.float32)
        codes = backend.sign_codes(backend.asarray(signs, "vectors"), planes)
        query_codes, database_codes = codes[:n_queries], codes[n_queries:]
        rows = np.asarray(backend.to_numpy(backend.hamming_candidates(query_codes, database_codes, count)))
        assert rows.shape == (n_queries, count), f"hamming_candidates shape: got {rows.shape}"
        assert rows.dtype == np.int64, f"hamming_candidates must be int64 rows; got {rows.dtype}"
        distances = ref.hamming_reference(host[:n_queries], host[n_queries:])
        for q in range(n_queries):
            assert len(set(rows[q].tolist())) == count, f"query {q}: candidates repeat a row"
            np.testing.assert_array_equal(
                np.sort(distances[q, rows[q]]), np.sort(distances[q])[:count], err_msg=f"query {q}: candidates"
            )

    # --- approximate search: exact re-ranking and the LSH retriever ----------------------------
    @SOME
    @given(data=st.data())
    def test_rerank_returns_the_best_k_of_each_querys_candidates(
        self, backend: DistanceBackend, data: st.DataObject
    ) -> None:
        metric, queries, vectors = self.draw_case(backend, data)
        n_rows = vectors.shape[0]
        n_candidates = data.draw(st.integers(1, n_rows), label="candidates")
        picks = [
            data.draw(st.permutations(range(n_rows)), label=f"candidates of query {q}")[:n_candidates]
            for q in range(queries.shape[0])
        ]
        candidates = np.array(picks, dtype=np.int64).reshape(queries.shape[0], n_candidates)
        k = data.draw(gst.ks(n_candidates), label="k")
        database = self.prepared(backend, vectors, metric)
        result = backend.rerank(
            backend.asarray(queries, "queries"), database, self.device_array(backend, candidates), k
        )
        scores, positions = self.host_topk(backend, result, queries.shape[0], k)
        for q in range(queries.shape[0]):
            ref.assert_topk_matches(
                queries[q : q + 1],
                vectors[candidates[q]],
                metric,
                scores[q : q + 1],
                positions[q : q + 1],
                k,
                row_ids=candidates[q],
                label=f"rerank {metric.value}, query {q}",
            )

    @staticmethod
    def device_array(backend: DistanceBackend, host: Any) -> Any:
        """``host`` int64 row positions in the backend's array type, on its device (as `hamming_topk` gives them)."""
        from gpurag.rerank import like

        one = backend.asarray(np.ones((1, 1), np.float32), "probe")
        probe = backend.hamming_topk(backend.sign_codes(one, one), backend.sign_codes(one, one), 1).indices
        return like(probe, host)

    @SOME
    @given(data=st.data())
    def test_lsh_retriever_with_every_row_a_candidate_matches_the_exact_answer(
        self, backend: DistanceBackend, data: st.DataObject
    ) -> None:
        metric = data.draw(gst.metrics(type(backend).metrics & {Metric.COSINE, Metric.DOT, Metric.L2}), label="metric")
        queries, vectors = data.draw(gst.datasets(max_queries=5, min_rows=1), label="queries, vectors")
        n_rows = vectors.shape[0]
        n_bits = data.draw(gst.bit_counts(), label="bits")
        split = data.draw(st.integers(1, n_rows), label="rows in the first add")
        removed = data.draw(st.lists(st.integers(0, n_rows - 1), unique=True, max_size=n_rows - 1), label="removed")
        kept = np.setdiff1d(np.arange(n_rows, dtype=np.int64), np.array(removed, dtype=np.int64))
        k = data.draw(gst.ks(kept.size, beyond=2, max_k=self.max_k(backend, kept.size)), label="k")
        index = gpurag.get_retriever(
            "lsh",
            metric=metric,
            backend=backend,
            n_bits=n_bits,
            n_candidates=n_rows + data.draw(st.integers(0, 3)),
            memory_budget_bytes=self.tiny_memory_budget_bytes,
        )
        index.add(vectors[:split])
        if split < n_rows:
            index.add(vectors[split:])
        assert index.remove(removed) == len(removed)  # the last rows and their codes move into the holes
        codes = np.array(backend.to_numpy(index.codes), copy=True)
        index.rehash()  # the same planes: every code recomputed from the rows as they now lie
        np.testing.assert_array_equal(codes, backend.to_numpy(index.codes), err_msg="codes left unaligned with rows")
        scores, ids = self.host_search_result(index.search(queries, k), queries.shape[0], k)
        ref.assert_topk_matches(
            queries,
            vectors[kept],
            metric,
            scores,
            ids,
            k,
            row_ids=kept,
            label=f"lsh, every row a candidate, {metric.value}, {len(removed)} removed",
        )
