"""gpurag's hand-written CUDA distance backend (``cuda``). Importing this package imports neither torch nor cupy."""

from __future__ import annotations
