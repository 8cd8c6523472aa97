"""Array types, float32 rounding-error bounds and the chunk size shared by the NumPy backend's modules."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
I16 = npt.NDArray[np.int16]
U8 = npt.NDArray[np.uint8]

#: float32 unit roundoff.
U32 = 2.0**-24
#: Elements one chunk of a float64 pairwise computation, a rescoring or a Hamming scan may hold.
CHUNK_ELEMENTS = 1 << 21


def gamma(n: float) -> float:
    """Bound on the relative rounding error of n float32 operations (Higham's gamma_n)."""
    return n * U32 / (1.0 - n * U32)


def norms64(x: F32) -> F64:
    """The l2 norm of each row of ``x``, summed in float64."""
    sums: F64 = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    return np.sqrt(sums)
