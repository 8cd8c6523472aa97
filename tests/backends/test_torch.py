"""The PyTorch backend against the conformance kit, on the CPU and (where there is one) on CUDA."""

from gpurag.backend import DistanceBackend
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
