"""The NumPy distance backend for gpurag."""

from gpurag_numpy.backend import NumpyBackend

__all__ = ["NumpyBackend"]
