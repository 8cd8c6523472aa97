"""The CuPy backend: the conformance kit and any-k cases on CUDA; on CI, its unavailability and its kernels compiling.

CI has no GPU and installs gpurag-cupy without cupy (the extras ``cuda12`` / ``cuda13`` bring it):
there the backend must be listed as unavailable with the reason, and every kernel must compile
with nvcc for sm_90. The ``gpu`` tests run where cupy sees a card.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpurag
from gpurag.backend import DistanceBackend
from gpurag.errors import BackendUnavailableError
from gpurag.metrics import Metric
from gpurag.testing import reference as ref
from gpurag.testing.conformance import BackendConformance
from gpurag_cupy import backend as cupy_backend
from gpurag_cupy.kernels import NAMES, source


class TestCupyBackend(BackendConformance):
    backend_name = "cupy"
    devices = ("cuda",)


class TestCupyBackendInTinyTiles(BackendConformance):
    """Tiles of a few rows: every search crosses tiles, and the candidate buffer compacts repeatedly."""

    backend_name = "cupy"
    devices = ("cuda",)

    @classmethod
    def make_backend(cls, device: str) -> DistanceBackend:
        """The kit's backend on ``device`` (skipped with the reason where it cannot run), in tiles of 64 scores."""
        resolved = super().make_backend(device)
        return cupy_backend.CupyBackend(resolved.device, tile_scores=64)


# --- on CI: unavailability with the reason, and the kernels compile ------------------------------
@pytest.fixture
def fresh_availability() -> Any:
    cupy_backend.cupy_availability.cache_clear()
    yield
    cupy_backend.cupy_availability.cache_clear()


def test_without_cupy_the_backend_is_unavailable_and_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, fresh_availability: None
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    availability = cupy_backend.CupyBackend.availability()
    assert not availability
    assert availability.reason.startswith("cupy is not installed")
    assert "gpurag-cupy[cuda12]" in availability.reason
    assert "gpurag-cupy[cuda13]" in availability.reason
    with pytest.raises(BackendUnavailableError, match="cupy is not installed"):
        cupy_backend.CupyBackend.normalize_device("cuda:0")


def test_without_a_cuda_driver_the_backend_is_unavailable_and_says_so(
    monkeypatch: pytest.MonkeyPatch, fresh_availability: None
) -> None:
    spec = importlib.util.spec_from_loader("cupy", loader=None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "cupy" else real(name, *a))
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(cupy_backend, "CUDA_DRIVER_LIBRARY", "libcuda-that-is-not-there.so.1")
    availability = cupy_backend.CupyBackend.availability()
    assert not availability
    assert availability.reason.startswith("no CUDA driver (libcuda-that-is-not-there.so.1 cannot be loaded")


def test_where_cupy_is_imported_its_device_count_decides(
    monkeypatch: pytest.MonkeyPatch, fresh_availability: None
) -> None:
    def no_driver() -> int:
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    fake = types.ModuleType("cupy")
    fake.__spec__ = importlib.util.spec_from_loader("cupy", loader=None)
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_driver))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", fake)
    availability = cupy_backend.CupyBackend.availability()
    assert not availability
    assert "no CUDA driver or device for cupy" in availability.reason
    assert "cudaErrorInsufficientDriver" in availability.reason
    cupy_backend.cupy_availability.cache_clear()
    fake.cuda.runtime.getDeviceCount = lambda: 0  # type: ignore[attr-defined]
    assert cupy_backend.CupyBackend.availability().reason == "cupy sees no CUDA device"


def test_gpurag_plugins_lists_the_cupy_backend_with_its_distribution_and_state() -> None:
    from gpurag import plugins
    from gpurag.cli import plugin_report

    plugins.reset_plugins()

    listed = {b["name"]: b for b in plugin_report()["backends"]}
    assert listed["cupy"]["distribution"] == "gpurag-cupy"
    expected = cupy_backend.CupyBackend.availability()
    assert listed["cupy"]["available"] == expected.available
    assert listed["cupy"]["reason"] == expected.reason
    if not expected.available:
        with pytest.raises(
            BackendUnavailableError, match=re.escape(f"backend 'cupy' is unavailable: {expected.reason}")
        ):
            gpurag.get_backend("cupy", device="cuda")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on this machine")
