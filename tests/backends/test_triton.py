"""The Triton backend against the conformance kit: on CUDA where there is one, else in the interpreter.

CI has no GPU: run with ``TRITON_INTERPRET=1`` (tests/backends/conftest.py sets it before triton is
imported) the kernels execute on CPU tensors, on the kit's small shapes.
"""

from gpurag.backend import DistanceBackend
from gpurag.testing.conformance import BackendConformance


class TestTritonBackend(BackendConformance):
    backend_name = "triton"
    devices = ("cpu", "cuda")


class TestTritonBackendFloat32Scan(BackendConformance):
    """The float32 kernels alone (the path a query takes when its bf16 certificate fails)."""

    backend_name = "triton"
    devices = ("cpu", "cuda")

    @classmethod
    def make_backend(cls, device: str) -> DistanceBackend:
        """The kit's backend on ``device`` (skipped with the reason where it cannot run), in float32 only."""
        from gpurag_triton.backend import TritonBackend

        resolved = super().make_backend(device)  # the CPU without the interpreter skips here
        return TritonBackend(resolved.device, low_precision=False)
