"""Backend tests: without a CUDA device, Triton kernels run in its CPU interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so it is set
here, at collection, before the Triton backend's kernel modules are imported.
"""

from __future__ import annotations

import os


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
