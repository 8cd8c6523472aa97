"""Turning what a caller hands in into checked float32 tensors on a device, and back to NumPy."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from gpurag.arrays import as_matrix
from gpurag.errors import InvalidInputError


def parse_device(device: str) -> torch.device:
    """``device`` as a torch device: ``cpu``, ``cuda`` (the current one) or ``cuda:n``."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"device must be 'cpu', 'cuda' or 'cuda:<n>'; got {device!r}") from exc
    if parsed.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device must be 'cpu', 'cuda' or 'cuda:<n>'; got {device!r}")
    if parsed.type == "cuda" and parsed.index is None and torch.cuda.is_available():
        parsed = torch.device("cuda", torch.cuda.current_device())
    return parsed


def _from_foreign(x: Any) -> torch.Tensor | None:
    """``x`` as a tensor without copying when it is one or exports DLPack; None for host arrays."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray | list | tuple) or not hasattr(x, "__dlpack__"):
        return None
    try:
        return torch.utils.dlpack.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError, ValueError):
        return None


def as_device_matrix(x: Any, name: str, device: torch.device, *, dim: int | None = None) -> torch.Tensor:
    """``x`` as a C-contiguous float32 (rows, dim) tensor on ``device``, checked like `gpurag.arrays.as_matrix`.

    torch tensors and DLPack producers already on ``device`` in float32 are used without a copy
    (a non-contiguous one is made contiguous there); their finiteness is checked on the device.
    Anything else is checked on the host and copied up once.
    """
    tensor = _from_foreign(x)
    if tensor is None:
        return torch.from_numpy(as_matrix(x, name, dim=dim)).to(device)
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise InvalidInputError(f"{name} must hold real numbers; got dtype {tensor.dtype}")
    if tensor.ndim != 2:
        hint = " (use x.reshape(1, -1) for a single vector)" if tensor.ndim == 1 else ""
        raise InvalidInputError(f"{name} must be 2-D (rows, dim); got shape {tuple(tensor.shape)}{hint}")
    if tensor.shape[1] == 0:
        raise InvalidInputError(f"{name} must have dimension >= 1; got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise InvalidInputError(f"{name} must have at least one row; got shape {tuple(tensor.shape)}")
    if dim is not None and tensor.shape[1] != dim:
        raise InvalidInputError(f"{name} has dimension {tensor.shape[1]}, the index has {dim}")
    out = tensor.detach().to(device=device, dtype=torch.float32).contiguous()
    # A float64 sum of float32 values cannot overflow: it is finite exactly when every value is (one
    # reduction and one small copy, the search's only synchronisation before its result).
    if not math.isfinite(float(out.sum(dtype=torch.float64))):
        bad = torch.nonzero(~torch.isfinite(out))[0].tolist()
        source_finite = bool(torch.isfinite(tensor[bad[0], bad[1]])) if tensor.is_floating_point() else True
        source = "a value too large for float32" if source_finite else "NaN or inf"
        raise InvalidInputError(f"{name} must be finite; row {bad[0]}, column {bad[1]} holds {source}")
    return out


def to_numpy(x: Any) -> np.ndarray[Any, Any]:
    """A host NumPy copy (or view, for CPU tensors) of a tensor; other arrays pass through NumPy."""
    if isinstance(x, torch.Tensor):
        return np.asarray(x.detach().cpu().numpy())
    return np.asarray(x)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """float32 matrix products in IEEE float32 (no TF32) and bf16 products with float32 reductions."""
    matmul = torch.backends.cuda.matmul
    saved = (
        matmul.allow_tf32,
        matmul.allow_bf16_reduced_precision_reduction,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    matmul.allow_tf32 = False
    matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        (
            matmul.allow_tf32,
            matmul.allow_bf16_reduced_precision_reduction,
            torch.backends.cudnn.allow_tf32,
            precision,
        ) = saved
        torch.set_float32_matmul_precision(precision)
