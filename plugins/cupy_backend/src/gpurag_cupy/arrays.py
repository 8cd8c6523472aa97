"""Turning what a caller hands in into checked float32 CuPy arrays on one device, sharing torch's stream.

Device arrays (CuPy, torch CUDA tensors, any DLPack producer on a CUDA device) are taken without a
copy where they already are float32 and C-contiguous on the device; host arrays are checked by
`gpurag.arrays.as_matrix` and copied up once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Iterator
from typing import Any

import cupy
import numpy as np

from gpurag.arrays import as_matrix, to_host
from gpurag.errors import InvalidInputError

#: Host arrays up to this many entries have their largest magnitude measured on the way up.
SMALL_HOST_ELEMENTS = 1 << 20
#: DLPack's device type of CUDA memory (kDLCUDA).
DLPACK_CUDA = 2

#: Blocks per multiprocessor of the `largest_magnitude` kernel, at most.
MAGNITUDE_BLOCKS_PER_SM = 4


def queue_largest_magnitude(array: cupy.ndarray, bits: cupy.ndarray | None = None) -> cupy.ndarray:
    """A (1,) uint32 device array that will hold the largest bit pattern of |x| over a C-contiguous float32
    array (as a float: the largest |x|, NaN where an entry is NaN, inf where one is infinite); queued only.

    One launch (``largest_magnitude_bits``; NaN's patterns are above inf's), into ``bits`` where given
    (zeroed), else into a new zeroed array. (A `ReductionKernel` was tried first: CuPy renames its
    input by plain text replacement, which broke a hex literal; W2, H200. CuPy's ``abs`` then ``max``
    took three launches and a temporary.)
    """
    from gpurag_cupy.kernels import kernel
    from gpurag_cupy.select import BLOCK, multiprocessors

    if bits is None:
        bits = cupy.zeros(1, dtype=cupy.uint32)
    n = int(array.size)
    blocks = max(1, min(-(-n // BLOCK), MAGNITUDE_BLOCKS_PER_SM * multiprocessors(cupy.cuda.Device().id)))
    kernel("largest_magnitude_bits")((blocks,), (BLOCK,), (array, np.int64(n), bits))
    return bits


def read_magnitude(bits: cupy.ndarray) -> float:
    """The float `queue_largest_magnitude`'s array holds (waits for it)."""
    return float(bits.get().view(np.float32)[0])


def largest_magnitude(array: cupy.ndarray) -> float:
    """The largest |x| of a C-contiguous float32 array: NaN where an entry is NaN, inf where one is infinite."""
    return read_magnitude(queue_largest_magnitude(array))


@dataclasses.dataclass
class PendingCheck:
    """The finiteness check of a device array converted by `as_device_matrix`, not yet made: `queue` puts
    its kernel on the card (after a search, say), `resolve` reads it and raises where an entry is not finite."""

    array: cupy.ndarray
    source: cupy.ndarray
    name: str
    #: The stream the array was handed in on (torch's, for torch tensors): work on the array joins it.
    stream: Any = dataclasses.field(default_factory=lambda: cupy.cuda.get_current_stream())
    bits: cupy.ndarray | None = None

    def queue(self, bits: cupy.ndarray | None = None) -> cupy.ndarray:
        """Queue the magnitude kernel (once) on the current stream, into ``bits`` (zeroed) where given."""
        if self.bits is None:
            self.bits = queue_largest_magnitude(self.array, bits)
        return self.bits

    def resolve(self, largest: float | None = None) -> float:
        """The array's largest |x| (``largest`` where it was read already); an `InvalidInputError` naming
        an entry that is not finite."""
        if largest is None:
            largest = read_magnitude(self.queue())
        check_finite(self.array, self.source, self.name, largest)
        return largest


def check_finite(out: cupy.ndarray, source: cupy.ndarray, name: str, largest: float) -> None:
    """An `InvalidInputError` naming the first entry of ``out`` (converted from ``source``) that is not finite,
    where ``largest`` (its largest |x|) says there is one."""
    if source.dtype.kind == "f" and not np.isfinite(largest):
        bad = cupy.argwhere(~cupy.isfinite(out))[0].get().tolist()
        held = "NaN or inf" if not bool(cupy.isfinite(source[bad[0], bad[1]])) else "a value too large for float32"
        raise InvalidInputError(f"{name} must be finite; row {bad[0]}, column {bad[1]} holds {held}")


def is_torch_cuda(x: Any) -> bool:
    """Whether ``x`` is a torch tensor on a CUDA device (torch is not imported to find out)."""
    return type(x).__module__.split(".")[0] == "torch" and bool(getattr(x, "is_cuda", False))


def foreign_device_array(x: Any) -> cupy.ndarray | None:
    """``x`` as a CuPy array without copying when it lives on a CUDA device; None for host data."""
    if isinstance(x, cupy.ndarray):
        return x
    if isinstance(x, np.ndarray | list | tuple) or not hasattr(x, "__dlpack__"):
        return None
    if is_torch_cuda(x):
        view = torch_float32_view(x)
        return view if view is not None else cupy.from_dlpack(x.detach())
    try:
        device_type = int(x.__dlpack_device__()[0])
    except (AttributeError, TypeError, ValueError):
        return None
    return cupy.from_dlpack(x) if device_type == DLPACK_CUDA else None


