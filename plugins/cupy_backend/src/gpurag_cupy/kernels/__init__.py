"""The CUDA C++ kernels of gpurag-cupy, compiled once per process by NVRTC through `cupy.RawModule`."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

#: The kernel sources, in the order they are concatenated into one module.
SOURCES = ("select.cu", "scores.cu", "small.cu")
#: Float4s per lane `dot_one_query_vec4` is compiled for (D up to 128 times the largest).
VEC4_WIDTHS = (1, 2, 4, 6, 8)
#: Every kernel the module exposes (template instances by their C++ names).
NAMES = (
    "radix_histogram<true, true>",
    "radix_histogram<true, false>",
    "radix_histogram<false, true>",
    "radix_histogram<false, false>",
    "radix_pick",
    "threshold_gather",
    "radix_gather<true>",
    "radix_gather<false>",
    "l1_scores<1>",
    "l1_scores<8>",
    "l1_scores<16>",
    *(f"l1_scores_registers<{group}, {width}>" for group, width in ((1, 4), (1, 8), (1, 16), (1, 24), (1, 32))),
    *(f"l1_scores_registers<{group}, {width}>" for group in (8, 16) for width in (4, 8)),
    *(f"dot_scores_registers<{group}, {width}>" for group, width in ((1, 4), (1, 8), (1, 16), (1, 24), (1, 32))),
    *(f"dot_scores_registers<{group}, {width}>" for group in (8, 16) for width in (4, 8)),
    "hamming_scores",
    "rescore",
    "rescore_sorted",
    "pairwise_direct",
    "chunk_select",
    "merge_rescore",
    "largest_magnitude_bits",
    *(f"dot_one_query_vec4<{width}>" for width in VEC4_WIDTHS),
)


def source() -> str:
    """The concatenated CUDA source of every kernel."""
    folder = resources.files(__package__)
    return "\n".join(folder.joinpath(name).read_text() for name in SOURCES)


@functools.cache
def module() -> Any:
    """The compiled `cupy.RawModule` (NVRTC, for the current device's architecture; cupy caches the binary)."""
    import cupy

    return cupy.RawModule(code=source(), options=("-std=c++17",), name_expressions=NAMES)


def kernel(name: str) -> Any:
    """The kernel ``name`` (one of `NAMES`) of the compiled module, on the current device."""
    import cupy

    return _function(name, cupy.cuda.Device().id)


@functools.cache
def _function(name: str, device: int) -> Any:
    return module().get_function(name)
