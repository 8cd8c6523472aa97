"""Entry point of the ``gpurag-cuda`` distribution: registers the CUDA backend."""

from __future__ import annotations

from gpurag.hookspecs import Register, hookimpl
from gpurag_cuda.backend import CudaBackend


@hookimpl
def register_backends(register: Register) -> None:
    """Register `CudaBackend` as ``cuda``."""
    register(CudaBackend, "cuda")
