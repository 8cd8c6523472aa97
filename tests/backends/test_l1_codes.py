"""l1's byte-code shortlist: the codes' error bound, the scans that sum code distances, and exact answers from it.

`gpurag_torch.l1_codes` promises ``|l1(q, x) - s SAD| <= E(q) + E(x)``; the Triton and CUDA backends rank rows
by SAD, re-score the shortlist in float32 and certify each query against the codes' lower bound on every row
left out, answering again in float32 where it fails. A wrong bound or a scan that drops a word or a row would
let a wrong id through: these tests compare against float64 references with data made to stress each part
(values past the codes' range, near-ties finer than a code step, rows appended at another scale). Triton runs
under the interpreter on the CPU; the CUDA cases need a card.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from triton_devices import DEVICES, triton_on

from gpurag.metrics import Metric
from gpurag.testing import reference as ref

torch = pytest.importorskip("torch")


def _codes(words: Any, dim: int) -> np.ndarray:
    return words.contiguous().view(torch.int8)[:, :dim].to(torch.int64).cpu().numpy()


def _stressed(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors[5] *= np.float32(2.0**-20)  # below half a code step: all codes 0
    vectors[6, : dim // 2] = np.float32(0.0)
    vectors[7] = np.round(vectors[7] * 8) / 8  # values on a coarse grid
    return vectors


@pytest.mark.parametrize("dim", [1, 7, 32, 781], ids=lambda d: f"D={d}")
def test_code_distances_stay_within_their_bound(dim: int) -> None:
    from gpurag_torch import l1_codes

    rng = np.random.default_rng(41)
    vectors = _stressed(rng, 60, dim)
    queries = rng.standard_normal((5, dim)).astype(np.float32)
    queries[1] *= 50  # far past the rows' range: its codes clamp at ±127
    queries[2] = vectors[3]  # a row itself
    queries[3] = vectors[4] + np.float32(2.0**-12)  # a row moved by less than a code step
    data = l1_codes.row_data(torch.as_tensor(vectors))
    scale = data[l1_codes.CODE_SCALE][0]
    query_words, query_error = l1_codes.encode(torch.as_tensor(queries), scale)
    row_codes = _codes(data[l1_codes.CODES_T].T, dim)
    sad = np.abs(_codes(query_words, dim)[:, None, :] - row_codes[None, :, :]).sum(axis=2)
    exact = ref.pairwise_reference(queries, vectors, Metric.L1)
    bound = query_error.double().numpy()[:, None] + data[l1_codes.CODE_ERROR].double().numpy()[None, :]
    error = np.abs(exact - float(scale) * sad)
    assert (error <= bound).all(), f"worst error / bound: {float((error / bound).max()):.4f}"
    assert float((error / bound).max()) > 0.05, "the bound is not vacuous: coding errors show"
    assert float(query_error[1]) > 10 * float(query_error[0]), "clamped codes carry their error"


def test_the_scale_is_shared_by_like_rows_and_bounds_every_code() -> None:
    from gpurag_torch import l1_codes

    rng = np.random.default_rng(42)
    first = torch.as_tensor(rng.standard_normal((500, 16)).astype(np.float32))
    second = first * 0.98  # a like batch appended later
    scale = float(l1_codes.code_scale(first))
    assert scale == float(l1_codes.code_scale(second))
    assert float(first.abs().max()) / 127 <= scale < 1.19 * float(first.abs().max()) / 127
    assert float(l1_codes.code_scale(torch.zeros((3, 4)))) > 0


def test_the_lower_bound_holds_for_every_row_left_out_and_fails_closed() -> None:
    from gpurag_torch import l1_codes

    rng = np.random.default_rng(43)
    dim = 24
    vectors = rng.standard_normal((2000, dim)).astype(np.float32)
    queries = rng.standard_normal((4, dim)).astype(np.float32)
    data = l1_codes.row_data(torch.as_tensor(vectors))
    query_words, query_error = l1_codes.encode(torch.as_tensor(queries), data[l1_codes.CODE_SCALE][0])
    sad = np.abs(_codes(query_words, dim)[:, None, :] - _codes(data[l1_codes.CODES_T].T, dim)[None]).sum(axis=2)
    cut = np.sort(sad, axis=1)[:, 100]  # the shortlist keeps the 100 smallest; the rest have SAD >= cut
    bound = l1_codes.lower_bound(torch.as_tensor(-cut, dtype=torch.float32), query_error, data).double().numpy()
    exact = ref.pairwise_reference(queries, vectors, Metric.L1)
    left_out = sad >= cut[:, None]
    assert (exact[left_out] >= np.broadcast_to(bound[:, None], exact.shape)[left_out]).all()
    assert (bound > np.sort(exact, axis=1)[:, 0]).all(), "the bound is useful: above each query's nearest row"
    # The tightest case: queries on the code grid (no coding error of their own), the cut at the row whose code
    # distance overstates its l1 the most; only the rows' own coding error keeps the bound below it.
    scale = float(data[l1_codes.CODE_SCALE][0])
    on_grid = (np.round(queries / scale) * scale).astype(np.float32)
    grid_words, grid_error = l1_codes.encode(torch.as_tensor(on_grid), data[l1_codes.CODE_SCALE][0])
    grid_sad = np.abs(_codes(grid_words, dim)[:, None, :] - _codes(data[l1_codes.CODES_T].T, dim)[None]).sum(axis=2)
    grid_exact = ref.pairwise_reference(on_grid, vectors, Metric.L1)
    overstated = np.argmax(scale * grid_sad - grid_exact, axis=1)
    grid_cut = grid_sad[np.arange(4), overstated]
    grid_bound = l1_codes.lower_bound(torch.as_tensor(-grid_cut, dtype=torch.float32), grid_error, data).double()
    left_out = grid_sad >= grid_cut[:, None]
    assert (grid_exact[left_out] >= np.broadcast_to(grid_bound.numpy()[:, None], grid_exact.shape)[left_out]).all()
    # Nothing left out: no bound needed (+inf); rows at two scales: no certificate may hold (-inf).
    none_left = l1_codes.lower_bound(torch.full((4,), -float("inf")), query_error, data)
    assert torch.isposinf(none_left).all()
    mixed = dict(data)
    mixed[l1_codes.CODE_SCALE] = data[l1_codes.CODE_SCALE].clone()
    mixed[l1_codes.CODE_SCALE][7] *= 2
    assert torch.isneginf(l1_codes.lower_bound(torch.as_tensor(-cut, dtype=torch.float32), query_error, mixed)).all()


# --- the Triton code scan -------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [23, 32], ids=lambda d: f"D={d}")
def test_triton_code_scan_sums_every_word_and_row(device: str, dim: int) -> None:
    from gpurag_torch import l1_codes
    from gpurag_triton import launch

    triton_on(device)
    rng = np.random.default_rng(44)
    vectors = torch.as_tensor(rng.standard_normal((70, dim)).astype(np.float32), device=device)
    queries = torch.as_tensor(rng.standard_normal((6, dim)).astype(np.float32), device=device)
    data = l1_codes.row_data(vectors)
    words, _ = l1_codes.encode(queries, data[l1_codes.CODE_SCALE][0])
    expected = np.abs(_codes(words, dim)[:, None, :] - _codes(data[l1_codes.CODES_T].T, dim)[None]).sum(axis=2)
    for block_d in (4, 8):  # words a loop step: 6 words (D=23) leave a partial step, 8 (D=32) none with 4
        config = launch.L1Config(4, 16, 2, block_d=block_d)
        scan = launch.l1_scan(words.T.contiguous(), data[l1_codes.CODES_T], 64, config)  # every row kept
        scores, rows = launch.decode(scan.keys.reshape(6, -1))
        got = np.full(expected.shape, -1.0)
        for i in range(6):
            real = rows[i].cpu().numpy() < 70
            got[i, rows[i].cpu().numpy()[real]] = -scores[i].cpu().numpy()[real]
        np.testing.assert_array_equal(got, expected)


def _spy_l1_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    from gpurag_triton import launch

    seen: list[Any] = []
    original = launch.l1_scan

    def spying(queries_t: Any, rows_t: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(rows_t.dtype)
        return original(queries_t, rows_t, *args, **kwargs)

    monkeypatch.setattr(launch, "l1_scan", spying)
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_queries", [2, 17], ids=lambda q: f"Q={q}")
def test_triton_shortlists_from_codes_exactly(device: str, n_queries: int, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = triton_on(device)
    seen = _spy_l1_dtypes(monkeypatch)
    rng = np.random.default_rng(45)
    vectors = _stressed(rng, 300, 19)
    queries = rng.standard_normal((n_queries, 19)).astype(np.float32)
    database = backend.prepare(backend.asarray(vectors, "vectors"), Metric.L1)
    top = backend.topk(backend.asarray(queries, "queries"), database, 6)
    ref.assert_topk_matches(queries, vectors, Metric.L1, backend.to_numpy(top.scores), backend.to_numpy(top.indices), 6)
    assert seen == [torch.int32], f"the scans read {seen}"
    assert backend.queries_rescanned == 0, "plain data must certify"


@pytest.mark.parametrize("device", DEVICES)
def test_triton_leaves_dimensions_past_the_codes_reach_to_the_earlier_scans(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpurag_torch import l1_codes

    backend = triton_on(device)
    seen = _spy_l1_dtypes(monkeypatch)
    rng = np.random.default_rng(51)
    dim = l1_codes.MAX_DIM + 1
    vectors = rng.standard_normal((90, dim)).astype(np.float32)
    queries = rng.standard_normal((3, dim)).astype(np.float32)
    database = backend.prepare(backend.asarray(vectors, "vectors"), Metric.L1)
    top = backend.topk(backend.asarray(queries, "queries"), database, 4)
    ref.assert_topk_matches(queries, vectors, Metric.L1, backend.to_numpy(top.scores), backend.to_numpy(top.indices), 4)
    assert torch.int32 not in seen, f"the scans read {seen}"


def _misleading(dim: int = 8, n_rows: int = 200) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, two queries at 0, the true nearest row) where every other row but one ranks ahead of the nearest by code.

    The scale is 2^-4 (row 0 reaches 127 steps). The nearest row sits 0.51 steps from the queries in every
    dimension (code distance 1 each); each decoy 0.49 steps in half its dimensions (code 0) and 1.49 in the
    rest (code 1): half the code distance, almost twice the l1. The nearest row sits among decoys, so whichever
    split of the rows holds it, the decoys beside it outrank it; ``n_rows`` must outnumber the rows a scan keeps.
    """
    step = np.float32(2.0**-4)
    rows = np.zeros((n_rows, dim), np.float32)
    decoys = np.arange(1, n_rows)
    rows[decoys, : dim // 2] = 0.49 * step
    rows[decoys, dim // 2 :] = 1.49 * step
    rows[decoys, 0] += (decoys * 2.0**-28).astype(np.float32)  # distinct distances, the codes unchanged
    rows[0, 0] = 127 * step
    nearest = n_rows // 2
    rows[nearest] = 0.51 * step
    return rows, np.zeros((2, dim), np.float32), nearest


@pytest.mark.parametrize("device", DEVICES)
def test_triton_rows_whose_codes_mislead_are_answered_exactly(device: str) -> None:
    backend = triton_on(device)
    # On a GPU the scan keeps a few rows of each of hundreds of splits: far more rows than decoys are needed.
    vectors, queries, nearest = _misleading(n_rows=200 if device == "cpu" else 50_000)
    database = backend.prepare(backend.asarray(vectors, "vectors"), Metric.L1)
    top = backend.topk(backend.asarray(queries, "queries"), database, 1)
    ids = backend.to_numpy(top.indices)
    ref.assert_topk_matches(queries, vectors, Metric.L1, backend.to_numpy(top.scores), ids, 1)
    assert ids[:, 0].tolist() == [nearest, nearest]
    assert backend.queries_rescanned == 2, "the shortlist missed the nearest row: no certificate may hold"


@pytest.mark.parametrize("device", DEVICES)
def test_triton_rows_appended_at_another_scale_are_answered_in_float32(device: str) -> None:
    import gpurag

    backend = triton_on(device)
    rng = np.random.default_rng(47)
    first = rng.standard_normal((200, 10)).astype(np.float32)
    second = (rng.standard_normal((100, 10)) * 40).astype(np.float32)  # another code scale
    queries = (rng.standard_normal((5, 10)) * 30).astype(np.float32)
    index = gpurag.ExactRetriever(metric="l1", backend=backend)
    index.add(first)
    index.add(second)
    found = index.search(queries, 4)
    vectors = np.concatenate([first, second])
    ref.assert_topk_matches(queries, vectors, Metric.L1, np.asarray(found.scores), np.asarray(found.ids), 4)
    assert backend.queries_rescanned == 5, "no code certificate may hold across two scales"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_rows", [1, 5], ids=lambda n: f"N={n}")
def test_triton_codes_with_k_equal_to_the_rows(device: str, n_rows: int) -> None:
    backend = triton_on(device)
    rng = np.random.default_rng(48)
    vectors = rng.standard_normal((n_rows, 9)).astype(np.float32)
    queries = rng.standard_normal((3, 9)).astype(np.float32)
    database = backend.prepare(backend.asarray(vectors, "vectors"), Metric.L1)
    top = backend.topk(backend.asarray(queries, "queries"), database, n_rows)
    ref.assert_topk_matches(
        queries, vectors, Metric.L1, backend.to_numpy(top.scores), backend.to_numpy(top.indices), n_rows
    )


def test_triton_boundaries_declare_the_codes_switch() -> None:
    """The conformance kit searches at each declared query count: the codes take over at `L1_CODES_MIN_QUERIES`."""
    from gpurag_triton.backend import L1_CODES_MIN_QUERIES

    backend = triton_on("cpu")
    assert L1_CODES_MIN_QUERIES in backend.boundaries(Metric.L1, 1, 128).queries


# --- the CUDA code scan (a card) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_backend() -> Any:
    from gpurag.errors import BackendUnavailableError

    try:
        from gpurag_cuda.backend import CudaBackend
    except ImportError as exc:  # pragma: no cover - the plugin is installed with the suite
        pytest.skip(str(exc))
    if not CudaBackend.availability():
        pytest.skip(f"cuda backend: {CudaBackend.availability().reason}")
    try:
        return CudaBackend("cuda")
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.mark.gpu
@pytest.mark.parametrize("n_rows", [1, 127, 129, 4097], ids=lambda n: f"N={n}")
@pytest.mark.parametrize("width", [8, 16, 32])
def test_cuda_code_scan_sums_every_word_and_row(cuda_backend: Any, width: int, n_rows: int) -> None:
    from gpurag_cuda import launch
    from gpurag_torch import l1_codes

    rng = np.random.default_rng(49)
    dim = 781  # 196 words: not a multiple of the 4 words in flight
    vectors = torch.as_tensor(rng.standard_normal((n_rows, dim)).astype(np.float32), device="cuda")
    queries = torch.as_tensor(rng.standard_normal((width - 3, dim)).astype(np.float32), device="cuda")
    data = l1_codes.row_data(vectors)
    words, _ = l1_codes.encode(queries, data[l1_codes.CODE_SCALE][0])
    expected = np.abs(_codes(words, dim)[:, None, :] - _codes(data[l1_codes.CODES_T].T, dim)[None]).sum(axis=2)
    whole = data[l1_codes.CODES_T]
    for offset in (0, 1) if n_rows > 1 else (0,):  # aligned rows, and rows from the second on (scalar loads)
        codes_t = whole[:, offset:]
        found = launch.l1_codes_scan(words, codes_t, 16, width)
        keys, rows = found.keys.reshape(words.shape[0], -1).cpu().numpy(), found.rows.reshape(words.shape[0], -1)
        best = -keys.max(axis=1)
        assert (best == expected[:, offset:].min(axis=1)).all()
        rows = rows.cpu().numpy()
        real = rows >= 0
        got = np.take_along_axis(expected[:, offset:], np.where(real, rows, 0), axis=1)
        assert (np.where(real, -keys, got) == got).all(), "each kept key is its row's code distance"


@pytest.mark.gpu
@pytest.mark.parametrize("n_queries", [2, 16, 33, 100, 600])  # 600: 8 splits a query, each keeps 64 keys
def test_cuda_shortlists_from_codes_exactly(cuda_backend: Any, n_queries: int) -> None:
    rng = np.random.default_rng(50)
    vectors = _stressed(rng, 20_000, 100)
    vectors[100:104] = vectors[99]  # duplicate rows: ties broken by the lower row
    queries = rng.standard_normal((n_queries, 100)).astype(np.float32)
    queries[0] = vectors[99]
    cuda_backend.queries_rescanned = 0
    database = cuda_backend.prepare(cuda_backend.asarray(vectors, "vectors"), Metric.L1)
    top = cuda_backend.topk(cuda_backend.asarray(queries, "queries"), database, 10)
    ids = cuda_backend.to_numpy(top.indices)
    ref.assert_topk_matches(queries, vectors, Metric.L1, cuda_backend.to_numpy(top.scores), ids, 10)
    assert ids[0, :5].tolist() == [99, 100, 101, 102, 103]
    assert cuda_backend.queries_rescanned == 0, "plain data must certify"


@pytest.mark.gpu
def test_cuda_rows_whose_codes_mislead_are_answered_exactly(cuda_backend: Any) -> None:
    vectors, queries, nearest = _misleading(n_rows=50_000)
    cuda_backend.queries_rescanned = 0
    database = cuda_backend.prepare(cuda_backend.asarray(vectors, "vectors"), Metric.L1)
    top = cuda_backend.topk(cuda_backend.asarray(queries, "queries"), database, 1)
    ids = cuda_backend.to_numpy(top.indices)
    ref.assert_topk_matches(queries, vectors, Metric.L1, cuda_backend.to_numpy(top.scores), ids, 1)
    assert ids[:, 0].tolist() == [nearest, nearest]
    assert cuda_backend.queries_rescanned == 2, "the shortlist missed the nearest row: no certificate may hold"