def test_every_kernel_compiles_for_sm90_with_nvcc(tmp_path: Path) -> None:
    """The module cupy compiles at first use, with every kernel instantiated, built by nvcc for sm_90."""
    instances = []
    for name in NAMES:
        if "<" in name:  # a template: instantiate it as RawModule's name_expressions would
            base, argument = name[:-1].split("<")
            instances.append(f"template __global__ decltype({base}<{argument}>) {base}<{argument}>;")
    (tmp_path / "kernels.cu").write_text(source() + "\n" + "\n".join(instances) + "\n")
    result = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "kernels.cubin"), "kernels.cu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    symbols = (tmp_path / "kernels.cubin").read_bytes()
    for name in NAMES:
        assert name.split("<")[0].encode() in symbols, f"kernel {name} missing from the cubin"


# --- on the GPU: any k, odd D, N = 1, torch and DLPack inputs, torch's stream ---------------------
@pytest.fixture(scope="module")
def cupy_gpu() -> DistanceBackend:
    try:
        return gpurag.get_backend("cupy", device="cuda")
    except BackendUnavailableError as exc:
        pytest.skip(f"backend 'cupy' on cuda: {exc}")


@pytest.fixture(scope="module")
def tiny_tiles(cupy_gpu: DistanceBackend) -> DistanceBackend:
    return cupy_backend.CupyBackend(cupy_gpu.device, tile_scores=4096)


def _check(backend: DistanceBackend, queries: Any, vectors: Any, metric: Metric, k: int, label: str) -> None:
    database = backend.prepare(backend.asarray(vectors, "vectors"), metric)
    top = backend.topk(backend.asarray(queries, "queries"), database, k)
    scores, ids = backend.to_numpy(top.scores), backend.to_numpy(top.indices)
    assert scores.shape == ids.shape == (queries.shape[0], k)
    ref.assert_topk_matches(queries, vectors, metric, scores, ids, k, label=label)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", list(Metric), ids=str)
@pytest.mark.parametrize("k", [2049, 4096, 9000], ids=lambda k: f"k{k}")
def test_any_k_up_to_the_row_count_matches_reference(
    cupy_gpu: DistanceBackend, tiny_tiles: DistanceBackend, metric: Metric, k: int
) -> None:
    rng = np.random.default_rng(k)
    vectors = rng.standard_normal((9000, 24)).astype(np.float32)
    vectors[1:300] = vectors[0]  # ties across the k-th
    queries = rng.standard_normal((3, 24)).astype(np.float32)
    queries[0] = vectors[0]
    for backend in (cupy_gpu, tiny_tiles):
        _check(backend, queries, vectors, metric, k, f"{metric.value} k={k} tile_scores={backend.tile_scores}")  # type: ignore[attr-defined]


@pytest.mark.gpu
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_odd_dimension_781_across_selection_blocks_matches_reference(cupy_gpu: DistanceBackend, metric: Metric) -> None:
    rng = np.random.default_rng(781)
    vectors = rng.standard_normal((20_000, 781)).astype(np.float32)
    queries = rng.standard_normal((5, 781)).astype(np.float32)
    queries[-1] = vectors[-1]
    for k in (1, 10, 300):
        _check(cupy_gpu, queries, vectors, metric, k, f"{metric.value} D=781 k={k}")


@pytest.mark.gpu
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_a_single_row_database_answers_every_query(cupy_gpu: DistanceBackend, metric: Metric) -> None:
    vectors = np.array([[0.5, -1.0, 2.0]], np.float32)
    queries = np.random.default_rng(1).standard_normal((70, 3)).astype(np.float32)
    _check(cupy_gpu, queries, vectors, metric, 1, f"{metric.value} N=1")


