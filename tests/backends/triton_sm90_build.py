"""Build the fused LSH kernels (`gpurag_triton.kernels.lsh_select`) for an H200 (sm_90) without a GPU.

Triton's GPU front end and ptxas refuse what its CPU interpreter accepts (a module global that is
not a ``tl.constexpr``, say), so the interpreter tests alone cannot catch it. Run as a script with
``TRITON_INTERPRET`` unset; prints ``built NAME`` per kernel and exits non-zero on the first that fails.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpurag_triton import lsh_fused
from gpurag_triton.kernels import lsh_select
from gpurag_triton.kernels.hamming_select import hamming_near_kernel

SM90 = GPUTarget("cuda", 90, 32)


def build(name: str, fn: object, signature: dict[str, str], constants: dict[str, object], warps: int = 4) -> None:
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    triton.compile(source, target=SM90, options={"num_warps": warps})
    print(f"built {name}", flush=True)


def main() -> int:
    counts = {"n_queries": "i32", "n_sample": "i32", "words": "i32", "row_step": "i32"}
    build("hamming_sample_histogram_kernel", lsh_select.hamming_sample_histogram_kernel,
          {"q_ptr": "*i32", "x_ptr": "*i32", "hist_ptr": "*i32", **counts, "BLOCK_Q": "constexpr",
           "BLOCK_N": "constexpr", "BINS": "constexpr", "USE_POPC": "constexpr"},
          {"BLOCK_Q": 16, "BLOCK_N": 256, "BINS": 256, "USE_POPC": True})  # fmt: skip
    build("hamming_near_kernel (limit from the histogram)", hamming_near_kernel,
          {"q_ptr": "*i32", "x_ptr": "*i32", "limit_ptr": "*i32", "counter_ptr": "*i32", "keys_ptr": "*i32",
           "n_queries": "i32", "n_rows": "i32", "words": "i32", "rows_per_split": "i32", "capacity": "i32",
           "rank": "i32", "BLOCK_Q": "constexpr", "BLOCK_N": "constexpr", "USE_POPC": "constexpr", "WIDE": "constexpr",
           "BINS": "constexpr", "LIMIT_FROM_HISTOGRAM": "constexpr", "CHECK_TILE": "constexpr"},
          {"BLOCK_Q": 16, "BLOCK_N": 256, "USE_POPC": True, "WIDE": False, "BINS": 256, "LIMIT_FROM_HISTOGRAM": True,
           "CHECK_TILE": True})  # fmt: skip
    build("select_nearest_keys_kernel", lsh_select.select_nearest_keys_kernel,
          {"keys_ptr": "*i32", "counter_ptr": "*i32", "rows_ptr": "*i64", "failed_ptr": "*i32", "count": "i32",
           "capacity": "i32", "PASSES": "constexpr", "ROW_BITS": "constexpr", "BLOCK": "constexpr"},
          {"PASSES": 4, "ROW_BITS": 24, "BLOCK": lsh_fused.SELECT_BLOCK}, lsh_fused.SELECT_WARPS)  # fmt: skip
    for term, cosine, lower in ((2, True, False), (0, False, True)):
        build(f"rescore_best_kernel (term {term})", lsh_select.rescore_best_kernel,
              {"q_ptr": "*fp32", "x_ptr": "*fp32", "rows_ptr": "*i64", "norms_ptr": "*fp32", "out_ptr": "*fp64",
               "n_candidates": "i32", "n_rows": "i32", "n_blocks": "i32", "dim": "i32", "stride_q": "i32",
               "stride_x": "i32",
               "TERM": "constexpr", "COSINE": "constexpr", "LOWER_IS_BETTER": "constexpr", "BLOCK_M": "constexpr",
               "BLOCK_D": "constexpr", "KP": "constexpr"},
              {"TERM": term, "COSINE": cosine, "LOWER_IS_BETTER": lower, "BLOCK_M": 64, "BLOCK_D": 128,
               "KP": 16})  # fmt: skip
    build("best_merge_kernel", lsh_select.best_merge_kernel,
          {"keys_ptr": "*fp64", "scores_ptr": "*fp32", "rows_ptr": "*i64", "n_keys": "i32", "k": "i32",
           "LOWER_IS_BETTER": "constexpr", "BLOCK": "constexpr"},
          {"LOWER_IS_BETTER": False, "BLOCK": 1024})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
