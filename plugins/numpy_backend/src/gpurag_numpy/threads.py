"""The NumPy backend's threads: how many a search may use, the shared pool that runs them, and the
limiter that holds BLAS at one thread meanwhile (with threadpoolctl, where installed).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from gpurag.settings import get_settings

_T = TypeVar("_T")

#: Below this many multiply-adds a search runs on the calling thread alone.
MIN_PARALLEL_WORK = 1 << 22


class _BlasOneThread:
    """Holds the BLAS libraries at one thread while any search that runs its own threads is active.

    Needs threadpoolctl; `available` says whether it could be loaded.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._limiter: Any = None
        self._controller: Any = None
        self._loaded = False

    @property
    def available(self) -> bool:
        """Whether BLAS threads can be limited (threadpoolctl is installed)."""
        with self._lock:
            self._load()
            return self._controller is not None

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            threadpoolctl = importlib.import_module("threadpoolctl")
        except ImportError:
            return
        try:
            self._controller = threadpoolctl.ThreadpoolController()
        except Exception:  # a broken BLAS introspection must not break search
            self._controller = None

    def __enter__(self) -> None:
        with self._lock:
            self._load()
            if self._controller is None:
                return
            if self._depth == 0:
                self._limiter = self._controller.limit(limits=1, user_api="blas")
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._controller is None:
                return
            self._depth -= 1
            if self._depth == 0 and self._limiter is not None:
                self._limiter.restore_original_limits()
                self._limiter = None


#: The one limiter all searches share.
BLAS_ONE_THREAD = _BlasOneThread()
_POOL_LOCK = threading.Lock()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def thread_count() -> int:
    """Threads a search may use: ``numpy_threads``, or one per core available to this process."""
    configured = get_settings().numpy_threads
    if configured:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def run_parallel(tasks: Sequence[Callable[[], _T]], *, uses_blas: bool) -> list[_T]:
    """Results of ``tasks``, run on a shared thread pool (the last on the calling thread).

    With ``uses_blas`` and more than one task, BLAS is held at one thread meanwhile: these GEMMs are
    small, and BLAS's own threads only slow them down. A single task runs as it is.
    """
    global _POOL, _POOL_SIZE
    if len(tasks) == 1:
        return [tasks[0]()]  # one task: BLAS may use its own threads, and nothing is limited per call
    with BLAS_ONE_THREAD if uses_blas else contextlib.nullcontext():
        with _POOL_LOCK:
            if _POOL is None or len(tasks) - 1 > _POOL_SIZE:
                _POOL_SIZE = len(tasks) - 1
                _POOL = concurrent.futures.ThreadPoolExecutor(_POOL_SIZE, thread_name_prefix="gpurag-numpy")
            pool = _POOL
        futures = [pool.submit(task) for task in tasks[:-1]]
        last = tasks[-1]()
        return [f.result() for f in futures] + [last]


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, nearly equal, non-empty ranges covering ``range(total)``."""
    parts = max(1, min(parts, total))
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]