@pytest.mark.gpu
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_torch_tensors_non_contiguous_and_dlpack_inputs_match_reference(
    cupy_gpu: DistanceBackend, metric: Metric
) -> None:
    torch = pytest.importorskip("torch")
    import cupy

    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((3000, 40)).astype(np.float32)
    wide = rng.standard_normal((4, 80)).astype(np.float32)
    queries = np.ascontiguousarray(wide[:, ::2])
    device = torch.device(cupy_gpu.device)
    inputs = {
        "torch, strided": torch.from_numpy(wide).to(device)[:, ::2],
        "torch, column-major": torch.from_numpy(queries).to(device).T.contiguous().T,
        "torch float64": torch.from_numpy(queries.astype(np.float64)).to(device),
        "a DLPack capsule producer": cupy.asfortranarray(cupy.asarray(queries)),
    }
    database = cupy_gpu.prepare(torch.from_numpy(vectors).to(device), metric)
    for label, given in inputs.items():
        top = cupy_gpu.topk(cupy_gpu.asarray(given, "queries"), database, 12)
        ref.assert_topk_matches(
            queries, vectors, metric, cupy_gpu.to_numpy(top.scores), cupy_gpu.to_numpy(top.indices), 12, label=label
        )
    index = gpurag.ExactRetriever(metric=metric.value, backend=cupy_gpu)
    index.add(torch.from_numpy(vectors).to(device))
    scores, ids = index.search(inputs["torch, strided"], 12)
    ref.assert_topk_matches(queries, vectors, metric, scores, ids, 12, label="retriever, torch input")


@pytest.mark.gpu
def test_torch_inputs_run_on_torchs_current_stream(cupy_gpu: DistanceBackend) -> None:
    torch = pytest.importorskip("torch")
    import cupy

    device = torch.device(cupy_gpu.device)
    side = torch.cuda.Stream(device=device)
    with torch.cuda.stream(side):
        queries = torch.randn(3, 16, device=device)
        with cupy_gpu._on_device(queries):  # type: ignore[attr-defined]
            assert cupy.cuda.get_current_stream().ptr == side.cuda_stream
        database = cupy_gpu.prepare(torch.randn(500, 16, device=device), Metric.DOT)
        top = cupy_gpu.topk(queries, database, 5)
        side.synchronize()
    expected = (queries.double().cpu() @ torch.as_tensor(cupy_gpu.to_numpy(database.vectors)).double().T).topk(5)
    np.testing.assert_array_equal(np.sort(cupy_gpu.to_numpy(top.indices), 1), np.sort(expected.indices.numpy(), 1))


@pytest.mark.gpu
def test_topk_of_torch_queries_is_ordered_on_torchs_stream_and_not_on_cupys(cupy_gpu: DistanceBackend) -> None:
    """cupy's own (null) stream is held up by a sleep; a search of torch queries made on a side stream
    must still be done when that side stream alone is synchronised (it would not be, run on cupy's)."""
    torch = pytest.importorskip("torch")
    import cupy

    device = torch.device(cupy_gpu.device)
    vectors = torch.randn(20_000, 64, device=device)
    database = cupy_gpu.prepare(vectors, Metric.DOT)
    queries = torch.randn(4, 64, device=device)
    expected = (queries.double() @ vectors.double().T).topk(7).indices.cpu().numpy()
    torch.cuda.synchronize(device)
    side = torch.cuda.Stream(device=device)
    torch.cuda._sleep(1 << 28)  # on the default stream, which is cupy's current one: a few hundred ms
    with torch.cuda.stream(side):
        top = cupy_gpu.topk(queries, database, 7)
        with warnings.catch_warnings():  # ExternalStream is deprecated in CuPy 14, kept: independent of the code
            warnings.simplefilter("ignore", DeprecationWarning)
            reader = cupy.cuda.ExternalStream(side.cuda_stream, device.index or 0)
        with reader:
            ids = top.indices.get()  # copied on the side stream, which waits for nothing else
    torch.cuda.synchronize(device)
    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(expected, 1))


@pytest.mark.gpu
def test_the_database_never_aliases_the_callers_device_array(cupy_gpu: DistanceBackend) -> None:
    import cupy

    vectors = cupy.asarray(np.random.default_rng(2).standard_normal((50, 8)).astype(np.float32))
    database = cupy_gpu.prepare(vectors, Metric.L2)
    vectors[:] = 0
    assert float(cupy.abs(database.vectors).sum()) > 0


