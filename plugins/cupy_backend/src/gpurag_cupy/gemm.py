"""float32 score tiles by cuBLAS ``gemmEx``: float32 inputs, float32 compute (never TF32), written in place."""

from __future__ import annotations

from typing import Any

import numpy as np

#: cudaDataType CUDA_R_32F.
CUDA_R_32F = 0
#: Whether a single query is scored by ``sgemv`` rather than ``gemmEx`` (both float32 throughout).
GEMV_FOR_ONE_QUERY = False


def scores_into(queries: Any, rows: Any, out: Any, ld: int, alpha: float = 1.0) -> None:
    """``out[q, j] = alpha * queries[q] · rows[j]`` for (Q, D) queries and (R, D) rows, both C-contiguous.

    ``out`` is a C-ordered float32 buffer of Q rows of stride ``ld >= R`` (a tile wider than R is
    filled in its first R columns). In cuBLAS's column-major terms: out^T (R x Q) = rows (R x D, as
    the transpose of a D x R column-major matrix) times queries^T (D x Q).
    """
    import cupy
    from cupy_backends.cuda.libs import cublas

    n_queries, dim = queries.shape
    n_rows = rows.shape[0]
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setMathMode(handle, cublas.CUBLAS_DEFAULT_MATH)  # no TF32, whatever CUPY_TF32 says
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    scale = np.array([alpha], dtype=np.float32)
    zero = np.zeros(1, dtype=np.float32)
    if n_queries == 1 and GEMV_FOR_ONE_QUERY:  # y = rows · q: the matrix-vector product, a pure stream of rows
        cublas.sgemv(
            handle, cublas.CUBLAS_OP_T, dim, n_rows, scale.ctypes.data, rows.data.ptr, dim,
            queries.data.ptr, 1, zero.ctypes.data, out.data.ptr, 1,
        )  # fmt: skip
        return
    cublas.gemmEx(
        handle,
        cublas.CUBLAS_OP_T,
        cublas.CUBLAS_OP_N,
        n_rows,
        n_queries,
        dim,
        scale.ctypes.data,
        rows.data.ptr,
        CUDA_R_32F,
        dim,
        queries.data.ptr,
        CUDA_R_32F,
        dim,
        zero.ctypes.data,
        out.data.ptr,
        CUDA_R_32F,
        ld,
        cublas.CUBLAS_COMPUTE_32F,
        cublas.CUBLAS_GEMM_DEFAULT,
    )