def torch_float32_view(x: Any) -> cupy.ndarray | None:
    """A C-contiguous 2-D float32 torch CUDA tensor as a CuPy array over its memory, None for any other tensor.

    The tensor is kept alive by the array; no DLPack capsule is made (a search of one query spends
    tens of microseconds before its score pass otherwise).
    """
    import torch

    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() or x.numel() == 0:
        return None
    memory = cupy.cuda.UnownedMemory(x.data_ptr(), x.numel() * 4, x, x.device.index)
    return cupy.ndarray(tuple(x.shape), cupy.float32, cupy.cuda.MemoryPointer(memory, 0))


def device_matrix_pointer(x: Any, device: int) -> tuple[int, tuple[int, int]] | None:
    """(device address, (rows, dim)) of a non-empty C-contiguous 2-D float32 CuPy array or torch tensor on
    CUDA device ``device``; None for anything else."""
    if isinstance(x, cupy.ndarray):
        if x.dtype != cupy.float32 or x.ndim != 2 or not x.flags.c_contiguous or x.size == 0 or x.device.id != device:
            return None
        return int(x.data.ptr), (int(x.shape[0]), int(x.shape[1]))
    if not is_torch_cuda(x):
        return None
    import torch

    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() or x.numel() == 0 or x.device.index != device:
        return None
    return int(x.data_ptr()), (int(x.shape[0]), int(x.shape[1]))


@functools.lru_cache(maxsize=64)
def external_stream(pointer: int) -> Any:
    """The CuPy stream object of CUDA stream ``pointer``, its device unstated as `Stream.from_external`
    leaves it (made once per stream: a search of one query should not pay for it each time)."""
    with warnings.catch_warnings():  # ExternalStream is deprecated in CuPy 14, for from_external (an object)
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(pointer)


@contextlib.contextmanager
def torch_stream(like: Any) -> Iterator[None]:
    """Run the CuPy work inside on torch's current stream when ``like`` is a torch CUDA tensor.

    Kernels and cuBLAS calls are then ordered with the caller's torch work on that stream, and the
    results may be read by torch without a synchronisation.
    """
    if not is_torch_cuda(like):
        yield
        return
    import torch

    current = torch.cuda.current_stream(like.device)
    with external_stream(int(current.cuda_stream)):
        yield


def as_device_matrix(
    x: Any, name: str, *, dim: int | None = None, defer_check: bool = False
) -> tuple[cupy.ndarray, float | PendingCheck | None]:
    """``x`` as a C-contiguous float32 (rows, dim) CuPy array on the current device, checked like `as_matrix`,
    and its largest magnitude where that came for free (device arrays; small host arrays), else None.

    A device array already float32 and C-contiguous on the current device is used as it is; other
    device arrays are converted there (non-contiguous, other dtypes, another card). Finiteness is
    checked on the device; with ``defer_check`` a device array's check is left for later, returned as
    a `PendingCheck` in place of the magnitude.
    """
    array = foreign_device_array(x)
    if array is None:
        host = as_matrix(x, name, dim=dim)
        largest = float(np.abs(host).max()) if host.size <= SMALL_HOST_ELEMENTS else None
        return cupy.asarray(host), largest
    if array.dtype.kind not in "biuf":
        raise InvalidInputError(f"{name} must hold real numbers; got dtype {array.dtype}")
    if array.ndim != 2:
        hint = " (use x.reshape(1, -1) for a single vector)" if array.ndim == 1 else ""
        raise InvalidInputError(f"{name} must be 2-D (rows, dim); got shape {tuple(array.shape)}{hint}")
    if array.shape[1] == 0:
        raise InvalidInputError(f"{name} must have dimension >= 1; got shape {tuple(array.shape)}")
    if array.shape[0] == 0:
        raise InvalidInputError(f"{name} must have at least one row; got shape {tuple(array.shape)}")
    if dim is not None and array.shape[1] != dim:
        raise InvalidInputError(f"{name} has dimension {array.shape[1]}, the index has {dim}")
    if array.device.id != cupy.cuda.Device().id:
        array = cupy.asarray(array)  # a peer copy onto this card
    if array.dtype.kind in "iu" and float(cupy.abs(array).max()) > float(np.finfo(np.float32).max):
        raise InvalidInputError(f"{name} holds an integer too large for float32")
    out = cupy.ascontiguousarray(array, dtype=cupy.float32)
    if defer_check:
        return out, PendingCheck(out, array, name)
    largest = largest_magnitude(out)
    check_finite(out, array, name, largest)
    return out, largest


def as_device_codes(x: Any, name: str) -> cupy.ndarray:
    """``x`` as a C-contiguous uint8 (rows, bytes) CuPy array of packed codes on the current device."""
    array = foreign_device_array(x)
    if array is None:
        host = np.asarray(to_host(x))
        if host.dtype != np.uint8:
            raise InvalidInputError(f"{name} must be uint8 packed codes; got dtype {host.dtype}")
        array = cupy.asarray(host)
    if array.dtype != cupy.uint8:
        raise InvalidInputError(f"{name} must be uint8 packed codes; got dtype {array.dtype}")
    if array.ndim != 2:
        raise InvalidInputError(f"{name} must be 2-D (rows, bytes); got shape {tuple(array.shape)}")
    if array.device.id != cupy.cuda.Device().id:
        array = cupy.asarray(array)
    return cupy.ascontiguousarray(array)


def to_numpy(x: Any) -> np.ndarray[Any, Any]:
    """A host NumPy copy of a CuPy array; other arrays through `gpurag.arrays.to_host`."""
    if isinstance(x, cupy.ndarray):
        return np.asarray(x.get())
    return to_host(x)