@pytest.mark.gpu
def test_search_out_device_answers_in_cupy_arrays_padded_like_the_host_answer(cupy_gpu: DistanceBackend) -> None:
    import cupy

    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((40, 6)).astype(np.float32)
    queries = rng.standard_normal((3, 6)).astype(np.float32)
    index = gpurag.ExactRetriever(metric="l2", backend=cupy_gpu, memory_budget_bytes=256)
    index.add(vectors, ids=np.arange(1000, 1040))
    for k in (5, 45):
        on_host = index.search(queries, k)
        on_device = index.search(queries, k, out="device")
        assert isinstance(on_device.scores, cupy.ndarray)
        assert isinstance(on_device.ids, cupy.ndarray)
        np.testing.assert_array_equal(on_device.ids.get(), on_host.ids)
        np.testing.assert_array_equal(on_device.scores.get(), on_host.scores)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_tiles_after_the_first_filtered_by_the_running_threshold_match_reference(
    cupy_gpu: DistanceBackend, metric: Metric
) -> None:
    """Tiles of 100 rows for 4 queries: later tiles mostly fall below the k-th best so far (one pass), and
    rows ordered to keep beating it force the radix passes for some queries but not others."""
    rng = np.random.default_rng(11)
    backend = cupy_backend.CupyBackend(cupy_gpu.device, tile_scores=400)
    vectors = rng.standard_normal((5000, 16)).astype(np.float32)
    queries = rng.standard_normal((4, 16)).astype(np.float32)
    growing = np.argsort(ref.pairwise_reference(queries[:1], vectors, metric)[0])  # ascending scores
    if not metric.higher_is_better:
        growing = growing[::-1]  # so that query 0 meets its rows worst first
    ordered = np.ascontiguousarray(vectors[growing])
    ordered[2000:2300] = ordered[4999]  # ties with the best row of query 0, across tiles
    for k in (1, 10, 99):
        _check(backend, queries, ordered, metric, k, f"{metric.value} k={k}, threshold-filtered tiles")
        _check(backend, queries, vectors, metric, k, f"{metric.value} k={k}, random order")


