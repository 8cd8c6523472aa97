"""gpurag's CuPy distance backend (``cupy``). Importing this package does not import cupy."""

from __future__ import annotations
