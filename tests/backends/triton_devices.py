"""The Triton backend on a test's device: CUDA only on a GPU, the CPU only under the interpreter."""

from __future__ import annotations

from typing import Any

import pytest

#: Parameters for a test's ``device``: ``cuda`` is marked ``gpu``.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu])]


def triton_on(device: str) -> Any:
    """A low-precision `TritonBackend` on ``device``, or the test skipped with the reason it cannot run there."""
    from gpurag_triton.backend import TritonBackend

    availability = TritonBackend.availability()
    if not availability or (device == "cuda" and TritonBackend.default_device() != "cuda"):
        pytest.skip(f"triton on {device}: {availability.reason or 'no CUDA device'}")
    if device == "cpu" and TritonBackend.default_device() == "cuda":
        pytest.skip("triton runs on the CPU only under the interpreter")
    return TritonBackend(device, low_precision=True)
