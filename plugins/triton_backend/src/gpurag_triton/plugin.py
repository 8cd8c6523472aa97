"""Entry point of the ``gpurag-triton`` distribution: registers the Triton backend."""

from __future__ import annotations

from gpurag.hookspecs import Register, hookimpl
from gpurag_triton.backend import TritonBackend


@hookimpl
def register_backends(register: Register) -> None:
    """Register `TritonBackend` as ``triton``."""
    register(TritonBackend, "triton")
