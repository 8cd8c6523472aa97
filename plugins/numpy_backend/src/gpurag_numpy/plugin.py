"""Entry point of the ``gpurag-numpy`` distribution: registers the NumPy backend."""

from __future__ import annotations

from gpurag.hookspecs import Register, hookimpl
from gpurag_numpy.backend import NumpyBackend


@hookimpl
def register_backends(register: Register) -> None:
    """Register `NumpyBackend` as ``numpy``."""
    register(NumpyBackend, "numpy")