@pytest.mark.gpu
@pytest.mark.parametrize("metric", list(Metric), ids=str)
@pytest.mark.parametrize("wide_slots", [1, 4], ids=lambda slots: f"{slots}k-slots")
def test_tiles_filtered_for_a_k_past_wide_k_match_reference(
    cupy_gpu: DistanceBackend, monkeypatch: pytest.MonkeyPatch, metric: Metric, wide_slots: int
) -> None:
    """k above `select.WIDE_K` across tiles of 5,000 rows (the threshold pass with one k of slots, or
    four): the candidate buffer fills and is selected down many times; query 0 meets its rows worst first,
    so its filtered tiles overflow their slots and take the radix passes."""
    from gpurag_cupy import select

    monkeypatch.setattr(select, "FILTER_SLOTS_WIDE_K", wide_slots)
    rng = np.random.default_rng(18)
    backend = cupy_backend.CupyBackend(cupy_gpu.device, tile_scores=3 * 5000)
    vectors = rng.standard_normal((40_000, 16)).astype(np.float32)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    growing = np.argsort(ref.pairwise_reference(queries[:1], vectors, metric)[0])
    if not metric.higher_is_better:
        growing = growing[::-1]
    ordered = np.ascontiguousarray(vectors[growing])
    ordered[20_000:20_400] = ordered[39_999]  # ties with query 0's best row, across tiles
    for k in (select.WIDE_K + 1, 2049):
        _check(backend, queries, ordered, metric, k, f"{metric.value} k={k}, {wide_slots}k slots")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "variant", ["sgemv", "streaming dot kernel", "float4 one-query dot kernel", "histogram without warp aggregation"]
)
def test_every_scoring_and_histogram_variant_matches_reference(
    cupy_gpu: DistanceBackend, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    from gpurag_cupy import gemm, search, select

    if variant == "sgemv":
        monkeypatch.setattr(gemm, "GEMV_FOR_ONE_QUERY", True)
    elif variant == "streaming dot kernel":
        monkeypatch.setattr(search, "STREAM_DOT_MAX_QUERIES", 16)
    elif variant == "float4 one-query dot kernel":
        monkeypatch.setattr(search, "VEC4_ONE_QUERY", True)
    else:
        monkeypatch.setattr(select, "AGGREGATE", False)
        monkeypatch.setattr(search, "FEW_MAX_QUERIES", 0)  # the histogram passes serve many queries only
    rng = np.random.default_rng(3)
    for n_queries, dim in ((1, 768), (1, 7), (1, 132), (5, 128), (16, 200), (16, 300), (3, 781)):
        vectors = rng.standard_normal((6000, dim)).astype(np.float32)
        queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
        for metric in Metric:
            _check(cupy_gpu, queries, vectors, metric, 10, f"{variant}: {metric.value} Q={n_queries} D={dim}")


# --- the few-query path: chunks of 4096 rows, whole-chunk tiles, one merge -----------------------
@pytest.mark.gpu
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_the_few_query_path_matches_reference_across_chunks_and_tiles(
    cupy_gpu: DistanceBackend, monkeypatch: pytest.MonkeyPatch, metric: Metric
) -> None:
    """Row counts one short of, at and past whole chunks, tiles of two chunks, k from 1 to SORTED_MAX
    (more than a partial chunk's rows), ties across chunks; every case must take the few-query path."""
    from gpurag_cupy import search

    taken: list[int] = []
    original = search.few_query_topk

    def counted(*args: Any, **kwargs: Any) -> Any:
        taken.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(search, "few_query_topk", counted)
    chunk = search.CHUNK_KEYS
    two_chunk_tiles = cupy_backend.CupyBackend(cupy_gpu.device, tile_scores=2 * chunk * 3)
    rng = np.random.default_rng(4096)
    cases = [
        (cupy_gpu, 1, 5, 1, 1),
        (cupy_gpu, chunk - 1, 16, 1, 10),
        (cupy_gpu, chunk, 16, 16, 10),
        (cupy_gpu, 3 * chunk + 7, 33, 3, 1),
        (cupy_gpu, chunk + 100, 8, 2, search.SORTED_MAX),
        (two_chunk_tiles, 5 * chunk + 3, 24, 3, 10),
    ]
    for backend, n, dim, n_queries, k in cases:
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        if n > 300:
            vectors[100:300] = vectors[50]  # ties across a chunk's k-th
        queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
        queries[-1] = vectors[n // 2]
        before = len(taken)
        _check(backend, queries, vectors, metric, k, f"{metric.value} N={n} Q={n_queries} k={k}")
        assert len(taken) == before + 1, f"N={n} Q={n_queries} k={k} did not take the few-query path"


@pytest.mark.gpu
def test_the_largest_magnitude_is_nan_or_inf_where_an_entry_is(cupy_gpu: DistanceBackend) -> None:
    import cupy

    from gpurag_cupy.arrays import largest_magnitude

    values = np.random.default_rng(6).standard_normal((37, 781)).astype(np.float32)
    values[3, 5] = -9.5
    assert largest_magnitude(cupy.asarray(values)) == 9.5
    for poke in (np.inf, -np.inf, np.nan):
        poked = values.copy()
        poked[36, 780] = poke
        got = largest_magnitude(cupy.asarray(poked))
        assert np.isnan(got) if np.isnan(poke) else got == np.inf, (poke, got)


# --- device queries: their check is read after the search is queued -------------------------------
@pytest.mark.gpu
def test_device_queries_that_are_not_finite_are_refused_naming_the_entry(cupy_gpu: DistanceBackend) -> None:
    torch = pytest.importorskip("torch")
    from gpurag.errors import InvalidInputError

    device = torch.device(cupy_gpu.device)
    vectors = np.random.default_rng(9).standard_normal((5000, 8)).astype(np.float32)
    index = gpurag.ExactRetriever(metric="l2", backend=cupy_gpu)
    index.add(vectors)
    for poke in (float("nan"), float("inf")):
        bad = torch.randn(3, 8, device=device)
        bad[1, 3] = poke
        with pytest.raises(InvalidInputError, match=r"queries must be finite; row 1, column 3 holds NaN or inf"):
            index.search(bad, 4)
        with pytest.raises(InvalidInputError, match=r"row 1, column 3"):  # any other use reads the check first
            cupy_gpu.pairwise(cupy_gpu.asarray(bad, "queries"), vectors, Metric.L2)
    good = np.random.default_rng(10).standard_normal((3, 8)).astype(np.float32)
    scores, ids = index.search(torch.from_numpy(good).to(device), 4)  # nothing left over from the refusals
    ref.assert_topk_matches(good, vectors, Metric.L2, scores, ids, 4, label="after refusals")
    on_device = index.search(torch.from_numpy(good).to(device), 4, out="device")  # views of the one buffer
    np.testing.assert_array_equal(on_device.ids.get(), ids)
    np.testing.assert_array_equal(on_device.scores.get(), scores)


@pytest.mark.gpu
def test_device_queries_whose_float32_products_overflow_are_answered_in_float64(cupy_gpu: DistanceBackend) -> None:
    """The kit's overflow case (terms near 1e40 that cancel), with the queries on the device: their
    magnitude is read after the float32 search is queued, which must then be answered again in float64."""
    torch = pytest.importorskip("torch")

    rng = np.random.default_rng(13)
    big = np.float32(1e20)
    queries = np.zeros((3, 4), np.float32)
    queries[:, :2] = big * rng.uniform(0.5, 1.0, (3, 1)).astype(np.float32)
    queries[:, 2:] = rng.standard_normal((3, 2)).astype(np.float32)
    vectors = np.zeros((9000, 4), np.float32)
    vectors[:, 0] = big * rng.uniform(0.5, 1.0, 9000).astype(np.float32)
    vectors[:, 1] = -vectors[:, 0] + np.float32(1e17) * rng.standard_normal(9000).astype(np.float32)
    vectors[:, 2:] = rng.standard_normal((9000, 2)).astype(np.float32)
    index = gpurag.ExactRetriever(metric="dot", backend=cupy_gpu)
    index.add(vectors)
    scores, ids = index.search(torch.from_numpy(queries).to(torch.device(cupy_gpu.device)), 5)
    ref.assert_topk_matches(
        queries, vectors, Metric.DOT, scores, ids, 5, label="device queries, float32 terms overflow"
    )


# --- captured searches: a few queries answered to the host by one graph replay ----------------------
def _winner(query: np.ndarray, metric: Metric) -> np.ndarray:
    """A row that beats every random row for ``query`` under ``metric``."""
    return np.asarray(100 * query if metric is Metric.DOT else query, dtype=np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_graph_replays_answer_each_new_query_not_the_captured_one(cupy_gpu: DistanceBackend, metric: Metric) -> None:
    """Each shape is answered uncaptured once, captured the second time, then replayed for new queries
    (torch, CuPy and host arrays in turn), each answer checked: a replay that reused the captured queries
    or answer would fail. Shapes cross a chunk's end, k past a partial chunk's rows, D = 781 (the
    streaming kernel, not the float4 one), and tiles of two chunks inside one graph."""
    torch = pytest.importorskip("torch")
    import cupy

    from gpurag_cupy import search

    chunk = search.CHUNK_KEYS
    rng = np.random.default_rng(15)
    cases = [
        (cupy_backend.CupyBackend(cupy_gpu.device), chunk - 1, 24, 1, 10),
        (cupy_backend.CupyBackend(cupy_gpu.device), 3 * chunk + 7, 24, 3, 1),
        (cupy_backend.CupyBackend(cupy_gpu.device), 2 * chunk + 5, 781, 1, 10),
        (cupy_backend.CupyBackend(cupy_gpu.device), chunk + 100, 8, 16, search.SORTED_MAX),
        (cupy_backend.CupyBackend(cupy_gpu.device, tile_scores=2 * chunk * 3), 5 * chunk + 3, 12, 3, 10),
    ]
    device = torch.device(cupy_gpu.device)
    kinds = [lambda q: torch.from_numpy(q).to(device), cupy.asarray, lambda q: q]
    for backend, n, dim, n_queries, k in cases:
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        index = gpurag.ExactRetriever(metric=metric.value, backend=backend)
        index.add(vectors)
        for turn in range(5):
            queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
            queries[-1] = vectors[rng.integers(n)]
            scores, ids = index.search(kinds[turn % 3](queries), k)
            label = f"{metric.value} N={n} D={dim} Q={n_queries} k={k} #{turn}"
            ref.assert_topk_matches(queries, vectors, metric, scores, ids, k, label=label)
        graphs = backend._graphs  # type: ignore[attr-defined]
        assert (graphs.captures, graphs.replays) == (1, 4), f"N={n} D={dim} Q={n_queries}: not one capture, 4 replays"


@pytest.mark.gpu
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_graph_replay_follows_the_database_after_capture(cupy_gpu: DistanceBackend, metric: Metric) -> None:
    """Rows added after a capture are searched (a new row count: a new graph), and rows changed in place
    (a removal, then an addition into the same storage: the graph captured before is replayed) are read
    as they are now."""
    torch = pytest.importorskip("torch")

    backend = cupy_backend.CupyBackend(cupy_gpu.device)
    device = torch.device(cupy_gpu.device)
    rng = np.random.default_rng(16)
    vectors = rng.standard_normal((2 * 4096 + 3, 16)).astype(np.float32)
    index = gpurag.ExactRetriever(metric=metric.value, backend=backend)
    index.add(vectors)
    first, second = (torch.from_numpy(rng.standard_normal((1, 16)).astype(np.float32)).to(device) for _ in range(2))
    _, ids = index.search(first, 3)  # seen
    assert index.search(first, 3).ids[0, 0] == ids[0, 0]  # captured
    grown = index.add(_winner(first.cpu().numpy(), metric))  # the storage grows: new addresses, a new row count
    for _ in range(2):  # seen, then captured
        assert index.search(first, 3).ids[0, 0] == grown[0]
    graphs = backend._graphs  # type: ignore[attr-defined]
    assert graphs.captures == 2
    index.remove([int(ids[0, 0])])
    assert index.search(first, 3).ids[0, 0] == grown[0]  # one row fewer: a key not captured
    changed = index.add(_winner(second.cpu().numpy(), metric))  # the second graph's row count, same storage
    replays = graphs.replays
    assert index.search(second, 3).ids[0, 0] == changed[0]
    assert graphs.replays == replays + 1, "the changed rows were not searched by the graph captured before"
    assert graphs.captures == 2


@pytest.mark.gpu
def test_searches_scored_through_cublas_are_answered_without_a_graph(cupy_gpu: DistanceBackend) -> None:
    """Two queries of D = 768 fit none of the backend's dot kernels: cuBLAS scores them, uncaptured."""
    torch = pytest.importorskip("torch")

    backend = cupy_backend.CupyBackend(cupy_gpu.device)
    rng = np.random.default_rng(17)
    vectors = rng.standard_normal((5000, 768)).astype(np.float32)
    queries = rng.standard_normal((2, 768)).astype(np.float32)
    index = gpurag.ExactRetriever(metric="dot", backend=backend)
    index.add(vectors)
    scores, ids = index.search(torch.from_numpy(queries).to(torch.device(cupy_gpu.device)), 10)
    ref.assert_topk_matches(queries, vectors, Metric.DOT, scores, ids, 10, label="Q=2 D=768 dot")
    assert backend._graphs.captures == backend._graphs.replays == 0  # type: ignore[attr-defined]


# --- the graph cache's policy (no GPU: capture and replay stand-ins) --------------------------------
class _RefusedError(Exception):
    """Stands in for a CUDA error a capture raises."""


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """`graphs.capture` recording its keys and returning a graph whose replay answers the query address;
    every search capturable, keyed by (shape, k)."""
    from gpurag_cupy import graphs

    captured: list[tuple[Any, ...]] = []

    class Replayed:
        def __init__(self, key: tuple[Any, ...]) -> None:
            self.key = key

        def replay(self, pointer: int) -> Any:
            return graphs.HostAnswer(np.full((1, 1), pointer, np.float32), np.zeros((1, 1), np.int64), 1.0)

    def capture(shape: tuple[int, int], database: Any, k: int, tile_rows: int) -> Any:
        captured.append((shape, k))
        if k == 13:
            raise _RefusedError("capture refused")
        if k == 14:
            raise graphs.NotCapturableError("needs cuBLAS")
        if k == 15:
            raise ValueError("a bug")
        return Replayed((shape, k))

    monkeypatch.setattr(graphs, "capture", capture)
    monkeypatch.setattr(graphs, "capturable", lambda shape, database, k, tile_scores: None if k == 99 else 4096)
    monkeypatch.setattr(graphs, "graph_key", lambda shape, database, k, tile_rows: (shape, k))
    monkeypatch.setattr(graphs, "capture_errors", lambda: (_RefusedError,))
    return captured


def test_a_search_is_captured_the_second_time_its_key_comes_and_replayed_for_each_new_query(
    stand_ins: list[tuple[Any, ...]],
) -> None:
    from gpurag_cupy.graphs import GraphCache

    cache = GraphCache()
    assert cache.run(100, (1, 8), None, 10, 1 << 20) is None  # the first of its kind: uncaptured
    assert stand_ins == []
    for pointer in (200, 300, 400):
        answer = cache.run(pointer, (1, 8), None, 10, 1 << 20)
        assert answer is not None
        assert answer.scores[0, 0] == pointer, "a replay answered another query than the one given"
    assert stand_ins == [((1, 8), 10)]
    assert (cache.captures, cache.replays) == (1, 3)
    assert cache.run(500, (1, 8), None, 99, 1 << 20) is None  # not capturable: never seen, never captured
    assert cache.run(500, (1, 8), None, 99, 1 << 20) is None
    assert stand_ins == [((1, 8), 10)]


def test_past_max_graphs_the_least_recently_replayed_graph_is_dropped_and_captured_again(
    stand_ins: list[tuple[Any, ...]],
) -> None:
    from gpurag_cupy import graphs

    cache = graphs.GraphCache()
    keys = [((q, 8), 10) for q in range(1, graphs.MAX_GRAPHS + 2)]
    for shape, k in keys:
        cache.run(1, shape, None, k, 1 << 20)
        cache.run(1, shape, None, k, 1 << 20)
    assert len(cache) == graphs.MAX_GRAPHS
    assert len(stand_ins) == graphs.MAX_GRAPHS + 1
    cache.run(1, keys[-1][0], None, 10, 1 << 20)  # kept: replayed
    assert len(stand_ins) == graphs.MAX_GRAPHS + 1
    cache.run(1, keys[0][0], None, 10, 1 << 20)  # dropped, but seen: captured again at once
    assert stand_ins[-1] == keys[0]
    assert len(stand_ins) == graphs.MAX_GRAPHS + 2


def test_a_refused_capture_warns_once_and_its_key_is_answered_uncaptured_after(
    stand_ins: list[tuple[Any, ...]],
) -> None:
    from gpurag_cupy.graphs import GraphCache

    cache = GraphCache()
    cache.run(1, (1, 8), None, 13, 1 << 20)
    with pytest.warns(RuntimeWarning, match="could not be captured, answered without a graph"):
        assert cache.run(1, (1, 8), None, 13, 1 << 20) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.run(1, (1, 8), None, 13, 1 << 20) is None  # remembered: no second attempt, no warning
        cache.run(1, (1, 8), None, 14, 1 << 20)
        assert cache.run(1, (1, 8), None, 14, 1 << 20) is None  # not capturable (cuBLAS): silent
        assert cache.run(1, (1, 8), None, 14, 1 << 20) is None
    assert stand_ins == [((1, 8), 13), ((1, 8), 14)]
    assert len(cache.failures) == 1
    assert "capture refused" in cache.failures[0]
    cache.run(1, (1, 8), None, 15, 1 << 20)
    with pytest.raises(ValueError, match="a bug"):  # anything else is not hidden
        cache.run(1, (1, 8), None, 15, 1 << 20)
