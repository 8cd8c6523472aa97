"""The NumPy backend against the conformance kit."""

from gpurag.testing.conformance import BackendConformance


class TestNumpyBackend(BackendConformance):
    backend_name = "numpy"
