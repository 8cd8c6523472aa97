"""The PyTorch distance backend: exact l2, dot, cosine and l1 search and the LSH primitives, on CPU or CUDA.

torch is imported inside the methods, never when this module is imported (the plugin registry
imports it at lookup). On CUDA, l2 / dot / cosine rank rows first by a bf16 product with float32
accumulation; the shortlist is certified per query against the bound of its own error (see
`gpurag_torch.exact`) and any query it cannot certify is answered again in float32.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from glob import glob
from typing import TYPE_CHECKING, Any

import numpy as np

from gpurag.backend import Availability, Boundaries, Database, DistanceBackend, RowMoves
from gpurag.errors import BackendUnavailableError, InvalidInputError
from gpurag.metrics import Metric, TopK
from gpurag.settings import get_settings

if TYPE_CHECKING:
    import torch

#: Largest k for which the bf16 shortlist is tried (above it the float32 pass answers directly).
SHORTLIST_MAX_K = 256
#: Largest |q| + |x| (l1: |q|_1 + |x|_1 squared) for which no float32 product, difference or partial
#: sum can overflow: (|q| + |x|)² stays under a quarter of float32's largest value. Past it (or
#: with an infinite norm) a search is answered in float64.
FLOAT32_SAFE_REACH = float(np.sqrt(np.finfo(np.float32).max)) / 2


class TorchBackend(DistanceBackend):
    """Exact search with PyTorch on ``cpu`` or ``cuda[:n]``: l2, dot, cosine and l1, any k, any size.

    ``low_precision`` (default: on CUDA) turns on the certified bf16 shortlist for l2, dot and
    cosine. ``chunk_scores`` caps the scores one chunk holds (default: the ``memory_budget_bytes``
    setting / 4); a chunk's Q x R score matrix is the largest temporary a search makes.
    """

    name = "torch"
    device_kinds = ("cpu", "cuda")
    metrics = frozenset(Metric)
    max_k = None

    def __init__(
        self, device: str | None = None, *, low_precision: bool | None = None, chunk_scores: int | None = None
    ) -> None:
        from gpurag_torch.tensors import parse_device

        super().__init__(device)
        self.torch_device = parse_device(self.device)
        if self.torch_device.type == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise BackendUnavailableError(f"backend {self.name!r}: CUDA is not available for device {device!r}")
            if self.torch_device.index is not None and self.torch_device.index >= torch.cuda.device_count():
                raise BackendUnavailableError(
                    f"backend {self.name!r}: device {device!r} asked for, {torch.cuda.device_count()} CUDA devices"
                )
        self.low_precision = self.torch_device.type == "cuda" if low_precision is None else bool(low_precision)
        if chunk_scores is not None and chunk_scores < 1:
            raise InvalidInputError(f"chunk_scores must be >= 1; got {chunk_scores}")
        self._chunk_scores = chunk_scores
        #: Queries answered through a reduced-precision shortlist, and those of them whose certificate
        #: failed so they were answered again in float32 (counters, for benchmarks and tests).
        self.queries_searched = 0
        self.queries_rescanned = 0
        self._device_ids: tuple[np.ndarray[Any, Any], torch.Tensor] | None = None

    @classmethod
    def availability(cls) -> Availability:
        """Available where torch is installed (found without importing it); CUDA devices where torch sees one."""
        if importlib.util.find_spec("torch") is None:
            return Availability(False, "torch is not installed (pip install torch)")
        return Availability(True)

    @classmethod
    def default_device(cls) -> str:
        """``cuda`` where torch sees a GPU, else ``cpu``."""
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @classmethod
    def normalize_device(cls, device: str | None) -> str:
        """As `DistanceBackend.normalize_device`; CUDA where torch sees none is a `BackendUnavailableError`."""
        if isinstance(device, str) and device.strip().lower().startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise BackendUnavailableError(f"backend {cls.name!r}: CUDA is not available for device {device!r}")
        return super().normalize_device(device)

    @classmethod
    def devices(cls) -> tuple[str, ...]:
        """``cpu`` and each CUDA device torch sees (``cuda:0``, ``cuda:1``...)."""
        import torch

        cards = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return ("cpu", *(f"cuda:{index}" for index in range(cards)))

    @property
    def chunk_scores(self) -> int:
        """Most float32 scores one chunk of a search holds."""
        return self._chunk_scores or max(1024, get_settings().memory_budget_bytes // 4)

    # --- conversion at the edges ---------------------------------------------------------------
    def asarray(self, x: Any, name: str, *, dim: int | None = None) -> Any:
        """``x`` as a float32 (rows, dim) tensor on this device: zero-copy for tensors and DLPack already there."""
        from gpurag_torch.tensors import as_device_matrix

        return as_device_matrix(x, name, self.torch_device, dim=dim)

    def to_numpy(self, x: Any) -> np.ndarray[Any, Any]:
        """A host NumPy copy (a view for CPU tensors) of a tensor."""
        from gpurag_torch.tensors import to_numpy

        return to_numpy(x)

    def _tensor(self, x: Any, name: str) -> torch.Tensor:
        import torch

        if isinstance(x, torch.Tensor) and x.device == self.torch_device and x.dtype == torch.float32:
            return x if x.is_contiguous() else x.contiguous()
        return self.asarray(x, name)  # type: ignore[no-any-return]

    # --- the database --------------------------------------------------------------------------
    def prepare(self, vectors: Any, metric: Metric) -> Database:
        """A copy of ``vectors`` on this device, with the norms (and bf16 rows) ``metric`` needs."""
        from gpurag_torch.database import TorchDatabase, row_data_for

        metric = Metric.parse(metric)
        source = self._tensor(vectors, "vectors")
        rows = source.clone() if _shares_memory(source, vectors) else source
        return TorchDatabase(metric, rows, row_data_for(rows, metric, low_precision=self.low_precision))

    def append(self, database: Database, vectors: Any) -> Database:
        """``database`` with ``vectors`` added as its last rows, in place on the device (`DistanceBackend.append`).

        Only the new rows are prepared (norms, bf16 and column-major copies); every per-row layout is
        written past ``count`` into the storage, which grows by doubling on the device when full.
        """
        import torch

        new = self._tensor(vectors, "vectors")
        if new.shape[1] != database.dim:
            raise InvalidInputError(f"vectors must be (rows, {database.dim}); got shape {tuple(new.shape)}")
        if set(database.row_data) != self.required_keys(database.metric) or not isinstance(
            database.vectors, torch.Tensor
        ):  # prepared elsewhere or differently: prepare every row here, on the device
            return self.prepare(torch.cat([self._tensor(database.vectors, "database"), new]), database.metric)
        return self.append_prepared(self._torch_database(database), self.prepare(new, database.metric))

    def move_rows(self, database: Database, moves: RowMoves) -> Database:
        """``database`` compacted in place on the device (see `DistanceBackend.move_rows`).

        One gather and one scatter per per-row layout, of the moved rows only; column-major layouts
        move their columns.
        """
        import torch

        database = self._torch_database(database)
        if moves.sources.size:
            axes = database.row_axes()
            sources = torch.from_numpy(np.ascontiguousarray(moves.sources, dtype=np.int64)).to(self.torch_device)
            holes = torch.from_numpy(np.ascontiguousarray(moves.destinations, dtype=np.int64)).to(self.torch_device)
            storage = database.storage or database.row_arrays()
            for key, array in storage.items():
                array.index_copy_(axes[key], holes, array.index_select(axes[key], sources))
        # What is left (shrinking the storage, the live views) moves nothing: the base does it.
        return super().move_rows(database, RowMoves(moves.sources[:0], moves.destinations[:0], moves.count))

    @staticmethod
    def _torch_database(database: Database) -> Database:
        from gpurag_torch.database import TorchDatabase

        if isinstance(database, TorchDatabase):
            return database
        return TorchDatabase(database.metric, database.vectors, database.row_data, database.storage)

    def take(self, database: Database, positions: np.ndarray[Any, Any]) -> Database:
        """A database of the rows at ``positions`` (host int64), in that order, gathered on the device."""
        import torch

        from gpurag_torch.database import TorchDatabase, row_axis

        index = torch.as_tensor(np.asarray(positions, dtype=np.int64), device=self.torch_device)
        return TorchDatabase(
            database.metric,
            database.vectors.index_select(0, index),
            {key: value.index_select(row_axis(key), index) for key, value in database.row_data.items()},
        )

    def slice(self, database: Database, start: int, stop: int) -> Database:
        """Rows ``start:stop`` of ``database``, as views (column-major layouts sliced along their columns)."""
        from gpurag_torch.database import TorchDatabase, row_axis

        return TorchDatabase(
            database.metric,
            database.vectors[start:stop],
            {
                key: value[:, start:stop] if row_axis(key) else value[start:stop]
                for key, value in database.row_data.items()
            },
        )

    def required_keys(self, metric: Metric) -> set[str]:
        """The row_data keys this backend's databases hold for ``metric``."""
        from gpurag_torch.database import required_keys

        return required_keys(metric, low_precision=self.low_precision)

    def _topk_inputs(self, queries: Any, database: Database, k: Any) -> tuple[Database, torch.Tensor, int]:
        """``topk``'s arguments checked: this backend's database, the queries as a tensor, ``k`` as an int."""
        database = self._own(database)
        n_rows = database.count
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n_rows:
            raise InvalidInputError(f"k must be an integer in 1..{n_rows} (the database's rows); got {k!r}")
        q = self._tensor(queries, "queries")
        if q.shape[1] != database.dim:
            raise InvalidInputError(f"queries must be (Q, {database.dim}); got shape {tuple(q.shape)}")
        return database, q, int(k)

    def _own(self, database: Database) -> Database:
        wanted = self.required_keys(database.metric)
        import torch

        if isinstance(database.vectors, torch.Tensor) and wanted <= set(database.row_data):
            return database
        return self.prepare(database.vectors, database.metric)  # prepared elsewhere

    # --- distances and selection ---------------------------------------------------------------
    def boundaries(self, metric: Metric, queries: int, dim: int) -> Boundaries:
        """Row chunks of the float32 pass (`chunk_scores` / Q rows) and, with the bf16 shortlist, its
        chunks (at least `search.SHORTLIST_PER_CHUNK` rows) and the row count past which the chunks'
        union is cut to the rows re-scored; l1's eager blocks of `chunk_scores` / D rows; queries:
        past `chunk_scores` the float32 pass holds one row per chunk."""
        from gpurag_torch import search

        budget = self.chunk_scores
        rows = {max(1, budget // max(1, queries))}
        if metric is Metric.L1:
            rows.add(max(1, budget // max(1, dim)))
        elif self.low_precision:
            step = max(search.SHORTLIST_PER_CHUNK, budget // max(1, queries))
            # Past this many chunks their kept rows outnumber SHORTLIST_PER_CHUNK and the union is cut.
            cut = step * (search.SHORTLIST_PER_CHUNK // search.SHORTLIST_KEEP_MIN)
            rows |= {step, cut}
        return Boundaries(rows=tuple(sorted(rows)), queries=(budget,))

    def working_scores(self, queries: int, rows: int) -> int:
        """Scores one `topk` holds at once: it chunks rows itself, so at most `chunk_scores`."""
        return min(queries * rows, self.chunk_scores)

    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        """The ``k`` best rows of ``database`` for each query, best first; ties go to the lower row.

        Scores are float32 values computed directly for the rows returned (l2 as a sum of squared
        differences, never a norm expansion); indices are int64 row positions. Exact in the
        conformance kit's sense: a bf16 pass may only shortlist (see `gpurag_torch.exact`).
        """
        import torch

        from gpurag_torch import search

        database, q, k = self._topk_inputs(queries, database, k)
        budget = self.chunk_scores
        if self.needs_float64(q, database):
            return self.float64_topk(q, database, k)
        if self.low_precision and database.metric is not Metric.L1 and k <= SHORTLIST_MAX_K:
            scores, rows, certified = search.shortlist_topk(q, database, k, budget)
            self.queries_searched += q.shape[0]
            if not bool(certified.all()):
                redo = torch.nonzero(~certified)[:, 0]
                self.queries_rescanned += int(redo.numel())
                redo_scores, redo_rows = search.exact_topk(q[redo], database, k, budget)
                scores[redo], rows[redo] = redo_scores, redo_rows
            return TopK(scores, rows)
        scores, rows = search.exact_topk(q, database, k, budget)
        return TopK(scores, rows)

    def needs_float64(self, queries: torch.Tensor, database: Database) -> bool:
        """Whether float32 terms of this search may overflow (norms past `FLOAT32_SAFE_REACH`, or infinite)."""
        return bool(self.overflow_flag(queries, database))

    def overflow_flag(self, queries: torch.Tensor, database: Database) -> torch.Tensor:
        """`needs_float64` as a 0-d bool tensor on the device, without synchronising."""
        import torch

        from gpurag_torch.database import max_norm, query_norms

        reach = query_norms(queries, database.metric).max() + max_norm(database)
        if database.metric is Metric.L1:
            reach = torch.sqrt(reach)
        return ~torch.isfinite(reach) | (reach > FLOAT32_SAFE_REACH)

    def float64_topk(self, queries: torch.Tensor, database: Database, k: int) -> TopK:
        """The float32 pass run on float64 copies of the rows and queries (terms too large for float32)."""
        from gpurag_torch import search
        from gpurag_torch.database import TorchDatabase, row_data_for

        wide = database.vectors.double()
        wide_database = TorchDatabase(database.metric, wide, row_data_for(wide, database.metric, low_precision=False))
        scores, rows = search.exact_topk(queries.double(), wide_database, k, self.chunk_scores)
        return TopK(scores.float(), rows)

    def merge_topk(self, first: TopK, second: TopK, k: int, metric: Metric) -> TopK:
        """The ``k`` best of two partial results, on the device; ``first`` wins ties."""
        import torch

        scores = torch.cat([self._as_result(first.scores), self._as_result(second.scores)], dim=1)
        indices = torch.cat([self._as_result(first.indices), self._as_result(second.indices)], dim=1)
        order = torch.sort(scores, dim=1, descending=metric.higher_is_better, stable=True).indices[:, :k]
        return TopK(torch.gather(scores, 1, order), torch.gather(indices, 1, order))

    def concat_topk(self, blocks: list[TopK]) -> TopK:
        """Query blocks stacked on the device."""
        import torch

        return TopK(
            torch.cat([self._as_result(b.scores) for b in blocks]),
            torch.cat([self._as_result(b.indices) for b in blocks]),
        )

    def map_ids(self, ids: np.ndarray[Any, Any], positions: Any) -> Any:
        """``ids[positions]`` on the device; the ids go up once per ids array (the retriever replaces it on change)."""
        import torch

        cached = self._device_ids
        if cached is None or cached[0] is not ids:
            cached = (ids, torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.torch_device))
            self._device_ids = cached
        return cached[1][self._as_result(positions)]

    def pad_result(self, scores: Any, ids: Any, width: int, worst: float) -> tuple[Any, Any]:
        """(scores, ids) padded on the device to ``width`` columns with ``worst`` and id -1."""
        import torch

        pad = width - int(scores.shape[1])
        scores = torch.nn.functional.pad(self._as_result(scores), (0, pad), value=worst)
        ids = torch.nn.functional.pad(self._as_result(ids), (0, pad), value=-1)
        return scores, ids

    def _as_result(self, x: Any) -> torch.Tensor:
        import torch

        if isinstance(x, torch.Tensor):
            return x.to(self.torch_device)
        return torch.as_tensor(np.asarray(x), device=self.torch_device)

    def pairwise(self, queries: Any, vectors: Any, metric: Metric) -> Any:
        """The (Q, N) float32 matrix of ``metric``; l2 and l1 summed directly over the differences."""
        import torch

        from gpurag_torch import search
        from gpurag_torch.database import normalised
        from gpurag_torch.tensors import full_precision

        metric = Metric.parse(metric)
        q = self._tensor(queries, "queries")
        x = self._tensor(vectors, "vectors")
        if q.shape[1] != x.shape[1]:
            raise InvalidInputError(f"queries and vectors must share a dimension; got {q.shape[1]} and {x.shape[1]}")
        if metric is Metric.L1:
            return search.l1_distances(q, x, self.chunk_scores)
        if metric is Metric.L2:
            out = torch.empty((q.shape[0], x.shape[0]), dtype=torch.float32, device=q.device)
            step = max(1, self.chunk_scores // max(1, x.shape[0] * x.shape[1]))
            for start, stop in search.row_chunks(q.shape[0], step):
                diff = q[start:stop, None, :] - x[None, :, :]
                out[start:stop] = (diff * diff).sum(dim=2)
            return out
        with full_precision():
            if metric is Metric.DOT:
                return q @ x.T
            unit_q = normalised(q, torch.linalg.vector_norm(q, dim=1))
            unit_x = normalised(x, torch.linalg.vector_norm(x, dim=1))
            return unit_q @ unit_x.T

    # --- LSH primitives ------------------------------------------------------------------------
    def sign_codes(self, vectors: Any, planes: Any) -> Any:
        """Packed sign bits, uint8 (N, ceil(B / 8)), little bit order, on this device."""
        from gpurag_torch import lsh

        return lsh.sign_codes(self._tensor(vectors, "vectors"), self._tensor(planes, "planes"))

    def _codes(self, codes: Any, name: str) -> torch.Tensor:
        import torch

        if isinstance(codes, torch.Tensor):
            return codes.to(self.torch_device)
        host = np.asarray(codes)
        if host.dtype != np.uint8:
            raise InvalidInputError(f"{name} must be uint8 packed codes; got dtype {host.dtype}")
        return torch.from_numpy(np.ascontiguousarray(host)).to(self.torch_device)

    def hamming_topk(self, codes: Any, database_codes: Any, k: int) -> TopK:
        """The ``k`` database codes nearest each code, nearest first; int32 distances, int64 rows."""
        from gpurag_torch import lsh

        return lsh.hamming_topk(
            self._codes(codes, "codes"), self._codes(database_codes, "database_codes"), k, self.chunk_scores
        )


def cuda_present() -> bool:
    """Whether a CUDA device is there, asking torch only when it is already imported (lookups stay light)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    return os.path.exists("/dev/nvidiactl") or bool(glob("/proc/driver/nvidia/gpus/*"))


def _shares_memory(tensor: Any, source: Any) -> bool:
    """Whether ``tensor`` may alias the caller's ``source`` (so the database must copy it)."""
    import torch

    if isinstance(source, torch.Tensor):
        return bool(source.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr())
    if isinstance(source, np.ndarray) and tensor.device.type == "cpu":
        return bool(np.shares_memory(source, tensor.numpy()))
    return tensor.device.type == "cpu" and not isinstance(source, list | tuple)
