"""The distance-backend interface every backend plugin implements, and the database handle it prepares."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import numpy as np

from gpurag.arrays import as_matrix, to_host
from gpurag.errors import InvalidInputError
from gpurag.metrics import Metric, TopK


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether a backend can run here and, when it cannot, why."""

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available


@dataclasses.dataclass(frozen=True)
class Boundaries:
    """Sizes at which a backend's `topk` splits its work, for one shape of search.

    ``rows``: row counts at which a new block, tile, chunk or thread's share of the rows begins;
    ``queries``: query counts at which a new tile, thread share or chunk of queries begins. A search
    over more rows (queries) than a value crosses that boundary; the conformance kit sizes its cases
    to cross every value declared here, so a backend that declares its boundaries is tested across them.
    """

    rows: tuple[int, ...] = ()
    queries: tuple[int, ...] = ()


@dataclasses.dataclass
class Database:
    """Vectors resident where a backend computes, plus whatever the metric wants precomputed.

    ``vectors`` is the backend's own (rows, dim) float32 array of the live rows exactly as given (a
    retriever reads them back to save the index); each entry of ``row_data`` is an array with one
    entry per row (norms, normalised rows, a reduced-precision copy) that is sliced with the rows.

    ``storage`` optionally holds the full-capacity arrays behind ``vectors`` and ``row_data`` (the
    same keys as `row_arrays`), of ``capacity`` rows each: `DistanceBackend.append` writes new rows
    past ``count`` in place and grows them by doubling; `DistanceBackend.move_rows` fills holes in
    place. Empty means the live arrays are all there is (capacity = count).
    """

    metric: Metric
    vectors: Any
    row_data: dict[str, Any] = dataclasses.field(default_factory=dict)
    storage: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        """Number of rows."""
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        """Dimension of each row."""
        return int(self.vectors.shape[1])

    @property
    def capacity(self) -> int:
        """Rows the storage holds before `DistanceBackend.append` must grow it."""
        if not self.storage:
            return self.count
        array, axis = self.storage["vectors"], self.row_axes()["vectors"]
        return int(array.shape[axis])

    def row_axes(self) -> dict[str, int]:
        """Every per-row array's key and the axis its rows lie along: ``vectors`` and ``row_data.<key>``."""
        return {"vectors": 0, **{f"row_data.{key}": 0 for key in self.row_data}}

    def row_arrays(self) -> dict[str, Any]:
        """Every per-row array (live rows only), keyed as in `row_axes`."""
        return {"vectors": self.vectors, **{f"row_data.{key}": value for key, value in self.row_data.items()}}

    def with_rows(self, count: int, storage: dict[str, Any]) -> Database:
        """A database of the first ``count`` rows of ``storage`` (keyed as `row_axes`), sharing it."""
        axes = self.row_axes()
        live = {key: _first_rows(array, axes[key], count) for key, array in storage.items()}
        return dataclasses.replace(
            self,
            vectors=live["vectors"],
            row_data={key.removeprefix("row_data."): v for key, v in live.items() if key.startswith("row_data.")},
            storage=storage,
        )


def _first_rows(array: Any, axis: int, count: int) -> Any:
    return array[:count] if axis == 0 else array[:, :count]


def _set_rows(array: Any, axis: int, start: int, values: Any) -> None:
    stop = start + int(values.shape[axis])
    if axis == 0:
        array[start:stop] = values
    else:
        array[:, start:stop] = values


def _move_rows(array: Any, axis: int, sources: Any, destinations: Any) -> None:
    if axis == 0:
        array[destinations] = array[sources]
    else:
        array[:, destinations] = array[:, sources]


@dataclasses.dataclass(frozen=True)
class RowMoves:
    """How removing rows compacts a database: row ``sources[i]`` moves into the hole ``destinations[i]``.

    After the moves the first ``count`` rows are the ones kept. Sources are live rows from the tail
    (at or past ``count``), destinations removed rows before ``count``: the two never overlap, and
    the number of moves is at most the number of rows removed.
    """

    sources: np.ndarray[Any, np.dtype[np.int64]]
    destinations: np.ndarray[Any, np.dtype[np.int64]]
    count: int

    @classmethod
    def plan(cls, count: int, removed: np.ndarray[Any, Any]) -> RowMoves:
        """The moves that close the holes left by removing the distinct positions ``removed`` of ``count`` rows."""
        removed = np.unique(np.asarray(removed, dtype=np.int64))
        kept = count - int(removed.size)
        holes = removed[removed < kept]
        tail = np.arange(kept, count, dtype=np.int64)
        sources = tail[~np.isin(tail, removed[removed >= kept])] if tail.size else tail
        return cls(sources=sources, destinations=holes, count=kept)


