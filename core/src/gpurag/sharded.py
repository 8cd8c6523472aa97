"""`ShardedRetriever`: one exact retriever per device, queries broadcast, per-shard top-k merged.

Vectors are spread over the shards so that their sizes stay even; a search runs on every shard at
once (one thread a shard: the GPU backends release the GIL while their kernels run) and the
shards' top-k lists, k rows each, are merged on the host. Results equal one `ExactRetriever`'s
over the same vectors (up to the order of exactly tied scores). Vectors already on a GPU are
checked there and go to each shard's device directly, never through the host; each shard's work
runs with its own GPU as the thread's current device (kernels launched by Triton or CuPy land there).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from gpurag import storage
from gpurag.arrays import FloatMatrix, IdArray, as_ids, as_matrix, check_k
from gpurag.backend import DistanceBackend
from gpurag.errors import IndexFormatError, InvalidInputError
from gpurag.metrics import Metric, SearchResult
from gpurag.retriever import ExactRetriever, Retriever

_T = TypeVar("_T")


def _default_devices(backend: str | DistanceBackend) -> list[str | None]:
    """One shard per GPU where ``backend`` can run on one, else one shard on its default device."""
    if isinstance(backend, DistanceBackend):
        kinds: tuple[str, ...] = type(backend).device_kinds
    elif backend == "auto":
        kinds = ("cuda",)
    else:
        from gpurag.plugins import get_registry

        found = get_registry("backends").get(backend)
        kinds = getattr(found.obj, "device_kinds", ("cuda",)) if found is not None else ("cuda",)
    return _gpu_devices() if "cuda" in kinds else [None]


def _gpu_devices() -> list[str | None]:
    """``cuda:i`` for each GPU torch sees, else one default device."""
    try:
        import torch
    except ImportError:
        return [None]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or [None]


@contextlib.contextmanager
def _current_device(device: str | None) -> Iterator[None]:
    """Make GPU ``device`` (``cuda:i``) the calling thread's current device for torch and CuPy, if loaded.

    Kernels launched through Triton or CuPy go to the current device, not to their tensors' device;
    a shard's thread starts on GPU 0 whatever its shard's device is.
    """
    index = _cuda_index(device)
    with contextlib.ExitStack() as stack:
        if index is not None:
            if "torch" in sys.modules:
                stack.enter_context(sys.modules["torch"].cuda.device(index))
            if "cupy" in sys.modules:
                stack.enter_context(sys.modules["cupy"].cuda.Device(index))
        yield


def _cuda_index(device: str | None) -> int | None:
    """``i`` for ``cuda:i``; None for any other device."""
    if device is None or not str(device).startswith("cuda:"):
        return None
    tail = str(device).split(":", 1)[1]
    return int(tail) if tail.isdigit() else None


class ShardedRetriever(Retriever):
    """Exact search over ``len(devices)`` shards (default: one per GPU for a backend that runs on GPUs, else
    ``shards`` on the default device, else one)."""

    name = "sharded"

    def __init__(
        self,
        metric: Metric | str = "l2",
        backend: str | DistanceBackend = "auto",
        *,
        shards: int | None = None,
        devices: Sequence[str | None] | None = None,
        dim: int | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1):
            raise InvalidInputError(f"shards must be an integer >= 1; got {shards!r}")
        if devices is not None and ((shards is not None and shards != len(devices)) or len(devices) == 0):
            raise InvalidInputError(f"devices must name one device per shard; got {list(devices)} for shards={shards}")
        placed = (
            list(devices)
            if devices is not None
            else [None] * shards
            if shards is not None
            else _default_devices(backend)
        )
        self.metric = Metric.parse(metric)
        self.devices = placed
        self.shards = [
            ExactRetriever(self.metric, backend, dim=dim, device=device, memory_budget_bytes=memory_budget_bytes)
            for device in placed
        ]
        self.backend = self.shards[0].backend
        self._lock = threading.RLock()
        self._pool = concurrent.futures.ThreadPoolExecutor(len(self.shards), thread_name_prefix="shard")

    def __repr__(self) -> str:
        sizes = [len(s) for s in self.shards]
        return f"ShardedRetriever(metric={self.metric.value!r}, backend={self.backend.name!r}, shards={sizes})"

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def dim(self) -> int | None:
        return (
            self.shards[0].dim if self.shards[0].dim is not None else next((s.dim for s in self.shards if s.dim), None)
        )

    @property
    def ids(self) -> IdArray:
        """The ids held, shard by shard (a copy)."""
        return np.concatenate([s.ids for s in self.shards])

    def vectors(self) -> FloatMatrix:
        """The vectors held, float32 (N, D), in the order of `ids` (a copy)."""
        parts = [s.vectors() for s in self.shards if len(s)]
        return np.concatenate(parts) if parts else np.empty((0, self.dim or 0), dtype=np.float32)

    def _on_shard(self, shard: ExactRetriever, work: Callable[[ExactRetriever], _T]) -> _T:
        """``work(shard)`` with the shard's GPU as this thread's current device."""
        with _current_device(self.devices[self.shards.index(shard)]):
            return work(shard)

    def _checked(self, vectors: Any) -> Any:
        """``vectors`` checked once: where they lie when a shard lives on that device, else on the host."""
        where = None
        if not isinstance(vectors, np.ndarray | list | tuple) and hasattr(vectors, "__dlpack__"):
            where = str(getattr(vectors, "device", ""))
        shard = next((s for s, d in zip(self.shards, self.devices, strict=True) if d is not None and d == where), None)
        if shard is None:  # host arrays, and tensors on a device no shard uses: no whole copy to one shard's GPU
            return as_matrix(vectors, "vectors", dim=self.dim)
        return self._on_shard(shard, lambda s: s.backend.asarray(vectors, "vectors", dim=self.dim))

    def add(self, vectors: Any, ids: Any = None) -> IdArray:
        """Add (N, D) ``vectors`` under ``ids`` (distinct, new; None: the next free ones), evening out the shards."""
        with self._lock:
            matrix = self._checked(vectors)
            held = self.ids
            if ids is None:
                start = int(held.max()) + 1 if held.size else 0
                new_ids = np.arange(start, start + matrix.shape[0], dtype=np.int64)
            else:
                new_ids = as_ids(ids, int(matrix.shape[0]))
                clash = np.isin(new_ids, held)
                if clash.any():
                    raise InvalidInputError(f"ids are already in the index: {new_ids[clash][:5].tolist()}")
            start = 0
            for shard, take in zip(self.shards, _even_out([len(s) for s in self.shards], matrix.shape[0]), strict=True):
                if take:
                    part, part_ids = matrix[start : start + take], new_ids[start : start + take]
                    self._on_shard(shard, functools.partial(ExactRetriever.add, vectors=part, ids=part_ids))
                    start += take
            return new_ids

    def remove(self, ids: Any) -> int:
        """Remove the vectors with these ids from whichever shard holds them; return how many were removed."""
        with self._lock:
            return sum(self._on_shard(s, lambda s: s.remove(ids)) for s in self.shards)

    def search(self, queries: Any, k: int) -> SearchResult:
        """The ``k`` nearest vectors to each query over every shard, best first (padded with id -1 past the size)."""
        k = check_k(k)
        with self._lock:
            if len(self) == 0:
                raise InvalidInputError("the index is empty; add vectors before searching")
            matrix = as_matrix(queries, "queries", dim=self.dim)
            busy = [s for s in self.shards if len(s)]
            parts = list(self._pool.map(lambda shard: self._on_shard(shard, lambda s: s.search(matrix, k)), busy))
        scores = np.concatenate([p.scores for p in parts], axis=1)
        found = np.concatenate([p.ids for p in parts], axis=1)
        key = -scores if self.metric.higher_is_better else scores  # padding (the worst score) sorts last
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        return SearchResult(
            np.ascontiguousarray(np.take_along_axis(scores, order, 1)),
            np.ascontiguousarray(np.take_along_axis(found, order, 1)),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write every shard into directory ``path`` atomically (``shard-0``...), under one manifest."""
        with self._lock, storage.atomic_directory(path) as tmp:
            names = []
            for i, shard in enumerate(self.shards):
                shard.save(tmp / f"shard-{i}")
                names.append(f"shard-{i}/{storage.MANIFEST}")
            manifest = {"kind": f"retriever:{self.name}", "metric": self.metric.value, "dim": self.dim}
            storage.write_manifest(tmp, {**manifest, "shards": len(self.shards), "count": len(self)}, files=names)

    @classmethod
    def load(cls, path: str | os.PathLike[str], backend: str | DistanceBackend = "auto") -> ShardedRetriever:
        """Read what `save` wrote, one shard per saved shard, every file checked."""
        manifest = storage.read_manifest(path, kind=f"retriever:{cls.name}")
        where = Path(manifest["path"])
        count = manifest.get("shards")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise IndexFormatError(f"{where / storage.MANIFEST} is damaged: shards must be an integer >= 1")
        made = cls(manifest["metric"], backend, shards=count, dim=manifest.get("dim"))
        made.shards = [ExactRetriever.load(where / f"shard-{i}", backend) for i in range(count)]
        if len(made) != manifest.get("count"):
            raise IndexFormatError(f"{where} holds {len(made)} vectors, its manifest says {manifest.get('count')}")
        return made


def _even_out(sizes: Sequence[int], count: int) -> list[int]:
    """How many of ``count`` new vectors each shard takes: the smallest shards are filled up first."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    take = [0] * len(sizes)
    remaining = count
    for j in range(1, len(sizes) + 1):
        level = sizes[order[0]] + take[order[0]]
        room = (sizes[order[j]] - level) * j if j < len(sizes) else remaining
        step = min(room, remaining)
        per, extra = divmod(step, j)
        for position, i in enumerate(order[:j]):
            take[i] += per + (1 if position < extra else 0)
        remaining -= step
        if remaining == 0:
            break
    return take
