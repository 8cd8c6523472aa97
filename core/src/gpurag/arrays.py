"""Turning whatever array a user hands in into a checked float32 matrix, and ids into int64."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from gpurag.errors import InvalidInputError

FloatMatrix = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]
#: The largest int64.
INT64_MAX = int(np.iinfo(np.int64).max)


def to_host(x: Any) -> np.ndarray[Any, Any]:
    """A NumPy view or copy of ``x``: NumPy, lists, torch and CuPy tensors, or anything with ``__dlpack__``."""
    if isinstance(x, np.ndarray):
        return x
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        return np.asarray(x.detach().cpu().numpy())
    if module == "cupy":
        return np.asarray(x.get())
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError):
            pass
    return np.asarray(x)


def as_matrix(x: Any, name: str, *, dim: int | None = None, allow_empty: bool = False) -> FloatMatrix:
    """``x`` as a C-contiguous float32 (rows, dim) array, checked to be numeric, 2-D and finite.

    float64, integer, non-contiguous and Fortran-ordered input is converted; anything that is not a
    real number is an `InvalidInputError` that names ``name``.
    """
    try:
        host = to_host(x)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"{name} must be a numeric 2-D array; could not read it as one ({exc})") from exc
    if host.dtype.kind not in "biuf":
        raise InvalidInputError(f"{name} must hold real numbers; got dtype {host.dtype}")
    if host.ndim != 2:
        hint = " (use x.reshape(1, -1) for a single vector)" if host.ndim == 1 else ""
        raise InvalidInputError(f"{name} must be 2-D (rows, dim); got shape {host.shape}{hint}")
    if host.shape[1] == 0:
        raise InvalidInputError(f"{name} must have dimension >= 1; got shape {host.shape}")
    if host.shape[0] == 0 and not allow_empty:
        raise InvalidInputError(f"{name} must have at least one row; got shape {host.shape}")
    if dim is not None and host.shape[1] != dim:
        raise InvalidInputError(f"{name} has dimension {host.shape[1]}, the index has {dim}")
    if host.dtype == np.float32 and host.flags.c_contiguous:
        out = host  # nothing to convert, so nothing can overflow
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by name
            out = np.ascontiguousarray(host, dtype=np.float32)
    if host.dtype.kind == "f" and not np.isfinite(out).all():
        bad = np.argwhere(~np.isfinite(out))[0]
        source = "NaN or inf" if not np.isfinite(host).all() else "a value too large for float32"
        raise InvalidInputError(f"{name} must be finite; row {int(bad[0])}, column {int(bad[1])} holds {source}")
    if host.dtype.kind in "iu" and host.size and np.abs(host).max() > np.finfo(np.float32).max:
        raise InvalidInputError(f"{name} holds an integer too large for float32")
    return out


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within [minimum, maximum]: any integer type, never a bool or a float.

    Anything else is an `InvalidInputError` naming ``name``, the range expected and the value received.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise InvalidInputError(
            f"{name} must be {_int_range(minimum, maximum)}; got {value!r} ({type(value).__name__})"
        )
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise InvalidInputError(
            f"{name} must be {_int_range(minimum, maximum).removeprefix('an integer ')}; got {number}"
        )
    return number


def _int_range(minimum: int | None, maximum: int | None) -> str:
    low = "" if minimum is None else f" >= {minimum}"
    high = "" if maximum is None else f" <= {maximum}"
    return f"an integer{low}{' and' if low and high else ''}{high}"


def _integer_array(ids: Any, name: str) -> np.ndarray[Any, Any]:
    """``ids`` as a 1-D NumPy array of an integer dtype (an empty list counts); else `InvalidInputError`."""
    if isinstance(ids, bool | np.bool_ | float | np.floating):
        raise InvalidInputError(f"{name} must be integers; got {ids!r} ({type(ids).__name__})")
    if isinstance(ids, list | tuple) and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_) for v in ids
    ):
        values = [int(v) for v in ids]  # Python ints: checked before NumPy can round them through float64
        if values and (max(values) > INT64_MAX or min(values) < -INT64_MAX - 1):
            raise InvalidInputError(f"{name} holds a value outside the int64 range: {max(values, key=abs)}")
        return np.array(values, dtype=np.int64)
    try:
        host = to_host(ids) if not isinstance(ids, list | tuple | range) else np.asarray(ids)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInputError(f"{name} must be a 1-D array of integers; could not read it as one ({exc})") from exc
    if host.ndim == 0:
        host = host.reshape(1)
    if host.size == 0 and host.dtype.kind == "f":
        host = host.astype(np.int64)  # np.asarray([]) is float64
    if host.dtype.kind == "O" and all(isinstance(v, int) and not isinstance(v, bool) for v in host.reshape(-1)):
        raise InvalidInputError(f"{name} holds a value outside the int64 range: {max(host.reshape(-1).tolist())}")
    if host.dtype.kind not in "iu":
        raise InvalidInputError(f"{name} must be integers (any integer dtype); got dtype {host.dtype}")
    if host.ndim != 1:
        raise InvalidInputError(f"{name} must be 1-D; got shape {host.shape}")
    if host.dtype.kind == "u" and host.size and int(host.max()) > np.iinfo(np.int64).max:
        raise InvalidInputError(f"{name} holds a value above the int64 range: {int(host.max())}")
    return host


def as_id_list(ids: Any, name: str = "ids") -> IdArray:
    """``ids`` as a 1-D int64 array, any values (repeats and absent ids allowed): integer dtypes only."""
    return np.ascontiguousarray(_integer_array(ids, name), dtype=np.int64)


def as_ids(ids: Any, count: int, name: str = "ids") -> IdArray:
    """``ids`` as a 1-D int64 array of ``count`` distinct non-negative values: integer dtypes only."""
    out = as_id_list(ids, name)
    if out.shape[0] != count:
        raise InvalidInputError(f"{name} has {out.shape[0]} entries, expected {count} (one per vector)")
    if out.size and out.min() < 0:
        raise InvalidInputError(f"{name} must be >= 0 (-1 marks a missing result); got {int(out.min())}")
    uniq, counts = np.unique(out, return_counts=True)
    if uniq.size != out.size:
        dup = uniq[counts > 1][:5].tolist()
        raise InvalidInputError(f"{name} must be distinct; repeated: {dup}")
    return out


def check_k(k: Any, max_k: int | None = None) -> int:
    """``k`` as an int in 1..max_k, checked before anything is allocated; else an `InvalidInputError`.

    ``max_k`` is the ``max_k`` setting where a caller passes it; the message says how to raise it.
    """
    value = check_int(k, "k", minimum=1)
    if max_k is not None and value > max_k:
        raise InvalidInputError(f"k must be <= {max_k} (the max_k setting; set GPURAG_MAX_K to raise it); got {value}")
    return value
