"""Compiles the package's CUDA sources for the device at first use and caches the cubins on disk.

A kernel file ``kernels/NAME.cu`` (its ``#include "x.cuh"`` lines replaced by those files) is compiled
by NVRTC (through CuPy's binding) for the device's own architecture. The cubin is written under the
``cuda_kernel_cache_dir`` setting, named by the source's SHA-256, the architecture and NVRTC's version,
and loaded from there next time; a changed source or another card compiles afresh.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from gpurag.errors import BackendUnavailableError
from gpurag.settings import get_settings

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
#: NVRTC options every kernel is compiled with (besides the architecture).
OPTIONS = ("-std=c++17",)
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.MULTILINE)


def kernel_sources() -> list[Path]:
    """Every ``.cu`` file of the package."""
    return sorted(KERNEL_DIR.glob("*.cu"))


def expanded_source(name: str) -> str:
    """The text of ``kernels/NAME.cu`` with its local includes inlined (each once)."""
    seen: set[str] = set()

    def expand(path: Path) -> str:
        def include(match: re.Match[str]) -> str:
            header = match.group(1)
            if header in seen:
                return ""
            seen.add(header)
            return expand(KERNEL_DIR / header)

        return _INCLUDE.sub(include, path.read_text())

    return expand(KERNEL_DIR / f"{name}.cu")


def cache_key(source: str, arch: str, nvrtc_version: str) -> str:
    """The cache file's stem for ``source`` compiled for ``arch`` by that NVRTC."""
    digest = hashlib.sha256("\0".join([source, arch, nvrtc_version, *OPTIONS]).encode()).hexdigest()
    return f"{digest[:24]}-sm{arch}"


def _nvrtc_version() -> str:
    from cupy_backends.cuda.libs import nvrtc

    major, minor = nvrtc.getVersion()
    return f"{major}.{minor}"


def compile_cubin(source: str, name: str, arch: str) -> bytes:
    """``source`` compiled by NVRTC to a cubin for ``sm_<arch>``; a compile error names the kernel and its log."""
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(source, f"{name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(program, [f"-arch=sm_{arch}", *OPTIONS])
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(program)
            raise BackendUnavailableError(
                f"NVRTC could not compile kernels/{name}.cu for sm_{arch}: {exc}\n{log}"
            ) from exc
        return bytes(nvrtc.getCUBIN(program))
    finally:
        nvrtc.destroyProgram(program)


def cached_cubin(name: str, arch: str, cache_dir: Path | None = None) -> Path:
    """The path of ``kernels/NAME.cu``'s cubin for ``arch``, compiling and writing it when absent."""
    source = expanded_source(name)
    directory = Path(cache_dir if cache_dir is not None else get_settings().cuda_kernel_cache_dir)
    path = directory / f"{name}-{cache_key(source, arch, _nvrtc_version())}.cubin"
    if path.exists():
        return path
    cubin = compile_cubin(source, name, arch)
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(cubin)
        os.replace(temporary, path)  # whole or absent: a concurrent reader never sees half a file
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


@functools.cache
def module(name: str, device_index: int) -> Any:
    """``kernels/NAME.cu`` loaded on CUDA device ``device_index`` (a `cupy.RawModule`), compiled or from cache."""
    import cupy

    with cupy.cuda.Device(device_index) as device:
        arch = str(device.compute_capability)
        return cupy.RawModule(path=str(cached_cubin(name, arch)))


@functools.cache
def function(module_name: str, kernel: str, device_index: int) -> Any:
    """Kernel ``kernel`` of ``kernels/MODULE_NAME.cu`` on that device, allowed all the shared memory it may opt into."""
    import cupy

    with cupy.cuda.Device(device_index) as device:
        fn = module(module_name, device_index).get_function(kernel)
        most = int(device.attributes["MaxSharedMemoryPerBlockOptin"])
        try:
            fn.max_dynamic_shared_size_bytes = most
        except AttributeError:  # a plain `cupy.cuda.function.Function`
            driver = cupy.cuda.driver
            driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, most)
        return fn
