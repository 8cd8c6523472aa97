"""The hand-written CUDA backend: the conformance kit on a CUDA card; on CI its plugin, its unavailability
with the reason, its kernel cache and the compilation of every ``.cu`` file by nvcc."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpurag
from gpurag.errors import BackendUnavailableError
from gpurag.metrics import Metric
from gpurag.testing import reference as ref
from gpurag.testing.conformance import BackendConformance
from gpurag_cuda import compiler, launch
from gpurag_cuda.backend import CudaBackend


class TestCudaBackend(BackendConformance):
    backend_name = "cuda"
    devices = ("cuda",)


# --- on every machine ------------------------------------------------------------------------------
def test_the_plugin_registers_the_backend_and_states_why_it_cannot_run() -> None:
    registration = gpurag.get_registry("backends")["cuda"]
    assert registration.obj is CudaBackend
    assert registration.distribution == "gpurag-cuda"
    availability = CudaBackend.availability()
    if availability:
        pytest.skip("the backend is available here")
    assert availability.reason, "an unavailable backend must say why"
    with pytest.raises(BackendUnavailableError, match=availability.reason.split(" (")[0]):
        CudaBackend("cuda")


def test_availability_names_a_missing_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    availability = CudaBackend.availability()
    assert not availability
    assert "cupy is not installed" in availability.reason


@pytest.mark.parametrize("source", compiler.kernel_sources(), ids=lambda p: p.name)
def test_every_kernel_file_compiles_with_nvcc_for_sm_90(source: Path, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    expanded = tmp_path / source.name  # what NVRTC is given: the local includes inlined
    expanded.write_text(compiler.expanded_source(source.stem))
    done = subprocess.run(
        [nvcc, "-arch=sm_90", "-cubin", "-std=c++17", "-o", str(tmp_path / "out.cubin"), str(expanded)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.cubin").stat().st_size > 0


def test_expanded_source_inlines_each_local_header_once() -> None:
    text = compiler.expanded_source("scan_tc")
    assert '#include "' not in text
    assert text.count("void warp_sort_desc(") == 1


def test_the_cache_compiles_once_per_source_and_architecture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    compiled: list[tuple[str, str]] = []

    def fake_compile(source: str, name: str, arch: str) -> bytes:
        compiled.append((name, arch))
        return f"cubin of {name} for {arch}".encode()

    monkeypatch.setattr(compiler, "compile_cubin", fake_compile)
    monkeypatch.setattr(compiler, "_nvrtc_version", lambda: "13.0")
    first = compiler.cached_cubin("rescore", "90", tmp_path)
    again = compiler.cached_cubin("rescore", "90", tmp_path)
    other = compiler.cached_cubin("rescore", "100", tmp_path)
    assert first == again
    assert other != first
    assert compiled == [("rescore", "90"), ("rescore", "100")]
    assert first.read_bytes() == b"cubin of rescore for 90"
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"


def test_the_cache_key_changes_with_the_source_the_architecture_and_nvrtc() -> None:
    base = compiler.cache_key("a", "90", "13.0")
    assert base.endswith("-sm90")
    assert len({base, compiler.cache_key("b", "90", "13.0"), compiler.cache_key("a", "80", "13.0"),
                compiler.cache_key("a", "90", "12.8")}) == 4  # fmt: skip


@pytest.mark.parametrize("n_rows", [1, 31, 32, 33, 127, 128, 129, 4095, 100_000, 10_000_000])
@pytest.mark.parametrize("n_queries", [1, 8, 64, 65, 1024])
def test_layouts_cover_every_row_once_in_whole_tiles(n_rows: int, n_queries: int) -> None:
    for layout, tile in (
        (launch.tile_layout(n_queries, n_rows, launch.TC_BLOCK_Q, launch.TC_BLOCK_N, 132), launch.TC_BLOCK_N),
        (launch.tile_layout(n_queries, n_rows, launch.SIMT_BLOCK_Q, launch.SIMT_BLOCK_N, 132), launch.SIMT_BLOCK_N),
        (launch.stream_layout(n_rows, 132), launch.STREAM_ROWS),
        (launch.tc_layout(n_queries, n_rows, 128, 16, 132, True), launch.WIDE_BLOCK_N),
        (launch.stream_layout(n_rows, 132, launch.few_warps_per_sm(16)), launch.STREAM_ROWS),
        (launch.tc_layout(n_queries, n_rows, 768, 16, 132, False, True), launch.TC_REG_BLOCK_N),
    ):
        assert layout.rows_per_split % tile == 0
        assert layout.splits * layout.rows_per_split >= n_rows
        used = -(-n_rows // layout.rows_per_split)
        assert used <= layout.splits < used + 8  # the stream rounds up to whole blocks of 8 warps


def test_candidate_lists_hold_a_batch_past_kp() -> None:
    for kp in (1, 2, 16, 32, 64):
        cap = launch.capacity(kp)
        assert cap >= kp + 32
        assert cap & (cap - 1) == 0


def test_the_fast_kernels_take_what_their_shared_memory_holds() -> None:
    assert launch.wide_takes(768, 16)
    assert launch.wide_takes(128, 32)
    assert not launch.wide_takes(768, 64)  # its lists would not fit: the earlier tile takes kp = 64
    assert not launch.wide_takes(781, 16)  # 16-byte rows only
    assert launch.wide_shared_bytes(32) <= launch.WIDE_SHARED_LIMIT < launch.wide_shared_bytes(64)
    assert launch.wide_resident_shared_bytes(192, 16) <= launch.WIDE_SHARED_LIMIT  # the query tile resident to D 192
    assert launch.wide_resident_shared_bytes(224, 16) > launch.WIDE_SHARED_LIMIT
    for n_queries in (1, 2, 3, 5, 9, 16):
        assert launch.few_width(n_queries) >= n_queries
        assert launch.few_takes(n_queries, 768, 64)
    assert not launch.few_takes(17, 128, 16)
    assert not launch.few_takes(4, 781, 16)


def test_the_register_tile_fits_its_lists_and_stages_in_shared_memory() -> None:
    for block_q, block_n in launch.TC_REG_TILES:
        for kp in (1, 16, 32):
            assert launch.reg_shared_bytes(block_q, kp, block_n) <= launch.WIDE_SHARED_LIMIT
    assert launch.reg_shared_bytes(128, 64, 128) <= launch.WIDE_SHARED_LIMIT < launch.reg_shared_bytes(128, 64, 256)
    assert launch.reg_blocks_per_sm(64, 16) == 2  # two 64-query blocks share a multiprocessor
    assert launch.reg_blocks_per_sm(64, 64) == 1
    assert launch.reg_blocks_per_sm(128, 16) == 1
    assert launch.reg_takes(768, 64)
    assert not launch.reg_takes(781, 16)  # 16-byte rows only


def test_the_fast_kernels_follow_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpurag.settings import get_settings

    monkeypatch.setenv("GPURAG_CUDA_FAST_KERNELS", "0")
    get_settings.cache_clear()
    try:
        assert get_settings().cuda_fast_kernels is False
    finally:
        monkeypatch.delenv("GPURAG_CUDA_FAST_KERNELS")
        get_settings.cache_clear()
    assert get_settings().cuda_fast_kernels is True


# --- on a CUDA card --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_backend() -> Any:
    if not CudaBackend.availability():
        pytest.skip(f"cuda backend: {CudaBackend.availability().reason}")
    try:
        return CudaBackend("cuda")
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


def _search(backend: Any, queries: np.ndarray, vectors: np.ndarray, metric: Metric, k: int) -> tuple[Any, Any]:
    database = backend.prepare(backend.asarray(vectors, "vectors"), metric)
    top = backend.topk(backend.asarray(queries, "queries"), database, k)
    return backend.to_numpy(top.scores), backend.to_numpy(top.indices)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [65, 2049, 4096, 40_000])  # past the fused lists: threshold scan, then torch
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_any_k_up_to_the_row_count(gpu_backend: Any, metric: Metric, k: int) -> None:
    rng = np.random.default_rng(k)
    vectors = rng.standard_normal((40_000, 24)).astype(np.float32)
    queries = rng.standard_normal((70, 24)).astype(np.float32)
    scores, ids = _search(gpu_backend, queries, vectors, metric, k)
    ref.assert_topk_matches(queries, vectors, metric, scores, ids, k)


@pytest.mark.gpu
@pytest.mark.parametrize("n_queries", [1, 8, 9, 70])  # the stream, its limit, the tile kernels
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_odd_dimension_781_across_the_kernels(gpu_backend: Any, metric: Metric, n_queries: int) -> None:
    rng = np.random.default_rng(n_queries)
    vectors = rng.standard_normal((3000, 781)).astype(np.float32)
    queries = rng.standard_normal((n_queries, 781)).astype(np.float32)
    for k in (1, 10, 64):
        scores, ids = _search(gpu_backend, queries, vectors, metric, k)
        ref.assert_topk_matches(queries, vectors, metric, scores, ids, k)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_a_single_row(gpu_backend: Any, metric: Metric) -> None:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((1, 40)).astype(np.float32)
    queries = rng.standard_normal((100, 40)).astype(np.float32)
    scores, ids = _search(gpu_backend, queries, vectors, metric, 1)
    assert (ids == 0).all()
    ref.assert_topk_matches(queries, vectors, metric, scores, ids, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_non_contiguous_and_dlpack_inputs_from_torch(gpu_backend: Any, metric: Metric) -> None:
    import torch

    rng = np.random.default_rng(2)
    host_vectors = rng.standard_normal((2000, 64)).astype(np.float32)
    host_queries = rng.standard_normal((12, 128)).astype(np.float32)
    vectors = torch.from_numpy(host_vectors).cuda()
    queries = torch.from_numpy(host_queries).cuda()[:, ::2]  # non-contiguous
    database = gpu_backend.prepare(torch.utils.dlpack.from_dlpack(vectors.__dlpack__()), metric)
    top = gpu_backend.topk(queries, database, 10)
    ref.assert_topk_matches(host_queries[:, ::2], host_vectors, metric, top.scores.cpu().numpy(),
                            top.indices.cpu().numpy(), 10)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("n_queries", "width", "k"), [(1, 3, 5), (9, 32, 10), (70, 17, 64), (5, 8, 300)])
def test_hamming_across_word_and_tile_boundaries(gpu_backend: Any, n_queries: int, width: int, k: int) -> None:
    rng = np.random.default_rng(width)
    codes = rng.integers(0, 256, (n_queries, width), dtype=np.uint8)
    database_codes = rng.integers(0, 256, (3000, width), dtype=np.uint8)
    top = gpu_backend.hamming_topk(codes, database_codes, k)
    ref.assert_hamming_topk_matches(codes, database_codes, top.scores.cpu().numpy(), top.indices.cpu().numpy(), k)


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [True, False], ids=["new", "old"])
@pytest.mark.parametrize(
    ("n_queries", "n_rows", "dim"),
    [(1, 3001, 136), (3, 70_001, 136), (16, 5000, 8), (9, 257, 40), (127, 4097, 136), (129, 20_000, 64)],
)  # the few-query stream (widths 1, 4, 16; D % 16 == 8), the wide tile (query tiles of 128, k-steps of 32)
@pytest.mark.parametrize("metric", list(Metric), ids=str)
def test_the_fast_kernels_and_the_earlier_ones_across_their_tiles(
    metric: Metric, n_queries: int, n_rows: int, dim: int, fast: bool
) -> None:
    if not CudaBackend.availability():
        pytest.skip(f"cuda backend: {CudaBackend.availability().reason}")
    backend = CudaBackend("cuda", fast_kernels=fast)
    rng = np.random.default_rng(n_queries * dim)
    vectors = rng.standard_normal((n_rows, dim)).astype(np.float32)
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    for k in (1, 10, 32):
        scores, ids = _search(backend, queries, vectors, metric, k)
        ref.assert_topk_matches(queries, vectors, metric, scores, ids, k)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", launch.TC_REG_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize(
    ("n_queries", "n_rows", "dim"),
    [(1, 129, 8), (63, 1000, 40), (64, 4097, 136), (65, 20_001, 64), (130, 70_001, 128), (129, 300_001, 32)],
)  # query tiles of 64 / 128, row tiles of 128 / 256, k-steps of 32, several splits, lists that overflow and refill
def test_the_register_tile_keeps_every_querys_best_keys(
    gpu_backend: Any, monkeypatch: pytest.MonkeyPatch, tile: tuple[int, int], n_queries: int, n_rows: int, dim: int
) -> None:
    import torch

    monkeypatch.setattr(launch, "TC_REG_BLOCK_Q", tile[0])
    monkeypatch.setattr(launch, "TC_REG_BLOCK_N", tile[1])
    gen = torch.Generator(device="cuda").manual_seed(n_rows)
    q = torch.randn(n_queries, dim, device="cuda", generator=gen).to(torch.bfloat16)
    x = torch.randn(n_rows, dim, device="cuda", generator=gen).to(torch.bfloat16)
    sq = x.float().pow(2).sum(1)
    for kp, norms in ((16, sq), (1, None), (64, None), (32, sq)):
        found = launch.scan_tc(q, x, norms, kp, reg=True)
        reference = q.double() @ x.double().T
        if norms is not None:
            reference = 2 * reference - norms.double()[None, :]
        keys, rows = found.keys.reshape(n_queries, -1), found.rows.reshape(n_queries, -1).long()
        want = min(kp, n_rows)
        top = torch.topk(keys.double(), want, dim=1)
        got_rows = torch.gather(rows, 1, top.indices)
        assert bool((got_rows >= 0).all()), "a list lost a row"
        tolerance = 4 * (dim + 8) * 2.0**-24 * (2 * q.double().norm(dim=1, keepdim=True) * x.double().norm(dim=1).max()
                                              + x.double().norm(dim=1).max() ** 2)  # fmt: skip
        own = torch.gather(reference, 1, got_rows)
        best = torch.topk(reference, want, dim=1).values
        assert bool(((top.values - own).abs() <= tolerance).all()), "a key is not its row's own"
        assert bool(((top.values - best).abs() <= tolerance).all()), f"kp={kp}: a query's best keys are missing"
        for query_rows in got_rows.cpu():
            assert len(set(query_rows.tolist())) == want


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["dot", "l2", "cosine"])
def test_a_few_queries_are_answered_to_the_host_by_one_graph(gpu_backend: Any, metric: str) -> None:
    import torch

    from gpurag.errors import InvalidInputError

    backend = CudaBackend("cuda")
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((70_001, 136)).astype(np.float32)
    index = gpurag.ExactRetriever(metric=metric, backend=backend)
    index.add(vectors)
    for n_queries in (1, 3, 16):
        queries = rng.standard_normal((n_queries, 136)).astype(np.float32)
        for given in (queries, torch.from_numpy(queries).cuda()):
            graphs = len(backend._graphs)
            found = index.search(given, 10)
            assert len(backend._graphs) >= graphs
            ref.assert_topk_matches(queries, vectors, Metric.parse(metric), found.scores, found.ids, 10)
    assert len(backend._graphs) > 0, "no graph was captured"
    bad = torch.from_numpy(queries).cuda()
    bad[0, 1] = float("nan")
    with pytest.raises(InvalidInputError):
        index.search(bad, 10)
