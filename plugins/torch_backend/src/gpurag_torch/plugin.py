"""Entry point of the ``gpurag-torch`` distribution: registers the PyTorch backend."""

from __future__ import annotations

from gpurag.hookspecs import Register, hookimpl
from gpurag_torch.backend import TorchBackend


@hookimpl
def register_backends(register: Register) -> None:
    """Register `TorchBackend` as ``torch``."""
    register(TorchBackend, "torch")
