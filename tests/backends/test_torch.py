"""The PyTorch backend against the conformance kit, on the CPU and (where there is one) on CUDA."""

import numpy as np
import pytest

from gpurag.backend import DistanceBackend
from gpurag.errors import InvalidInputError
from gpurag.testing.conformance import BackendConformance


class TestTorchBackend(BackendConformance):
    backend_name = "torch"
    devices = ("cpu", "cuda")


class TestTorchBackendBf16ShortlistOnCpu(BackendConformance):
    """The certified bf16 shortlist that CUDA uses, forced on the CPU with tiny chunks (many chunks per search)."""

    backend_name = "torch"

    @classmethod
    def make_backend(cls, device: str) -> DistanceBackend:
        from gpurag_torch.backend import TorchBackend

        return TorchBackend(device, low_precision=True, chunk_scores=64)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("metric", ["l2", "dot", "cosine", "l1"])
def test_search_out_device_returns_tensors_equal_to_the_numpy_answer(device: str, metric: str) -> None:
    import torch

    import gpurag

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((300, 12)).astype(np.float32)
    queries = torch.from_numpy(rng.standard_normal((9, 12)).astype(np.float32)).to(device)
    index = gpurag.ExactRetriever(metric=metric, backend="torch", device=device, memory_budget_bytes=4096)
    index.add(vectors, ids=np.arange(300, dtype=np.int64) * 7 + 3)
    on_host = index.search(queries, 305)
    on_device = index.search(queries, 305, out="device")
    assert isinstance(on_device.scores, torch.Tensor)
    assert isinstance(on_device.ids, torch.Tensor)
    assert on_device.ids.device.type == device
    np.testing.assert_array_equal(on_device.ids.cpu().numpy(), on_host.ids)
    np.testing.assert_array_equal(on_device.scores.cpu().numpy(), on_host.scores)
    with pytest.raises(InvalidInputError, match="out"):
        index.search(queries, 3, out="gpu")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
def test_lsh_search_out_device_returns_tensors_equal_to_the_numpy_answer(device: str, metric: str) -> None:
    import torch

    from gpurag.lsh import LSHRetriever

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((300, 12)).astype(np.float32)
    queries = torch.from_numpy(rng.standard_normal((9, 12)).astype(np.float32)).to(device)
    # A budget this small splits the queries into several blocks, stacked on the device.
    index = LSHRetriever(metric, "torch", n_bits=32, n_candidates=400, device=device, memory_budget_bytes=8192)
    index.add(vectors, ids=np.arange(300, dtype=np.int64) * 7 + 3)
    for k in (5, 305):
        on_host = index.search(queries, k)
        on_device = index.search(queries, k, out="device")
        assert isinstance(on_device.ids, torch.Tensor)
        assert on_device.ids.device.type == device
        np.testing.assert_array_equal(on_device.ids.cpu().numpy(), on_host.ids)
        np.testing.assert_array_equal(on_device.scores.cpu().numpy(), on_host.scores)
    with pytest.raises(InvalidInputError, match="out"):
        index.search(queries, 3, out="gpu")


def test_auto_on_a_cpu_prefers_numpy_over_torch_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import gpurag

    monkeypatch.setenv("GPURAG_BACKEND_PREFERENCE", json.dumps(["torch", "numpy"]))
    gpurag.get_settings.cache_clear()
    try:
        assert gpurag.get_backend("auto", device="cpu").name == "numpy"
        if gpurag.get_backend("torch").device == "cpu":  # no CUDA: torch would land on the CPU
            assert gpurag.get_backend("auto").name == "numpy"
        monkeypatch.setenv("GPURAG_CPU_BACKEND_PREFERENCE", json.dumps(["torch"]))
        gpurag.get_settings.cache_clear()
        assert gpurag.get_backend("auto", device="cpu").name == "torch"
    finally:
        gpurag.get_settings.cache_clear()
