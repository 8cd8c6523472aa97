"""The Triton backend's l1 kernels: the register-blocked tile (float32, bf16) and the float16 shortlist
(which the byte codes of `test_l1_codes.py` replace where they are on; these tests turn them off).

The tile sums chunks of BLOCK_D dimensions at a time; the float16 path sums each chunk in float16
and must stay within `half_l1_bounds`, or the certificate it feeds could pass a wrong answer. Many
queries (above `L1_LOW_MAX_QUERIES`) shortlist in float16 only while every element lies within
`L1_HALF_REACH`; beyond it they are scanned in float32. In CI the kernels run in the interpreter.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from triton_devices import DEVICES, triton_on

from gpurag.metrics import Metric
from gpurag.testing import reference as ref

pytest.importorskip("triton")
torch = pytest.importorskip("torch")


def _scan_scores(queries: Any, vectors: Any, dtype: Any, device: str, block_d: int) -> tuple[Any, Any]:
    """Every (query, row) l1 score the kernel computes (kp = all rows of a split), as float64 (Q, N), and rows."""
    from gpurag_triton import launch

    q = torch.as_tensor(queries, device=device).to(dtype).T.contiguous()
    x = torch.as_tensor(vectors, device=device).to(dtype).T.contiguous()
    n = x.shape[1]
    config = launch.L1Config(4, 16, 2, block_d=block_d)
    scan = launch.l1_scan(q, x, 64, config)  # 2 splits of at most 64 rows each: every row is kept
    scores, rows = launch.decode(scan.keys.reshape(q.shape[1], -1))
    out = np.full((q.shape[1], n), np.nan)
    real = rows.cpu().numpy() < n
    for i in range(q.shape[1]):
        out[i, rows.cpu().numpy()[i][real[i]]] = -scores.cpu().numpy()[i][real[i]]
    return out, real


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [21, 32], ids=lambda d: f"D={d}")
def test_float16_chunk_sums_stay_within_their_bound(device: str, dim: int) -> None:
    from gpurag_triton import launch
    from gpurag_triton.backend import L1_HALF_REACH, half_l1_bounds

    triton_on(device)
    rng = np.random.default_rng(31)
    n = 100
    # Ordinary values, values near the float16 reach (large chunk sums), tiny ones (float16 subnormals),
    # and values that differ from the queries' only in low mantissa bits.
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors[10:20] *= np.float32(L1_HALF_REACH / 4)
    vectors[20:30] *= np.float32(2.0**-16)
    queries = rng.standard_normal((5, dim)).astype(np.float32)
    queries[1] *= np.float32(L1_HALF_REACH / 4)
    queries[2] *= np.float32(2.0**-16)
    vectors[30:35] = queries[0] * np.float32(1 + 2.0**-12)
    exact = ref.pairwise_reference(queries, vectors, Metric.L1)
    rel, floor = half_l1_bounds(dim, launch.L1_HALF_CHUNK)
    bound = rel * (np.abs(queries).sum(1, dtype=np.float64)[:, None] + np.abs(vectors).sum(1, dtype=np.float64)) + floor
    for steps in (1, 2):  # a loop step of one chunk, and of two (the chunk, and so the bound, stay the same)
        scores, _ = _scan_scores(queries, vectors, torch.float16, device, steps * launch.L1_HALF_CHUNK)
        assert not np.isnan(scores).any(), "a row was not scored"
        error = np.abs(scores - exact)
        assert (error <= bound).all(), f"worst error / bound: {float((error / bound).max()):.3f}"
        # The bound is not vacuous: float16 rounding shows, and stays well inside it.
        assert float((error / bound).max()) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tile_sums_every_chunk_and_row(device: str, dtype: str) -> None:
    triton_on(device)
    rng = np.random.default_rng(32)
    dim = 23  # neither chunk size (4, 8) divides it
    vectors = rng.standard_normal((70, dim)).astype(np.float32)
    queries = rng.standard_normal((6, dim)).astype(np.float32)
    torch_dtype = getattr(torch, dtype)
    for block_d in (4, 8):
        scores, _ = _scan_scores(queries, vectors, torch_dtype, device, block_d)
        rounded_q = torch.as_tensor(queries).to(torch_dtype).double().numpy()
        rounded_x = torch.as_tensor(vectors).to(torch_dtype).double().numpy()
        exact = ref.pairwise_reference(rounded_q, rounded_x, Metric.L1)
        np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)


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
def test_many_queries_shortlist_in_float16_exactly(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = triton_on(device)
    backend.l1_codes = False  # the float16 shortlist (the byte codes would take these queries)
    seen = _spy_l1_dtypes(monkeypatch)
    rng = np.random.default_rng(33)
    vectors = rng.standard_normal((300, 19)).astype(np.float32)
    queries = rng.standard_normal((17, 19)).astype(np.float32)  # one more than the bf16 path takes
    database = backend.prepare(backend.asarray(vectors, "vectors"), Metric.L1)
    top = backend.topk(backend.asarray(queries, "queries"), database, 6)
    ref.assert_topk_matches(queries, vectors, Metric.L1, backend.to_numpy(top.scores), backend.to_numpy(top.indices), 6)
    assert seen == [torch.float16], f"the scans read {seen}"
    assert backend.queries_rescanned == 0, "plain data must certify"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the float16 scan
@pytest.mark.parametrize("device", DEVICES)
def test_values_beyond_float16_reach_are_answered_in_float32(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpurag_triton.backend import L1_HALF_REACH

    backend = triton_on(device)
    backend.l1_codes = False  # the float16 shortlist (the byte codes would take these queries)
    seen = _spy_l1_dtypes(monkeypatch)
    rng = np.random.default_rng(34)
    vectors = rng.standard_normal((200, 9)).astype(np.float32)
    vectors[50] *= np.float32(L1_HALF_REACH * 64)  # float16 would hold inf for this row
    queries = rng.standard_normal((20, 9)).astype(np.float32)
    queries[3] = vectors[50] * np.float32(1.0001)  # its nearest row is the huge one
    database = backend.prepare(backend.asarray(vectors, "vectors"), Metric.L1)
    top = backend.topk(backend.asarray(queries, "queries"), database, 4)
    ids = backend.to_numpy(top.indices)
    ref.assert_topk_matches(queries, vectors, Metric.L1, backend.to_numpy(top.scores), ids, 4)
    assert ids[3, 0] == 50
    assert seen == [torch.float16, torch.float32], f"the scans read {seen}"
    assert backend.queries_rescanned == 20, "no float16 certificate may hold beyond the reach"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("codes", "seed"), [(False, 35), (True, 46)], ids=["float16", "byte codes"])
def test_near_ties_are_certified_or_answered_again(device: str, codes: bool, seed: int) -> None:
    """Either many-query shortlist (float16 sums or the l1 byte codes) with rows closer than it can tell apart."""
    backend = triton_on(device)
    backend.l1_codes = codes
    rng = np.random.default_rng(seed)
    dim = 12
    vectors = rng.standard_normal((600, dim)).astype(np.float32)
    queries = rng.standard_normal((18, dim)).astype(np.float32)
    # For each query, rows closer than the shortlist can tell apart: l1 distances 1, 1 + 2^-14, 1 + 2^-13, ...
    for i in range(3):
        for j in range(4):
            row = 200 + 4 * i + j
            vectors[row] = queries[i]
            vectors[row, 0] += np.float32(1 + j * 2.0**-14)
    database = backend.prepare(backend.asarray(vectors, "vectors"), Metric.L1)
    top = backend.topk(backend.asarray(queries, "queries"), database, 3)
    ids = backend.to_numpy(top.indices)
    ref.assert_topk_matches(queries, vectors, Metric.L1, backend.to_numpy(top.scores), ids, 3)
    for i in range(3):
        assert ids[i].tolist() == [200 + 4 * i, 201 + 4 * i, 202 + 4 * i]


def test_boundaries_declare_the_float16_switch() -> None:
    """The conformance kit searches one query past each declared query boundary: 17 takes the float16 path."""
    from gpurag_triton.backend import L1_LOW_MAX_QUERIES

    backend = triton_on("cpu")
    backend.l1_codes = False
    assert L1_LOW_MAX_QUERIES in backend.boundaries(Metric.L1, 1, 128).queries