#: Rows a database's storage holds at least, once it grows.
MIN_CAPACITY = 16


class DistanceBackend(abc.ABC):
    """Distances, fused top-k selection and LSH primitives on one device.

    A backend implements `prepare`, `topk`, `pairwise`, `sign_codes` and `hamming_topk`; the
    retrievers derive chunking, merging, id mapping and padding from them. Arrays going in and out
    are the backend's own type; `asarray` and `to_numpy` convert at the edges.
    """

    #: The name the backend is registered under (``numpy``, ``torch``, ``cuda``...).
    name: ClassVar[str] = ""
    #: Device kinds the backend runs on: ``cpu``, ``cuda``.
    device_kinds: ClassVar[tuple[str, ...]] = ("cpu",)
    #: Metrics the backend supports.
    metrics: ClassVar[frozenset[Metric]] = frozenset(Metric)
    #: The largest k one `topk` call supports, or None for any k.
    max_k: ClassVar[int | None] = None

    def __init__(self, device: str | None = None) -> None:
        self.device = self.normalize_device(device)

    @classmethod
    @abc.abstractmethod
    def availability(cls) -> Availability:
        """Whether this backend can run on this machine, and why not when it cannot."""

    @classmethod
    def default_device(cls) -> str:
        """The device used when none is named."""
        return cls.device_kinds[0]

    @classmethod
    def devices(cls) -> tuple[str, ...] | None:
        """The device names this backend can run on here, or None where it cannot list them.

        The default lists ``cpu`` for a CPU backend and None otherwise; a GPU backend overrides it to
        list its cards (``cuda:0``, ``cuda:1``...) so that a missing one is refused by name.
        """
        return ("cpu",) if "cpu" in cls.device_kinds else None

    @classmethod
    def normalize_device(cls, device: str | None) -> str:
        """``device`` in canonical form: lower case, ``cpu`` for ``cpu:0``, ``cuda:0`` for ``cuda``.

        None is `default_device`. A device of another kind, or one `devices` does not list, is an
        `InvalidInputError` listing those that exist.
        """
        if device is None:
            return cls.default_device()
        if not isinstance(device, str):
            raise InvalidInputError(f"device must be a string such as 'cpu' or 'cuda:0'; got {device!r}")
        kind, _, index = device.strip().lower().partition(":")
        if kind == "cpu" and index in ("", "0"):
            name = "cpu"
        elif index == "" or (index.isdigit() and kind != "cpu"):
            name = f"{kind}:{int(index or 0)}"
        else:
            name = f"{kind}:{index}"
        known = cls.devices()
        if kind not in cls.device_kinds or (known is not None and name not in known):
            listed = ", ".join(known) if known is not None else ", ".join(f"{k}[:N]" for k in cls.device_kinds)
            raise InvalidInputError(f"device must be one of {listed} for backend {cls.name!r}; got {device!r}")
        return name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r})"

    # --- conversion at the edges ---------------------------------------------------------------
    def asarray(self, x: Any, name: str, *, dim: int | None = None) -> Any:
        """``x`` as this backend's float32 (rows, dim) array, checked to be 2-D, numeric and finite."""
        return as_matrix(x, name, dim=dim)

    def to_numpy(self, x: Any) -> np.ndarray[Any, Any]:
        """A host NumPy copy (or view) of one of this backend's arrays."""
        return to_host(x)

    # --- the database --------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, vectors: Any, metric: Metric) -> Database:
        """Place ``vectors`` (float32, rows x dim, from `asarray`) on the device for ``metric``."""

    def empty_rows(self, like: Any, shape: tuple[int, ...]) -> Any:
        """An uninitialised array of ``shape`` with ``like``'s dtype, on ``like``'s device.

        The default serves NumPy arrays and any array type with ``new_empty`` (torch); a backend whose
        arrays are neither overrides it.
        """
        if hasattr(like, "new_empty"):
            return like.new_empty(shape)
        return np.empty(shape, dtype=like.dtype)

    def append(self, database: Database, vectors: Any) -> Database:
        """``database`` with ``vectors`` (from `asarray`) added as its last rows, in amortised O(new rows).

        Contract (GPU backends implement the same on their own arrays, without host round trips):
        rows ``0 .. database.count - 1`` keep their positions and values, so a `Database` returned
        earlier stays valid for the rows it holds; the new rows are written past ``count`` into
        ``database.storage``, which grows by doubling (at least `MIN_CAPACITY` rows) when full.
        The default prepares the new rows alone with `prepare` and copies what it returns; a backend
        whose precomputed data is not per-row (or whose new rows need the old ones) overrides it.
        """
        added = self.prepare(vectors, database.metric)
        if type(added) is not type(database) or set(added.row_axes()) != set(database.row_axes()):
            combined = np.concatenate([self.to_numpy(database.vectors), self.to_numpy(vectors)])
            return self.prepare(combined, database.metric)
        return self.append_prepared(database, added)

    def append_prepared(self, database: Database, added: Database) -> Database:
        """``database`` followed by the rows of ``added`` (prepared alike), grown by doubling when full."""
        count, extra = database.count, added.count
        axes = database.row_axes()
        storage = dict(database.storage) if database.storage else database.row_arrays()
        capacity = database.capacity
        if count + extra > capacity:
            capacity = max(count + extra, 2 * capacity, MIN_CAPACITY)
            grown = {}
            for key, array in storage.items():
                shape = list(array.shape)
                shape[axes[key]] = capacity
                grown[key] = self.empty_rows(array, tuple(shape))
                _set_rows(grown[key], axes[key], 0, _first_rows(array, axes[key], count))
            storage = grown
        for key, array in added.row_arrays().items():
            _set_rows(storage[key], axes[key], count, array)
        return database.with_rows(count + extra, storage)

    def move_rows(self, database: Database, moves: RowMoves) -> Database:
        """``database`` compacted after a removal: the rows of ``moves.sources`` copied into its holes.

        Contract (GPU backends implement the same on the device; ``moves`` holds host int64 arrays
        of at most the removed count): the copy is done in place in ``database.storage``, in time
        proportional to the moves, and the result holds the first ``moves.count`` rows. The
        ``database`` passed in is invalid afterwards; a retriever calls this only while no search
        reads it. Storage shrinks (one copy) when fewer than a quarter of its rows are live.
        """
        axes = database.row_axes()
        storage = dict(database.storage) if database.storage else database.row_arrays()
        if moves.sources.size:
            for key, array in storage.items():
                _move_rows(array, axes[key], moves.sources, moves.destinations)
        capacity = database.capacity
        if capacity > 4 * MIN_CAPACITY and moves.count < capacity // 4:
            smaller = {}
            for key, array in storage.items():
                shape = list(array.shape)
                shape[axes[key]] = max(2 * moves.count, MIN_CAPACITY)
                smaller[key] = self.empty_rows(array, tuple(shape))
                _set_rows(smaller[key], axes[key], 0, _first_rows(array, axes[key], moves.count))
            storage = smaller
        return database.with_rows(moves.count, storage)

    def take(self, database: Database, positions: np.ndarray[Any, Any]) -> Database:
        """A new database of the rows at ``positions`` (host int64), in that order; ``database`` is unchanged."""
        return self.prepare(self.to_numpy(database.vectors)[positions], database.metric)

    def slice(self, database: Database, start: int, stop: int) -> Database:
        """Rows ``start:stop`` of ``database``, without copying where the backend can avoid it."""
        return Database(
            metric=database.metric,
            vectors=database.vectors[start:stop],
            row_data={key: value[start:stop] for key, value in database.row_data.items()},
        )

    # --- distances and selection ---------------------------------------------------------------
    def boundaries(self, metric: Metric, queries: int, dim: int) -> Boundaries:
        """Where `topk` over ``queries`` queries of dimension ``dim`` splits its work (see `Boundaries`).

        The default declares none; a backend that scans in blocks, tiles, threads or chunks returns
        their sizes so that the conformance kit crosses each.
        """
        return Boundaries()

    def working_scores(self, queries: int, rows: int) -> int:
        """Most scores (float32-sized values) one `topk` call over ``queries`` x ``rows`` holds at once.

        The default, every score of the block, fits a backend that materialises it; a backend that
        scores in tiles of its own returns less, and the retriever then splits searches less.
        """
        return queries * rows

    @abc.abstractmethod
    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        """The ``k`` best rows of ``database`` for each query, best first.

        ``1 <= k <= database.count``. Scores are float32 and computed directly for the rows
        returned (an l2 score is the sum of squared differences, not a norm expansion); indices
        are int64 row positions. Among equal scores any order is allowed.

        Reduced precision (bf16, fp16, TF32, integer codes) may only *shortlist*: the shortlist is
        widened by a bound on the fast pass's own error, its survivors are scored again in float32
        directly, and the answer is chosen on those scores. Where the bound cannot prove that no
        row left out beats the k-th answer (the kept set would overflow, norms too large for the
        bound), that block is answered in float32 instead: never a wrong id.
        """

    def host_topk(self, queries: Any, database: Database, k: int, *, dim: int | None = None) -> TopK:
        """`topk` of queries as the caller gave them (checked as `asarray` checks them), answered as host NumPy arrays.

        The default converts, searches and copies back; a GPU backend may do the whole search in one
        device round trip (the finiteness check folded into the search itself).
        """
        top = self.topk(self.asarray(queries, "queries", dim=dim), database, k)
        return TopK(self.to_numpy(top.scores), self.to_numpy(top.indices))

    @abc.abstractmethod
    def pairwise(self, queries: Any, vectors: Any, metric: Metric) -> Any:
        """The (Q, N) float32 matrix of ``metric`` between every query and every vector."""

    def merge_topk(self, first: TopK, second: TopK, k: int, metric: Metric) -> TopK:
        """The ``k`` best of two partial results for the same queries; ``first`` wins ties."""
        scores = np.concatenate([self.to_numpy(first.scores), self.to_numpy(second.scores)], axis=1)
        indices = np.concatenate([self.to_numpy(first.indices), self.to_numpy(second.indices)], axis=1)
        key = -scores if metric.higher_is_better else scores
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        return TopK(np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1))

    def concat_topk(self, blocks: list[TopK]) -> TopK:
        """Results for consecutive query blocks, stacked along the queries (on the backend's device)."""
        return TopK(
            np.concatenate([self.to_numpy(b.scores) for b in blocks]),
            np.concatenate([self.to_numpy(b.indices) for b in blocks]),
        )

    def map_ids(self, ids: np.ndarray[Any, Any], positions: Any) -> Any:
        """``ids[positions]``: row positions (the backend's array) to user ids, as the backend's int64 array."""
        return ids[self.to_numpy(positions).astype(np.int64, copy=False)]

    def pad_result(self, scores: Any, ids: Any, width: int, worst: float) -> tuple[Any, Any]:
        """(scores, ids) padded on the right to ``width`` columns with ``worst`` and id -1, as the backend's arrays."""
        pad = width - int(scores.shape[1])
        scores = np.pad(self.to_numpy(scores), ((0, 0), (0, pad)), constant_values=worst)
        ids = np.pad(self.to_numpy(ids), ((0, 0), (0, pad)), constant_values=-1)
        return scores, ids

    # --- LSH primitives ------------------------------------------------------------------------
    @abc.abstractmethod
    def sign_codes(self, vectors: Any, planes: Any) -> Any:
        """Packed sign bits: uint8 (N, ceil(B / 8)) for ``vectors`` (N, D) and ``planes`` (B, D).

        Bit ``j`` is set when ``vectors @ planes[j] > 0``; it is bit ``j % 8`` (least significant
        first) of byte ``j // 8``, as ``np.packbits(..., bitorder="little")`` packs; unused trailing
        bits are zero.
        """

    @abc.abstractmethod
    def hamming_topk(self, codes: Any, database_codes: Any, k: int) -> TopK:
        """The ``k`` database codes nearest each code in Hamming distance, nearest first.

        ``codes`` (Q, W) and ``database_codes`` (N, W) are uint8 from `sign_codes`;
        ``1 <= k <= N``. Scores are int32 Hamming distances; indices int64 row positions.
        """

    def hamming_candidates(self, codes: Any, database_codes: Any, count: int) -> Any:
        """The ``count`` nearest database rows of each code, (Q, count) int64 positions, in any order.

        What a re-ranking needs: the rows of `hamming_topk` without its order. The default takes
        them from `hamming_topk`; a backend may skip the sort.
        """
        return self.hamming_topk(codes, database_codes, count).indices

    def lsh_topk(
        self, hashed: Any, queries: Any, planes: Any, codes: Any, database: Database, n_candidates: int, k: int
    ) -> TopK:
        """An LSH search's two stages: `sign_codes` of ``hashed`` (the queries transformed for hashing),
        `hamming_candidates` among ``codes`` (the database rows' codes), `rerank` of ``queries``.

        One hook, so a backend can run the stages as one unit (a captured CUDA graph); the default
        calls the three methods in turn. Returns the best ``k`` row positions with exact scores.
        """
        query_codes = self.sign_codes(self.asarray(hashed, "hashed queries"), planes)
        candidates = self.hamming_candidates(query_codes, codes, n_candidates)
        return self.rerank(self.asarray(queries, "queries"), database, candidates, k)

    def rerank(self, queries: Any, database: Database, candidates: Any, k: int) -> TopK:
        """The ``k`` best of each query's candidate rows, scored exactly with the database's metric, best first.

        ``candidates`` (Q, C) are int64 row positions in this backend's array type (as `hamming_topk`
        returns them), ``1 <= k <= C``. The rows are gathered and scored on the device (see
        `gpurag.rerank`); indices returned are row positions of ``database``.
        """
        from gpurag.rerank import rerank

        return rerank(queries, database.vectors, candidates, k, database.metric)
