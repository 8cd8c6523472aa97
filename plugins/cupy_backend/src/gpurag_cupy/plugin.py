"""Entry point of the ``gpurag-cupy`` distribution: registers the CuPy backend."""

from __future__ import annotations

from gpurag.hookspecs import Register, hookimpl
from gpurag_cupy.backend import CupyBackend


@hookimpl
def register_backends(register: Register) -> None:
    """Register `CupyBackend` as ``cupy``."""
    register(CupyBackend, "cupy")
