"""The certified bf16 shortlist of the torch and Triton backends: exact where it certifies, never wrong where not.

The conformance kit checks answers; these tests also check that the certificate *holds* on ordinary
data (a broken shortlist would otherwise hide behind the float32 re-scan) and that inputs built to
break a bf16 ranking are answered exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from triton_devices import triton_on

from gpurag.backend import DistanceBackend
from gpurag.errors import InvalidInputError
from gpurag.metrics import Metric
from gpurag.testing import reference as ref


class _DLPackOnly:
    """Exports a tensor through the DLPack protocol and nothing else."""

    def __init__(self, tensor: object) -> None:
        self._tensor = tensor

    def __dlpack__(self, **kwargs: object) -> object:
        return self._tensor.__dlpack__(**kwargs)  # type: ignore[attr-defined]

    def __dlpack_device__(self) -> object:
        return self._tensor.__dlpack_device__()  # type: ignore[attr-defined]


def _backends() -> list[object]:
    params: list[object] = []
    for name in ("torch", "triton"):
        for device in ("cpu", "cuda"):
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(name, device, marks=marks, id=f"{name}-{device}"))
    params.append(pytest.param("cuda", "cuda", marks=[pytest.mark.gpu], id="cuda-cuda"))
    return params


def _backend(name: str, device: str) -> DistanceBackend:
    if name == "torch":
        from gpurag_torch.backend import TorchBackend

        if device == "cuda" and TorchBackend.default_device() != "cuda":
            pytest.skip("no CUDA device")
        return TorchBackend(device, low_precision=True, chunk_scores=4096)
    if name == "cuda":
        from gpurag_cuda.backend import CudaBackend

        if not CudaBackend.availability():
            pytest.skip(f"cuda backend: {CudaBackend.availability().reason}")
        return CudaBackend(device, low_precision=True)
    return triton_on(device)


def _search(backend: DistanceBackend, queries: np.ndarray, vectors: np.ndarray, metric: Metric, k: int) -> tuple:
    database = backend.prepare(backend.asarray(vectors, "vectors"), metric)
    top = backend.topk(backend.asarray(queries, "queries"), database, k)
    return backend.to_numpy(top.scores), backend.to_numpy(top.indices)


@pytest.mark.parametrize(("name", "device"), _backends())
@pytest.mark.parametrize("metric", [Metric.DOT, Metric.L2, Metric.COSINE, Metric.L1], ids=str)
def test_shortlist_certifies_every_query_on_gaussian_data(name: str, device: str, metric: Metric) -> None:
    backend = _backend(name, device)
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((600, 32)).astype(np.float32)
    queries = rng.standard_normal((6, 32)).astype(np.float32)
    scores, ids = _search(backend, queries, vectors, metric, 5)
    ref.assert_topk_matches(queries, vectors, metric, scores, ids, 5)
    if metric is not Metric.L1 or name in ("triton", "cuda"):  # torch's l1 has no shortlist
        assert backend.queries_searched == 6, f"the shortlist answered {backend.queries_searched} of 6 queries"
        assert backend.queries_rescanned == 0, f"{backend.queries_rescanned} of 6 certificates failed on plain data"


@pytest.mark.parametrize(("name", "device"), _backends())
@pytest.mark.parametrize("metric", [Metric.DOT, Metric.L2, Metric.COSINE], ids=str)
def test_near_ties_below_bf16_resolution_are_ranked_exactly(name: str, device: str, metric: Metric) -> None:
    backend = _backend(name, device)
    rng = np.random.default_rng(11)
    base = rng.standard_normal(781).astype(np.float32)  # D = 781: a multiple of no block size
    # Rows that bf16 cannot tell apart, more than the shortlist keeps (the interpreter's keeps 24):
    # the base plus differences in the low mantissa bits.
    ties = 60 if name == "triton" and device == "cpu" else 400
    vectors = np.repeat(base[None, :], ties + 40, axis=0)
    vectors[:ties] += rng.standard_normal((ties, 781)).astype(np.float32) * np.float32(1e-4)
    vectors[ties:] = rng.standard_normal((40, 781)).astype(np.float32)
    queries = (base + rng.standard_normal(781).astype(np.float32) * np.float32(1e-3))[None, :].astype(np.float32)
    scores, ids = _search(backend, queries, vectors, metric, 7)
    ref.assert_topk_matches(queries, vectors, metric, scores, ids, 7)
    assert backend.queries_rescanned >= 1, "near-ties below bf16 resolution must fail the certificate and be re-scanned"


@pytest.mark.parametrize(("name", "device"), _backends())
@pytest.mark.parametrize("metric", [Metric.DOT, Metric.L2, Metric.COSINE, Metric.L1], ids=str)
def test_huge_and_tiny_norms_k_equal_n_and_non_contiguous_input(name: str, device: str, metric: Metric) -> None:
    backend = _backend(name, device)
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((40, 17)).astype(np.float32)
    vectors[::3] *= np.float32(1e15)
    vectors[1::3] *= np.float32(1e-15)
    wide = rng.standard_normal((3, 34)).astype(np.float32)
    queries = wide[:, ::2]  # non-contiguous
    scores, ids = _search(backend, queries, vectors, metric, 40)
    ref.assert_topk_matches(queries, vectors, metric, scores, ids, 40)
    assert sorted(ids[0].tolist()) == list(range(40))


@pytest.mark.parametrize(("name", "device"), _backends())
def test_a_dlpack_tensor_on_the_device_is_used_without_a_copy(name: str, device: str) -> None:
    import torch

    backend = _backend(name, device)
    x = torch.randn(50, 9, device=device)
    assert backend.asarray(x, "vectors").data_ptr() == x.data_ptr()
    from_dlpack = backend.asarray(_DLPackOnly(x), "vectors")  # any DLPack producer, not only torch
    assert from_dlpack.data_ptr() == x.data_ptr()
    view = backend.asarray(x[:, ::2], "vectors")  # non-contiguous: one copy, on the device
    assert view.is_contiguous()
    assert view.device.type == x.device.type
    bad = x.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(InvalidInputError, match="finite"):
        backend.asarray(bad, "vectors")
