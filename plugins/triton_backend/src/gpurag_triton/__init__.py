"""gpurag's Triton distance backend (``triton``). Importing this package imports neither torch nor triton."""

from __future__ import annotations
