"""gpurag's PyTorch distance backend (``torch``): exact search on the CPU and on CUDA devices.

Importing this package does not import torch; the backend imports it when it is first used.
"""

from __future__ import annotations

__all__ = ["TorchBackend"]


def __getattr__(name: str) -> object:
    if name == "TorchBackend":
        from gpurag_torch.backend import TorchBackend

        return TorchBackend
    raise AttributeError(name)
