"""`LSHRetriever`: approximate search by sign-random-projection codes, a Hamming prefilter and exact re-ranking."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gpurag import storage
from gpurag.arrays import as_matrix, check_int, check_k
from gpurag.backend import MIN_CAPACITY, DistanceBackend, RowMoves
from gpurag.errors import IndexFormatError, InvalidInputError
from gpurag.metrics import Metric, SearchResult, TopK
from gpurag.rerank import array_module, concat_rows, like
from gpurag.retriever import ExactRetriever
from gpurag.settings import get_settings

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

#: Extra coordinates each metric's transform appends before hashing.
EXTRA_COORDINATES = {Metric.COSINE: 0, Metric.DOT: 1, Metric.L2: 0}
#: Headroom given to the augmentation norm when a longer vector arrives, so growth rarely recodes.
NORM_HEADROOM = 1.05
#: Rows transformed and hashed at once.
HASH_ROWS = 1 << 18
#: Bit counts `LSHRetriever.tune` tries.
TUNE_BITS = (64, 128, 256, 512)
#: The recall tolerance of ann-benchmarks: a neighbour counts when its score is this close to the k-th best.
RECALL_EPSILON = 1e-3


def torch_sqrt_max_squared(x: Any) -> Any:
    """The largest row norm of a float64 torch tensor (a 0-d tensor)."""
    return (x * x).sum(dim=1).max().sqrt()


def _unit_rows(x: F64) -> F64:
    norms = np.sqrt(np.add.reduce(x * x, axis=1, keepdims=True))  # np.linalg.norm's sum, without its wrapper
    return x / np.where(norms == 0, 1.0, norms)


def recall_at_k(found_scores: Any, true_scores: Any, higher_is_better: bool, epsilon: float = RECALL_EPSILON) -> float:
    """Mean recall@k as ann-benchmarks defines it.

    ``found_scores`` (Q, k) are the true scores of the neighbours returned; ``true_scores`` (Q, >= k)
    the exact best scores, best first. A returned neighbour counts when its score is within
    ``epsilon`` of the exact k-th best.
    """
    found = np.asarray(found_scores, dtype=np.float64)
    k = found.shape[1]
    kth = np.asarray(true_scores, dtype=np.float64)[:, k - 1 : k]
    hits = found >= kth - epsilon if higher_is_better else found <= kth + epsilon
    return float(hits.mean()) if hits.size else 1.0


class CodeRows:
    """Codes aligned with a database's rows, in storage on the backend's device whose capacity doubles.

    `append` writes new codes past the live ones in place (amortised O(new rows)); `move` applies a
    removal's `RowMoves` exactly as `DistanceBackend.move_rows` does to the rows (O(moves)), so code
    i stays the code of row i.
    """

    def __init__(self, backend: DistanceBackend) -> None:
        self.backend = backend
        self._storage: Any = None
        self.count = 0

    @property
    def live(self) -> Any:
        """The live codes, (count, W) uint8 of the backend's array type (a view), or None before any."""
        return None if self._storage is None else self._storage[: self.count]

    def replace(self, codes: Any) -> None:
        """Hold ``codes`` (the backend's array, one row per database row) and nothing else."""
        self._storage, self.count = codes, int(codes.shape[0])

    def append(self, codes: Any) -> None:
        """Add ``codes`` after the live ones."""
        if self._storage is None:
            self.replace(codes)
            return
        count, extra = self.count, int(codes.shape[0])
        capacity = int(self._storage.shape[0])
        if count + extra > capacity:
            grown = self.backend.empty_rows(
                self._storage, (max(count + extra, 2 * capacity, MIN_CAPACITY), int(self._storage.shape[1]))
            )
            grown[:count] = self._storage[:count]
            self._storage = grown
        self._storage[count : count + extra] = codes
        self.count = count + extra

    def move(self, moves: RowMoves) -> None:
        """Close a removal's holes as the rows' were: code ``sources[i]`` into ``destinations[i]``."""
        if self._storage is None:
            return
        if moves.sources.size:
            self._storage[moves.destinations] = self._storage[moves.sources]
        self.count = moves.count
        capacity = int(self._storage.shape[0])
        if capacity > 4 * MIN_CAPACITY and self.count < capacity // 4:  # shrink as the rows' storage does
            smaller = self.backend.empty_rows(
                self._storage, (max(2 * self.count, MIN_CAPACITY), int(self._storage.shape[1]))
            )
            smaller[: self.count] = self._storage[: self.count]
            self._storage = smaller


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What `LSHRetriever.tune` chose: the parameters, the recall it measured on the sample, and every trial."""

    n_bits: int
    n_candidates: int
    expected_recall: float
    queries_per_second: float
    trials: tuple[tuple[int, int, float, float], ...]  # (n_bits, n_candidates, recall, queries/s)


class LSHRetriever(ExactRetriever):
    """Approximate k-nearest-neighbour search: a Hamming prefilter over sign codes, then exact re-ranking.

    Each vector gets a code of ``n_bits`` bits, bit j the sign of its projection on the j-th of
    ``n_bits`` seeded random hyperplanes (``seed``; stored with the index). A search codes the
    queries the same way, keeps the ``n_candidates`` rows nearest each query in Hamming distance
    (the backend's `hamming_topk`), scores only those rows exactly with the metric (the backend's
    `rerank`, on its device) and returns the best k with their exact scores. With ``n_candidates``
    at least the index size the answer is the exact one.

    How each metric maps onto sign hashing (the Hamming distance of two codes estimates the angle
    between the hashed vectors, so each metric is turned into an angle that orders rows as it does):

    - ``cosine``: rows and queries are scaled to unit length and centred on the mean c of the
      first rows added (unit-scaled): ``x/|x| - c``. Without centring the angle would be the
      cosine's own; centring is the per-plane threshold that balances each bit (FAISS trains the
      same), which on real embeddings (all in one cone) buys recall.
    - ``dot``: the norm-augmentation trick (Simple-LSH): a row x becomes ``[x, sqrt(M² - |x|²)]``
      with M the largest norm held (grown by 5 % and every code recomputed when a longer row
      arrives), a query ``[q, 0]``; the angle between them then orders rows by ``q·x``.
    - ``l2``: an approximation by centring: rows and queries are hashed as ``x - c``, with c the
      mean of the first rows added, so the prefilter ranks rows by their angle to the query seen
      from the data's centre (near in l2 is near in that angle for rows at similar distances from
      c); re-ranking is exact l2. (The exact reduction of l2 to inner product followed by norm
      augmentation was measured too: on clustered data it kept half the recall of centring.)
    - ``l1``: refused (`InvalidInputError`): no sign-hashing family preserves l1 order; use the
      exact retriever.

    Parameters default to the ``lsh_n_bits``, ``lsh_n_candidates`` and ``lsh_seed`` settings;
    `tune` picks ``n_bits`` and ``n_candidates`` for a target recall from sample queries.
    """

    name = "lsh"

    def __init__(
        self,
        metric: Metric | str = "cosine",
        backend: str | DistanceBackend = "auto",
        *,
        n_bits: int | None = None,
        n_candidates: int | None = None,
        seed: int | None = None,
        dim: int | None = None,
        device: str | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        settings = get_settings()
        parsed = Metric.parse(metric)
        if parsed not in EXTRA_COORDINATES:
            raise InvalidInputError(
                f"metric must be one of cosine, dot, l2 for the LSH retriever (no sign hashing preserves "
                f"{parsed.value} order; use the exact retriever); got {parsed.value!r}"
            )
        self.n_bits = check_int(settings.lsh_n_bits if n_bits is None else n_bits, "n_bits", minimum=1)
        self.n_candidates = check_int(
            settings.lsh_n_candidates if n_candidates is None else n_candidates, "n_candidates", minimum=1
        )
        self.seed = check_int(settings.lsh_seed if seed is None else seed, "seed", minimum=0)
        super().__init__(parsed, backend, dim=dim, device=device, memory_budget_bytes=memory_budget_bytes)
        self._planes: F32 | None = None  # host (n_bits, dim + extra)
        self._device_planes: Any = None
        self._code_rows = CodeRows(self.backend)  # code i is row i's, through every add and remove
        self._loaded_codes: Any = None  # codes read by `load`, taken by the add that follows
        self._centre: F64 | None = None  # l2
        self._augment_norm = 0.0  # dot

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(metric={self.metric.value!r}, backend={self.backend.name!r}, dim={self._dim}, "
            f"count={len(self)}, n_bits={self.n_bits}, n_candidates={self.n_candidates})"
        )

    # --- hashing -------------------------------------------------------------------------------
    @staticmethod
    def make_planes(n_bits: int, width: int, seed: int) -> F32:
        """The seeded hyperplanes: float32 (n_bits, width), unit normals in blocks of ``width`` orthogonal ones.

        Each block is the Q of a seeded Gaussian matrix's QR decomposition (a uniformly random
        rotation), so up to ``width`` bits never repeat a direction; fewer bits' planes are a
        prefix of more bits' (for one seed and width).
        """
        rng = np.random.default_rng(seed)
        blocks = []
        for start in range(0, n_bits, width):
            q, r = np.linalg.qr(rng.standard_normal((width, width)))
            rotation = q * np.where(np.diag(r) < 0, -1.0, 1.0)
            blocks.append(rotation.T[: min(width, n_bits - start)])
        return np.concatenate(blocks).astype(np.float32)

    def _hashed_rows(self, vectors: Any) -> Any:
        """Rows transformed for hashing (see the class docstring): float32, in ``vectors``' array library and device.

        Computed in float64 wherever the rows are (host NumPy, or the backend's device), so a
        database's rows are never copied to the host to be coded.
        """
        if not isinstance(vectors, np.ndarray) and array_module(vectors).__name__ == "torch":
            return self._hashed_tensor(vectors, query=False)
        x = np.asarray(self.backend.to_numpy(vectors) if not isinstance(vectors, np.ndarray) else vectors, np.float64)
        if self.metric is Metric.COSINE:
            assert self._centre is not None
            return (_unit_rows(x) - self._centre).astype(np.float32)
        if self.metric is Metric.L2:
            assert self._centre is not None
            return (x - self._centre).astype(np.float32)
        squared = np.einsum("ij,ij->i", x, x)
        extra = np.sqrt(np.maximum(self._augment_norm**2 - squared, 0.0))
        return np.concatenate([x, extra[:, None]], axis=1).astype(np.float32)

    def _hashed_tensor(self, vectors: Any, *, query: bool) -> Any:
        """`_hashed_rows` (or `_hashed_queries`) of a torch tensor, computed on its device."""
        import torch

        x = vectors.double()
        if self.metric is not Metric.DOT:
            assert self._centre is not None
            centre = torch.from_numpy(self._centre).to(x.device)
            if self.metric is Metric.COSINE:
                norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
                x = x / torch.where(norms == 0, 1.0, norms)
            return (x - centre).float()
        if query:
            extra = torch.zeros((x.shape[0], 1), dtype=x.dtype, device=x.device)
        else:
            squared = (x * x).sum(dim=1, keepdim=True)
            extra = torch.sqrt(torch.clamp(self._augment_norm**2 - squared, min=0.0))
        return torch.cat([x, extra], dim=1).float()

    def _hashed_queries(self, queries: Any) -> Any:
        if not isinstance(queries, np.ndarray) and array_module(queries).__name__ == "torch":
            return self._hashed_tensor(queries, query=True)
        q = np.asarray(queries, dtype=np.float64)
        if self.metric is Metric.COSINE:
            assert self._centre is not None
            return (_unit_rows(q) - self._centre).astype(np.float32)
        if self.metric is Metric.L2:
            assert self._centre is not None
            return (q - self._centre).astype(np.float32)
        return np.concatenate([q, np.zeros((q.shape[0], 1))], axis=1).astype(np.float32)

    def _augmented_norm_of(self, vectors: Any) -> float:
        if isinstance(vectors, np.ndarray) or array_module(vectors).__name__ != "torch":
            x = np.asarray(self.backend.to_numpy(vectors), dtype=np.float64)
            return float(np.sqrt(np.max(np.einsum("ij,ij->i", x, x), initial=0.0)))
        if vectors.shape[0] == 0:
            return 0.0
        x = vectors.double()
        return float(torch_sqrt_max_squared(x))

    def _centre_of(self, rows: Any) -> F64:
        """The transform's centre (cosine: of the unit rows), float64 on the host, computed where ``rows`` are."""
        if isinstance(rows, np.ndarray) or array_module(rows).__name__ != "torch":
            x = np.asarray(self.backend.to_numpy(rows), dtype=np.float64)
            return np.asarray((_unit_rows(x) if self.metric is Metric.COSINE else x).mean(axis=0), dtype=np.float64)
        import torch

        x = rows.double()
        if self.metric is Metric.COSINE:
            norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            x = x / torch.where(norms == 0, 1.0, norms)
        return np.asarray(x.mean(dim=0).cpu().numpy(), dtype=np.float64)

    def _codes_of(self, hashed: Any, planes: Any) -> Any:
        return self.backend.sign_codes(self.backend.asarray(hashed, "vectors"), planes)

    def _row_codes(self, rows: Any, planes: Any) -> Any:
        """Codes of host ``rows``, transformed and hashed in slices so host memory stays bounded."""
        return concat_rows(
            *[
                self._codes_of(self._hashed_rows(rows[r0 : r0 + HASH_ROWS]), planes)
                for r0 in range(0, max(len(rows), 1), HASH_ROWS)
            ]
        )

    def _set_planes(self, planes: F32) -> None:
        self._planes = planes
        self._device_planes = self.backend.asarray(planes, "planes")

    # --- codes kept aligned with the rows -------------------------------------------------------
    @property
    def codes(self) -> Any:
        """The codes of the rows, (N, ceil(n_bits / 8)) uint8 of the backend's array type, in `ids` order (a view)."""
        with self._lock.read():
            live = self._code_rows.live
            return self._device_codes(np.empty((0, (self.n_bits + 7) // 8), np.uint8)) if live is None else live

    def _rows_appended(self, start: int) -> None:
        """Code the rows appended from ``start`` on (every row when a longer one raises the dot norm)."""
        assert self._database is not None
        vectors = self._database.vectors
        added = vectors[start:]
        if self._planes is None:
            width = added.shape[1] + EXTRA_COORDINATES[self.metric]
            self._set_planes(self.make_planes(self.n_bits, width, self.seed))
        if self.metric is not Metric.DOT and self._centre is None:
            self._centre = self._centre_of(added)
        recode = start == 0
        if self.metric is Metric.DOT:
            norm = self._augmented_norm_of(added)
            if norm > self._augment_norm:
                self._augment_norm = norm * NORM_HEADROOM
                recode = True  # every code depends on the norm
        if self._loaded_codes is not None:
            self._code_rows.replace(self._loaded_codes)
            self._loaded_codes = None
        elif recode:
            self._code_rows.replace(self._row_codes(vectors, self._device_planes))
        else:
            self._code_rows.append(self._row_codes(added, self._device_planes))

    def _rows_moved(self, moves: RowMoves) -> None:
        """Move the codes as the removal moved the rows."""
        self._code_rows.move(moves)

    def rehash(self, n_bits: int | None = None, seed: int | None = None) -> None:
        """Draw new hyperplanes (``n_bits``, ``seed``; unchanged where None) and recompute every code."""
        with self._lock.write():
            n_bits = self.n_bits if n_bits is None else check_int(n_bits, "n_bits", minimum=1)
            self.n_bits, self.seed = n_bits, self.seed if seed is None else check_int(seed, "seed", minimum=0)
            if self._database is None or self._dim is None or self._count == 0:
                self._planes = self._device_planes = None
                self._code_rows = CodeRows(self.backend)
                return
            self._set_planes(self.make_planes(n_bits, self._dim + EXTRA_COORDINATES[self.metric], self.seed))
            self._code_rows.replace(self._row_codes(self._database.vectors, self._device_planes))

    def _set_codes(self, planes: Any, codes: Any) -> None:
        """Search with ``planes`` (the backend's array) and ``codes`` of the current rows (benchmarks swap them)."""
        with self._lock.write():
            if int(codes.shape[0]) != self._count:
                raise InvalidInputError(f"codes must have one row per vector ({self._count}); got {codes.shape[0]}")
            self._device_planes = planes
            self._code_rows.replace(codes)

    # --- search --------------------------------------------------------------------------------
    def search(self, queries: Any, k: int, *, out: str = "numpy") -> SearchResult:
        """The ``k`` approximately nearest vectors to each query, with exact scores, best first.

        Where k exceeds the index size the tail holds id -1 and the metric's worst value. An empty
        index, or ``n_candidates`` below k, is an `InvalidInputError`. ``out="device"`` returns the
        backend's own arrays, as `ExactRetriever.search` does.
        """
        k = check_k(k, get_settings().max_k)
        self._check_out(out)
        with self._lock.read():  # held throughout: a removal moves rows and codes in place
            if self._count == 0 or self._database is None:
                raise InvalidInputError("the index is empty; add vectors before searching")
            count = self._database.count
            if self.n_candidates < min(k, count):
                raise InvalidInputError(f"n_candidates must be >= k; got n_candidates={self.n_candidates} for k={k}")
            host = as_matrix(queries, "queries", dim=self._dim)
            top = self._two_stage(
                host, self._device_planes, self._code_rows.live, min(self.n_candidates, count), min(k, count)
            )
            if out == "device":
                top = TopK(self._beside_codes(top.scores), self._beside_codes(top.indices))
            return self._result(top, k, out)

    def _beside_codes(self, x: Any) -> Any:
        """``x`` on the codes' device (a backend may answer small searches with host tensors: see `lsh_topk`)."""
        codes = self._code_rows.live
        if getattr(x, "device", None) == getattr(codes, "device", None):
            return x
        return like(codes, self.backend.to_numpy(x))

    def _two_stage(self, queries: F32, planes: Any, codes: Any, n_candidates: int, k: int) -> TopK:
        """Hamming prefilter then exact re-ranking, in query chunks whose working memory fits the budget."""
        assert self._database is not None
        database = self._database
        dim = database.dim
        budget = (self.memory_budget_bytes or get_settings().memory_budget_bytes) // 4
        per_query = 2 * n_candidates * dim  # the gathered candidate rows; backends chunk Hamming work themselves
        chunk = max(1, min(queries.shape[0], get_settings().max_query_chunk, budget // per_query))
        scores: list[Any] = []
        indices: list[Any] = []
        for q0 in range(0, queries.shape[0], chunk):
            block = queries[q0 : q0 + chunk]
            hashed = self._hashed_queries(block)
            top = self.backend.lsh_topk(hashed, block, planes, codes, database, n_candidates, k)
            scores.append(top.scores)
            indices.append(top.indices)
        if len(scores) == 1:
            return TopK(scores[0], indices[0])
        parts = [TopK(self._beside_codes(s), self._beside_codes(i)) for s, i in zip(scores, indices, strict=True)]
        return self.backend.concat_topk(parts)

    # --- tuning --------------------------------------------------------------------------------
    def tune(
        self,
        target_recall: float,
        sample_queries: Any,
        k: int = 10,
        *,
        bit_choices: tuple[int, ...] = TUNE_BITS,
    ) -> TuneResult:
        """Pick ``n_bits`` and ``n_candidates`` that reach ``target_recall`` (recall@k) on ``sample_queries``.

        For each bit count, the fewest candidates (doubling from k) that reach the target on the
        sample are found against the exact answer; the fastest of those settings, timed on the
        sample, is applied (codes recomputed) and returned with the recall it reached there, which
        is the recall to expect on queries like the sample. Where no setting reaches the target, the
        exact fallback (n_candidates = index size) at the most bits is chosen.
        """
        if not isinstance(target_recall, float | int) or not 0 < target_recall <= 1:
            raise InvalidInputError(f"target_recall must be a number in (0, 1]; got {target_recall!r}")
        k = check_k(k, get_settings().max_k)
        bits = [check_int(b, "bit_choices", minimum=1) for b in bit_choices]
        if not bits:
            raise InvalidInputError("bit_choices must name at least one bit count; got none")
        with self._lock.write():
            if self._count == 0 or self._database is None:
                raise InvalidInputError("the index is empty; add vectors before tuning")
            host = as_matrix(sample_queries, "sample_queries", dim=self._dim)
            count = len(self)
            k = min(k, count)
            truth = ExactRetriever.search(self, host, k).scores
            rows = self._database.vectors
            width = int(rows.shape[1]) + EXTRA_COORDINATES[self.metric]
            trials: list[tuple[int, int, float, float]] = []
            chosen: dict[int, tuple[Any, Any]] = {}
            for n_bits in sorted(set(bits)):
                planes = self.backend.asarray(self.make_planes(n_bits, width, self.seed), "planes")
                codes = self._row_codes(rows, planes)
                chosen[n_bits] = (planes, codes)
                n_candidates = k
                while True:
                    top = self._two_stage(host, planes, codes, n_candidates, k)
                    recall = recall_at_k(self.backend.to_numpy(top.scores), truth, self.metric.higher_is_better)
                    if recall >= target_recall or n_candidates >= count:
                        break
                    n_candidates = min(2 * n_candidates, count)
                start = time.perf_counter()
                self._two_stage(host, planes, codes, n_candidates, k)
                rate = host.shape[0] / max(time.perf_counter() - start, 1e-9)
                trials.append((n_bits, n_candidates, recall, rate))
            reaching = [t for t in trials if t[2] >= target_recall] or [max(trials, key=lambda t: (t[2], t[0]))]
            n_bits, n_candidates, recall, rate = max(reaching, key=lambda t: t[3])
            self.n_bits, self.n_candidates = n_bits, n_candidates
            self._set_planes(self.make_planes(n_bits, width, self.seed))
            self._code_rows.replace(chosen[n_bits][1])
            return TuneResult(n_bits, n_candidates, recall, rate, tuple(trials))

    # --- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to directory ``path`` atomically: vectors, ids, hyperplanes, codes and the transform."""
        with self._lock.read():  # one snapshot: rows, ids and codes of one moment
            vectors = self._vectors_copy()
            ids, dim = self._id_storage[: self._count].copy(), self._dim
            planes = self._planes if self._planes is not None else np.empty((0, 0), dtype=np.float32)
            live = self._code_rows.live
            codes = (
                np.array(self.backend.to_numpy(live), dtype=np.uint8, copy=True)
                if live is not None and self._count
                else np.empty((0, (self.n_bits + 7) // 8), dtype=np.uint8)
            )
            centre = self._centre if self._centre is not None else np.empty(0, dtype=np.float64)
            params = {
                "n_bits": self.n_bits,
                "n_candidates": self.n_candidates,
                "seed": self.seed,
                "augment_norm": self._augment_norm,
            }
        files: dict[str, np.ndarray[Any, Any]] = {
            "vectors.npy": vectors,
            "ids.npy": ids,
            "planes.npy": planes,
            "codes.npy": codes,
            "centre.npy": centre,
        }
        with storage.atomic_directory(path) as tmp:
            for name, array in files.items():
                storage.write_array(tmp, name, array)
            storage.write_manifest(
                tmp,
                {
                    "kind": f"retriever:{self.name}",
                    "metric": self.metric.value,
                    "dim": dim,
                    "dtype": "float32",
                    "count": int(ids.shape[0]),
                    "lsh": params,
                },
                files=list(files),
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str], backend: str | DistanceBackend = "auto") -> LSHRetriever:
        """Read an index that `save` wrote, checking every file, onto ``backend``; codes are not recomputed."""
        manifest = storage.read_manifest(path, kind=f"retriever:{cls.name}")
        where = Path(manifest["path"])
        count = storage.manifest_field(manifest, "count", int)
        dim = storage.manifest_field(manifest, "dim", (int, type(None)))
        metric = storage.manifest_field(manifest, "metric", str)
        params = storage.manifest_field(manifest, "lsh", dict)
        for key in ("n_bits", "n_candidates", "seed"):
            storage.manifest_field(params, key, int, where=where / storage.MANIFEST, prefix="lsh.")
        augment_norm = storage.manifest_field(
            params, "augment_norm", (float, int), where=where / storage.MANIFEST, prefix="lsh."
        )
        if count < 0 or (dim is None and count > 0) or (dim is not None and dim < 1):
            raise IndexFormatError(f"{where / storage.MANIFEST} is damaged: count {count} with dim {dim}")
        arrays = {
            name: storage.read_array(manifest, name)
            for name in ("vectors.npy", "ids.npy", "planes.npy", "codes.npy", "centre.npy")
        }
        try:
            retriever = cls(
                metric=metric,
                backend=backend,
                n_bits=params["n_bits"],
                n_candidates=params["n_candidates"],
                seed=params["seed"],
                dim=dim,
            )
        except InvalidInputError as exc:
            raise IndexFormatError(f"{where / storage.MANIFEST} is damaged: {exc}") from exc
        width = (retriever.n_bits + 7) // 8
        extra = EXTRA_COORDINATES[retriever.metric]
        expected = {
            "vectors.npy": (np.float32, (count, dim) if count else None),
            "ids.npy": (np.int64, (count,)),
            "planes.npy": (np.float32, (retriever.n_bits, (dim or 0) + extra) if count else None),
            "codes.npy": (np.uint8, (count, width)),
            "centre.npy": (np.float64, (dim,) if retriever.metric is not Metric.DOT and count else (0,)),
        }
        for name, (dtype, shape) in expected.items():
            array = arrays[name]
            if array.dtype != dtype or (shape is not None and array.shape != shape):
                raise IndexFormatError(
                    f"{where / name} holds {array.dtype} {array.shape}, the manifest says {np.dtype(dtype)} {shape}"
                )
        if count:
            retriever._augment_norm = float(augment_norm)
            retriever._centre = arrays["centre.npy"] if retriever.metric is not Metric.DOT else None
            retriever._set_planes(arrays["planes.npy"])
            retriever._loaded_codes = retriever._device_codes(arrays["codes.npy"])  # taken by the add: not recomputed
            retriever.add(arrays["vectors.npy"], arrays["ids.npy"])
        return retriever

    def _device_codes(self, codes: npt.NDArray[np.uint8]) -> Any:
        """Host codes placed where the backend keeps its own (the array type `sign_codes` returns)."""
        one = np.ones((1, 1), np.float32)
        return like(
            self.backend.sign_codes(self.backend.asarray(one, "probe"), self.backend.asarray(one, "probe")), codes
        )
