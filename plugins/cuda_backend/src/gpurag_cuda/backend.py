"""The hand-written CUDA backend: fused scan + selection kernels compiled by NVRTC for the device.

It shares the torch backend's database, conversions and certificate (`gpurag_torch`); the scans are
its own CUDA C++ (`kernels/*.cu`, see `gpurag_cuda.compiler`), launched on torch's stream through
CuPy. l2 / dot / cosine shortlist from the bf16 rows (a streaming kernel for a few queries, a
tensor-core tile kernel for more), are re-scored directly in float32, and each query is certified
against the bound of the bf16 pass; an uncertified query is answered again in float32. l1 of two queries
or more shortlists from the rows' byte codes (`L1_CODES`, `launch.l1_codes_scan`) under the codes' own
bound (`gpurag_torch.l1_codes`), of one query from the bf16 rows; Hamming is scanned exactly. k above
`KERNEL_MAX_K` takes the torch backend's path.

The fast kernels (the ``cuda_fast_kernels`` setting, the ``fast_kernels`` argument; each also behind a
``FAST_*`` switch below) are ldmatrix-fed fragments in the 64 x 128 tensor-core tile (a register-filtered
tile, `launch.scan_tc` with ``reg``, is measured and off), a 128 x 128 tile for the any-k collect scan, a
few-query stream (`launch.stream_few`), a register-blocked l1 tile (`launch.l1_tile_wide`) and CUDA-graph
replay of searches of up to `GRAPH_MAX_QUERIES` queries (`gpurag_torch.graphs`; `host_topk` replays one
that ends in the copy to the host, one synchronisation a search); off, the earlier kernels answer.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from gpurag.backend import Availability, Boundaries, Database
from gpurag.errors import BackendUnavailableError, InvalidInputError
from gpurag.metrics import Metric, TopK
from gpurag.settings import get_settings
from gpurag_torch import graphs
from gpurag_torch.backend import TorchBackend, cuda_present

if TYPE_CHECKING:
    import torch

#: Largest k the fused kernels select (their per-split lists keep a power of two >= k, at most 64).
KERNEL_MAX_K = 64
#: Least kp a scan keeps per (query, split).
MIN_KP = 16
#: Rows re-scored per query at least: the certificate needs the best row left out more than twice the
#: bf16 error bound below the k-th (the torch and Triton backends measured 256 on 1M x 768).
SHORTLIST_MIN = 256
#: Most queries for which l1 shortlists from the bf16 rows (streamed, 8 queries a pass); above it l1 is
#: compute-bound and scanned exactly in float32.
L1_LOW_MAX_QUERIES = 16
#: Query counts for which dot, l2 and cosine take the few-query stream (fast kernels on) rather than the
#: earlier stream (up to 8 queries) or the tensor-core tile. On an H200 at 1M x 768 the earlier stream's one
#: query read 0.456 ms against the few stream's 0.774 (its two lanes per row read half sectors per request),
#: and its 8 queries 2.34 ms against 0.83.
FEW_PRODUCT_QUERIES: frozenset[int] = frozenset(range(3, 9))
#: Fewest queries for which l1's shortlist takes the few-query stream (below: the earlier stream, 0.414
#: against 0.706 ms for one query at 1M x 768; at 16 queries on 10M x 128 the few stream took 3.7 ms
#: against 17.6).
FEW_L1_MIN_QUERIES = 3
#: Which of the fast kernels (``fast_kernels``) a backend uses: the wide tensor-core tile for the select scan
#: and for the any-k collect scan, the few-query stream (l1 from `FEW_L1_MIN_QUERIES` to `L1_LOW_MAX_QUERIES`
#: queries, products for `FEW_PRODUCT_QUERIES`), the wide l1 tile, and graph replay of searches of up to
#: `GRAPH_MAX_QUERIES` queries. The wide select tile is off: on an H200 it was the slower, 12.9 against
#: 11.5 ms at 1M x 768 x 1024 and 34.0 against 26.6 at 10M x 128 x 1024 (its collect twin was the faster:
#: k = 1024 took 25.3 against 39.4 ms end to end).
FAST_WIDE_TILE = False
FAST_WIDE_COLLECT = True
#: The 64 x 128 select tile with ldmatrix-fed fragments: on an H200 it took 10.9 against 11.8 ms at
#: 1M x 768 x 1024 and 26.9 against 27.1 at 10M x 128 x 1024 (both checked against float64).
FAST_TC_LDM = True
#: The register-filtered tile (`launch.reg_takes`: keys filtered in registers against the running thresholds, one
#: copy pipeline across row tiles) for the many-query select scan. Off: on an H200 (S4 W2, through the retriever,
#: interleaved) its best block tile took 12.28 against the 64 x 128 ldmatrix tile's 11.96 ms at 1M x 768 x 1024 dot
#: (12.65 against 12.50 l2) and 29.6 against 28.4 ms at 10M x 128 x 1024 dot, winning only 10M l2 (30.0 against
#: 33.2): with the selection out of the way the products themselves are slow (`benchmarks/results/cuda_h200_s4.md`).
FAST_REG_TILE = False
FAST_FEW_STREAM = True
FAST_L1_TILE = True
#: Whether l1 searches of at least `L1_CODES_MIN_QUERIES` queries shortlist from the rows' byte codes
#: (`gpurag_torch.l1_codes`, `launch.l1_codes_scan`: exact integer sums of absolute byte differences, whose
#: error is bounded per query), re-scored in float32 and certified; the codes' query width is at most
#: `L1_CODES_WIDEST`.
L1_CODES = True
L1_CODES_MIN_QUERIES = 2
#: On an H200 (S4 W2) the scan of width 8 was the fastest at both l1 rows, though it reads the rows once per
#: 8 queries: 1M x 128 x 1024 6.24 ms against 9.43 (width 16) and 21.4 (width 32); 10M x 128 x 16 2.00
#: against 3.74 and 3.84. Those kernels inlined every offer (126-445 KB of code); they now call one.
L1_CODES_WIDEST = 8
#: Rows each query re-scores from the codes' shortlist at least (the Triton backend measured why: on 1M x 128
#: random normal rows the 256th best code distance cleared the 10th best l1 by only 1.5-3).
L1_CODES_SHORTLIST = 512
FAST_GRAPHS = True
#: Most queries whose shortlisted search replays a captured CUDA graph (`use_graphs`).
GRAPH_MAX_QUERIES = 16
#: Past `KERNEL_MAX_K`, the threshold scan takes k up to this fraction of the rows (the torch path above).
LARGE_K_MAX_FRACTION = 8
#: The threshold scan samples every SAMPLE_STRIDE-th row (at most) to set each query's threshold, aiming
#: for SAMPLE_MARGIN x k rows above it, and buffers up to BUFFER_FACTOR x k rows per query. The margin
#: is what certifies: on an H200 at 10M x 128, 1.25 x k left the k-th within the bf16 bound of the
#: rows cut off, and every query was re-scanned.
SAMPLE_STRIDE = 64
SAMPLE_MARGIN = 4
BUFFER_FACTOR = 8
#: Most buffered entries one threshold launch holds (queries are taken in chunks under it).
BUFFER_ENTRIES = 1 << 26


def _kp(k: int) -> int:
    from gpurag_cuda.launch import pow2_at_least

    return pow2_at_least(max(k, MIN_KP))


class CudaBackend(TorchBackend):
    """Exact search with the package's CUDA kernels on ``cuda[:n]``: l2, dot, cosine, l1 and Hamming, any k."""

    name = "cuda"
    device_kinds = ("cuda",)  # type: ignore[assignment]  # TorchBackend leaves its pair unannotated
    metrics = frozenset(Metric)
    max_k = None

    def __init__(
        self,
        device: str | None = None,
        *,
        low_precision: bool | None = None,
        chunk_scores: int | None = None,
        fast_kernels: bool | None = None,
    ) -> None:
        """``fast_kernels`` (default: the ``cuda_fast_kernels`` setting) scans with the wide tensor-core tile
        and the few-query stream where they apply; off, with the earlier kernels."""
        available = self.availability()
        if not available:
            raise BackendUnavailableError(f"backend {self.name!r}: {available.reason}")
        super().__init__(device, low_precision=True if low_precision is None else low_precision,
                         chunk_scores=chunk_scores)  # fmt: skip
        self.fast_kernels = get_settings().cuda_fast_kernels if fast_kernels is None else bool(fast_kernels)
        #: Whether searches of up to `GRAPH_MAX_QUERIES` queries replay captured CUDA graphs (with the fast kernels).
        self.use_graphs = self.fast_kernels and FAST_GRAPHS
        #: Whether l1 shortlists from byte codes (`L1_CODES`; the databases then hold the codes).
        self.l1_codes = self.fast_kernels and self.low_precision and L1_CODES
        self.l1_codes_min_queries = L1_CODES_MIN_QUERIES
        self._graphs = graphs.GraphCache()
        #: Whether `host_topk` answers a few device queries by one graph replay that ends in the host copy.
        self.use_host_graphs = True

    @classmethod
    def availability(cls) -> Availability:
        """Available when torch and cupy are installed and a CUDA driver and device are present."""
        if importlib.util.find_spec("torch") is None:
            return Availability(False, "torch is not installed")
        if importlib.util.find_spec("cupy") is None:
            return Availability(False, "cupy is not installed (pip install 'gpurag-cuda[cuda13]' or '[cuda12]')")
        if not cuda_present():
            return Availability(False, "no CUDA driver or device on this machine")
        return Availability(True)

    @classmethod
    def default_device(cls) -> str:
        """``cuda`` (device 0)."""
        return "cuda"

    @classmethod
    def devices(cls) -> tuple[str, ...]:
        """Each CUDA device torch sees (``cuda:0``, ``cuda:1``...)."""
        return tuple(name for name in super().devices() if name != "cpu")

    # --- the database --------------------------------------------------------------------------
    def prepare(self, vectors: Any, metric: Metric) -> Database:
        """As `TorchBackend.prepare`; an l1 database also holds the rows' byte codes (`gpurag_torch.l1_codes`)."""
        database = super().prepare(vectors, metric)
        if database.metric is Metric.L1 and self.l1_codes:  # every dimension: `required_keys` cannot tell them apart
            from gpurag_torch import l1_codes

            database.row_data.update(l1_codes.row_data(database.vectors))
        return database

    def required_keys(self, metric: Metric) -> set[str]:
        """As the torch backend's, with the byte codes for l1 (`prepare`)."""
        keys = super().required_keys(metric)
        if Metric.parse(metric) is Metric.L1 and self.l1_codes:
            from gpurag_torch import l1_codes

            keys |= {l1_codes.CODES_T, l1_codes.CODE_ERROR, l1_codes.CODE_SCALE}
        return keys

    def _codes_kept(self, dim: int) -> bool:
        from gpurag_torch import l1_codes

        return self.l1_codes and l1_codes.takes(dim)

    def _l1_codes_takes(self, n_queries: int, database: Database, k: int) -> bool:
        """Whether an l1 search of ``n_queries`` shortlists from the byte codes (`L1_CODES`)."""
        from gpurag_cuda import launch
        from gpurag_torch import l1_codes

        return (
            self._codes_kept(database.dim)
            and l1_codes.CODES_T in database.row_data
            and n_queries >= self.l1_codes_min_queries
            and k <= KERNEL_MAX_K
            and launch.l1_codes_width(n_queries, l1_codes.words(database.dim), _kp(k), L1_CODES_WIDEST) > 0
        )

    # --- distances and selection ---------------------------------------------------------------
    def boundaries(self, metric: Metric, queries: int, dim: int) -> Boundaries:
        """Where the scans split a search of ``queries`` queries: row tiles and batches, the row count
        from which the splits stop growing, and (bf16 shortlist) the first row count whose splits keep
        more keys than `SHORTLIST_MIN`; queries: the streaming limit and the query tile."""
        from gpurag_cuda import launch

        sms = launch.multiprocessors(self.torch_device.index or 0)
        l1 = metric is Metric.L1

        codes = l1 and self._codes_kept(dim) and queries >= self.l1_codes_min_queries
        width = launch.l1_codes_width(queries, -(-dim // 4), MIN_KP, L1_CODES_WIDEST) if codes else 0

        def layout(n_rows: int) -> launch.Layout:
            if width:
                return launch.l1_codes_layout(queries, n_rows, width, sms)
            if self._few_takes(metric, queries, dim, MIN_KP):
                return launch.stream_layout(n_rows, sms, launch.few_warps_per_sm(queries))
            if launch.streams(queries, dim, MIN_KP) or (l1 and self._l1_shortlists(queries, dim, MIN_KP)):
                return launch.stream_layout(n_rows, sms)
            if metric is Metric.L1 and self.fast_kernels and FAST_L1_TILE and launch.l1_wide_takes(dim, MIN_KP):
                return launch.tile_layout(queries, n_rows, launch.L1_WIDE_BLOCK_Q, launch.L1_WIDE_BLOCK_N, sms, 1)
            if metric is Metric.L1:
                return launch.tile_layout(
                    queries, n_rows, launch.SIMT_BLOCK_Q, launch.SIMT_BLOCK_N, sms, launch.SIMT_BLOCKS_PER_SM
                )
            return launch.tc_layout(queries, n_rows, dim, MIN_KP, sms, self._wide_tile, self._reg_tile)

        def first_rows(holds: Any) -> int:  # the smallest row count for which holds(rows), by bisection
            low_n, high_n = 1, 1 << 24
            if not holds(high_n):
                return 0
            while low_n < high_n:
                mid = (low_n + high_n) // 2
                low_n, high_n = (low_n, mid) if holds(mid) else (mid + 1, high_n)
            return low_n

        def kept(n_rows: int) -> int:
            per_split = layout(n_rows).rows_per_split
            full, rest = divmod(n_rows, per_split)
            return full * min(MIN_KP, per_split) + min(MIN_KP, rest)

        most = layout(1 << 24).splits
        rows = {launch.STREAM_ROWS, launch.TC_BLOCK_N, launch.SIMT_BLOCK_N, launch.TC_REG_BLOCK_N}
        rows.add(first_rows(lambda n: layout(n).splits >= most) - 1)
        if self.low_precision and (not l1 or width or self._l1_shortlists(queries, dim, MIN_KP)):
            rows.add(first_rows(lambda n: kept(n) > SHORTLIST_MIN) - 1)
        if width:
            rows.add(launch.CODES_BATCH_ROWS)
        tile = launch.SIMT_BLOCK_Q if metric is Metric.L1 else launch.TC_BLOCK_Q
        wide = launch.WIDE_BLOCK_Q if self._wide_tile else tile
        return Boundaries(
            rows=tuple(sorted(r for r in rows if r > 0)),
            queries=(
                FEW_L1_MIN_QUERIES,
                launch.STREAM_MAX_QUERIES,
                L1_LOW_MAX_QUERIES,
                L1_LOW_MAX_QUERIES + tile,
                *((launch.TC_REG_BLOCK_Q + 1,) if self._reg_tile else ()),
                wide + 1,
                *((self.l1_codes_min_queries, width, width + 1) if width else ()),
            ),
        )

    def working_scores(self, queries: int, rows: int) -> int:
        """The kernels keep no score matrix: a few tiles' worth, whatever the block."""
        return min(queries * rows, 1 << 20)

    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        """The ``k`` best rows of ``database`` for each query, best first (see `DistanceBackend.topk`).

        The kernels rank; the rows returned are scored again directly in float32, and a bf16 ranking
        is trusted only where its certificate holds.
        """
        import torch

        from gpurag_torch import search

        database, q, k = self._topk_inputs(queries, database, k)
        if k > KERNEL_MAX_K and database.metric is Metric.L1:
            return TopK(*self._l1_any_k(q, database, k))
        if k > KERNEL_MAX_K and not self._threshold_scan_takes(database, k):
            return super().topk(q, database, k)
        shortlists = (
            k <= KERNEL_MAX_K
            and self.low_precision
            and (
                database.metric is not Metric.L1
                or self._l1_codes_takes(q.shape[0], database, k)
                or self._l1_shortlists(q.shape[0], database.dim, k)
            )
        )
        if shortlists:
            # One sync for both questions: were the float32 terms safe, and did every certificate hold.
            scores, rows, certified, flags = self._small_search(q, database, k) or self._device_shortlist(
                q, database, k
            )
            safe, all_certified = flags.tolist()
            if not safe:
                return self.float64_topk(q, database, k)
            self.queries_searched += q.shape[0]
            if not all_certified:
                redo = torch.nonzero(~certified)[:, 0]
                self.queries_rescanned += int(redo.numel())
                if database.metric is Metric.L1:
                    redo_scores, redo_rows = self._l1(q[redo], database, k)
                else:
                    redo_scores, redo_rows = search.exact_topk(q[redo], database, k, self.chunk_scores)
                scores[redo], rows[redo] = redo_scores, redo_rows
            return TopK(scores, rows)
        if self.needs_float64(q, database):
            return self.float64_topk(q, database, k)
        if k > KERNEL_MAX_K:
            step = max(1, BUFFER_ENTRIES // (BUFFER_FACTOR * k))
            parts = [self._large_k(q[i : i + step], database, k) for i in range(0, q.shape[0], step)]
            return TopK(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        if database.metric is Metric.L1:
            return TopK(*self._l1(q, database, k))
        return super().topk(q, database, k)

    def host_topk(self, queries: Any, database: Database, k: int, *, dim: int | None = None) -> TopK:
        """As `DistanceBackend.host_topk`; up to `GRAPH_MAX_QUERIES` float32 queries cost one graph replay, one copy
        and one synchronisation, their finiteness checked by the search's own overflow flag: a search the shortlist
        does not answer (a failed certificate, float32 overflow, non-finite queries) is searched again the careful
        way, which also reports non-finite queries."""
        import torch

        q = queries
        if isinstance(q, np.ndarray) and self._host_graph_takes(q.shape, database, k):
            q = self.asarray(q, "queries", dim=dim)  # checked on the host, copied up once
        if (
            isinstance(q, torch.Tensor)
            and q.device == self.torch_device
            and q.dtype == torch.float32
            and self._host_graph_takes(tuple(q.shape), database, k)
            and (dim is None or dim == database.dim)
        ):
            own = self._own(database)
            q = q.detach()
            key = graphs.search_key(q, own, "host", k, self._switches(own, q.shape[0], k))
            try:
                words = self._graphs.run_to_host(lambda static_q: self._packed_shortlist(static_q, own, k), q, key)
            except RuntimeError as exc:
                warnings.warn(f"cuda backend: graph capture failed, searches launch kernel by kernel ({exc})",
                              stacklevel=2)  # fmt: skip
                self.use_host_graphs = False
            else:
                found = graphs.unpack_answer(words, q.shape[0], k)
                if found is not None:
                    self.queries_searched += q.shape[0]
                    return TopK(*found)
        return super().host_topk(q, database, k, dim=dim)

    def _host_graph_takes(self, shape: tuple[int, ...], database: Database, k: Any) -> bool:
        """Whether `host_topk` replays a graph for queries of ``shape``: a few of the database's dimension, a k the
        fused lists hold, and a metric the bf16 shortlist answers."""
        return (
            self.use_host_graphs
            and self.use_graphs
            and len(shape) == 2
            and 1 <= shape[0] <= GRAPH_MAX_QUERIES
            and shape[1] == database.dim
            and isinstance(k, int)
            and not isinstance(k, bool)
            and 1 <= k <= min(database.count, KERNEL_MAX_K)
            and self.low_precision
            and (database.metric is not Metric.L1 or self._l1_shortlists(shape[0], database.dim, k))
        )

    def _packed_shortlist(self, q: torch.Tensor, database: Database, k: int) -> torch.Tensor:
        """`_device_shortlist` packed for the host (`graphs.pack_answer`): flagged unless every query is certified
        and the float32 terms are safe."""
        scores, rows, _, flags = self._device_shortlist(q, database, k)
        return graphs.pack_answer(scores, rows, ~flags.all())

    def _switches(self, database: Database, n_queries: int, k: int) -> tuple[Any, ...]:
        """The switches (module and backend) that choose the kernels of a captured search."""
        from gpurag_cuda import launch

        few = self._few_takes(database.metric, n_queries, database.dim, _kp(k))
        return (self.fast_kernels, FAST_WIDE_TILE, FAST_TC_LDM, FAST_REG_TILE, FAST_FEW_STREAM, few, self.l1_codes,
                self.l1_codes_min_queries, launch.tuning())  # fmt: skip

    def pairwise(self, queries: Any, vectors: Any, metric: Metric) -> Any:
        """As `TorchBackend.pairwise`; l1 summed directly in row blocks under `chunk_scores` (no compile step)."""
        if Metric.parse(metric) is not Metric.L1:
            return super().pairwise(queries, vectors, metric)
        q = self._tensor(queries, "queries")
        x = self._tensor(vectors, "vectors")
        if q.shape[1] != x.shape[1]:
            raise InvalidInputError(f"queries and vectors must share a dimension; got {q.shape[1]} and {x.shape[1]}")
        return self._l1_blocks(q, x)

    def _l1_blocks(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(Q, N) l1 distances, each summed directly, in blocks whose (q, x, D) differences fit `chunk_scores`."""
        import torch

        out = torch.empty((q.shape[0], x.shape[0]), dtype=torch.float32, device=q.device)
        per_block = max(1, self.chunk_scores // max(1, q.shape[1]))
        queries_per_block = max(1, min(q.shape[0], per_block))
        rows_per_block = max(1, per_block // queries_per_block)
        for q0 in range(0, q.shape[0], queries_per_block):
            for r0 in range(0, x.shape[0], rows_per_block):
                block_q, block_x = q[q0 : q0 + queries_per_block], x[r0 : r0 + rows_per_block]
                out[q0 : q0 + block_q.shape[0], r0 : r0 + block_x.shape[0]] = (
                    (block_x[None, :, :] - block_q[:, None, :]).abs().sum(dim=2)
                )
        return out

    def _l1_any_k(self, q: torch.Tensor, database: Database, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """l1 past the fused lists: direct sums in blocks, each block's k best kept, the union's k best."""
        import torch

        from gpurag_torch import exact

        x = database.vectors
        step = max(k, self.chunk_scores // max(1, q.shape[0]))
        values, rows = [], []
        for start in range(0, x.shape[0], step):
            block = -self._l1_blocks(q, x[start : start + step])
            top = torch.topk(block, min(k, block.shape[1]), dim=1)
            values.append(top.values)
            rows.append(top.indices + start)
        union_values, union_rows = torch.cat(values, dim=1), torch.cat(rows, dim=1)
        if union_values.shape[1] > k:
            union_rows = torch.gather(union_rows, 1, torch.topk(union_values, k, dim=1).indices)
        scores = direct_scores(q, x, union_rows, Metric.L1, None)
        return exact.best_first(scores, union_rows, k, Metric.L1)

    def _l1_shortlists(self, n_queries: int, dim: int, k: int) -> bool:
        """Whether l1 takes the certified bf16 shortlist: few queries (bandwidth-bound), streamed in groups."""
        from gpurag_cuda import launch

        return (
            self.low_precision
            and n_queries <= L1_LOW_MAX_QUERIES
            and (launch.streams(1, dim, _kp(k)) or self._few_takes(Metric.L1, n_queries, dim, _kp(k)))
        )

    def _small_search(
        self, q: torch.Tensor, database: Database, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`_device_shortlist` by graph replay for a few queries (`use_graphs`); None where it does not apply.

        A capture that fails turns graph replay off for this backend (with a warning) instead of failing the search.
        """
        if not (self.use_graphs and q.shape[0] <= GRAPH_MAX_QUERIES):
            return None
        key = graphs.search_key(q, database, k, self._switches(database, q.shape[0], k))
        try:
            scores, rows, certified, flags = self._graphs.run(
                lambda static_q: self._device_shortlist(static_q, database, k), q, key
            )
        except RuntimeError as exc:
            warnings.warn(f"cuda backend: graph capture failed, searches launch kernel by kernel ({exc})", stacklevel=3)
            self.use_graphs = False
            return None
        return scores, rows, certified, flags

    @property
    def _wide_tile(self) -> bool:
        return self.fast_kernels and FAST_WIDE_TILE

    @property
    def _reg_tile(self) -> bool:
        """Whether many-query select scans take the register-filtered tile (`launch.reg_takes`)."""
        return self.fast_kernels and FAST_REG_TILE

    def _device_shortlist(
        self, q: torch.Tensor, database: Database, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bf16 scan, shortlist, float32 re-score and certificate of ``q``, with no host synchronisation:
        (scores, rows, certified per query, flags [float32 terms safe, every query certified])."""
        import torch

        if database.metric is Metric.L1 and self._l1_codes_takes(q.shape[0], database, k):
            scores, rows, certified = self._l1_codes_shortlist(q, database, k)
        else:
            scores, rows, certified = self._shortlist(q, database, k, self._scan_low(q, database, k))
        flags = torch.stack([~self.overflow_flag(q, database), certified.all()])
        return scores, rows, certified, flags

    def _l1_wide_takes(self, q: torch.Tensor, x: torch.Tensor, kp: int) -> bool:
        from gpurag_cuda import launch

        aligned = q.data_ptr() % 16 == 0 and x.data_ptr() % 16 == 0
        return self.fast_kernels and FAST_L1_TILE and aligned and launch.l1_wide_takes(q.shape[1], kp)

    def _few_takes(self, metric: Metric, n_queries: int, dim: int, kp: int) -> bool:
        """Whether the bf16 scan of ``n_queries`` queries is the few-query stream's (fast kernels on): l1 from
        `FEW_L1_MIN_QUERIES` to `L1_LOW_MAX_QUERIES` queries; dot, l2 and cosine where `FEW_PRODUCT_QUERIES` says."""
        from gpurag_cuda import launch

        if not (self.fast_kernels and FAST_FEW_STREAM and self.low_precision and launch.few_takes(n_queries, dim, kp)):
            return False
        if metric is Metric.L1:
            return FEW_L1_MIN_QUERIES <= n_queries <= L1_LOW_MAX_QUERIES
        return n_queries in FEW_PRODUCT_QUERIES

    def _threshold_scan_takes(self, database: Database, k: int) -> bool:
        return self.low_precision and database.metric is not Metric.L1 and k * LARGE_K_MAX_FRACTION <= database.count

    def _large_k(self, q: torch.Tensor, database: Database, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Any k: a threshold per query from a sample of the rows, then one scan that buffers every row
        reaching it; the buffer is re-scored and certified like the shortlist, and a query whose buffer
        fell short, overflowed or failed its certificate is answered by the float32 pass."""
        import torch

        from gpurag_cuda import launch
        from gpurag_torch import search
        from gpurag_torch.database import LOW, SQ_NORMS

        metric, n_rows, n_queries = database.metric, database.count, q.shape[0]
        low_q = self._low_queries(q, metric)
        low_rows = database.row_data[LOW]
        sq_norms = database.row_data[SQ_NORMS] if metric is Metric.L2 else None
        stride = max(1, min(SAMPLE_STRIDE, n_rows // (32 * k)))
        sample = low_rows[::stride].contiguous()
        sample_sq = sq_norms[::stride].contiguous() if sq_norms is not None else None
        rank = int(SAMPLE_MARGIN * k * sample.shape[0] / n_rows) + 8
        layout = launch.tile_layout(n_queries, sample.shape[0], launch.TC_BLOCK_Q, launch.TC_BLOCK_N,
                                    launch.multiprocessors(q.device.index or 0))  # fmt: skip
        if 2 * rank > layout.splits * min(launch.MAX_KP, layout.rows_per_split):
            # The sample's splits would not hold its rank-th best row: the float32 pass answers.
            self.queries_searched += n_queries
            self.queries_rescanned += n_queries
            return search.exact_topk(q, database, k, self.chunk_scores)
        found = launch.scan_tc(low_q, sample, sample_sq, launch.MAX_KP)
        rank = min(rank, found.kept_per_query(sample.shape[0]))
        thresholds = torch.topk(found.keys.reshape(n_queries, -1), rank, dim=1).values[:, -1].contiguous()
        capacity = BUFFER_FACTOR * k
        wide = self.fast_kernels and FAST_WIDE_COLLECT
        keys, rows, counts = launch.collect_tc(low_q, low_rows, sq_norms, thresholds, capacity, wide=wide)
        scores = torch.empty((n_queries, k), dtype=torch.float32, device=q.device)
        positions = torch.empty((n_queries, k), dtype=torch.int64, device=q.device)
        full = (counts >= k) & (counts <= capacity)
        redo = ~full
        if bool(full.any()):
            held = counts[full].long()
            width = int(held.min())
            valid = torch.arange(capacity, device=q.device)[None, :] < held[:, None]
            top = torch.topk(torch.where(valid, keys[full], float("-inf")), width, dim=1)
            cutoff = torch.where(held > width, torch.maximum(thresholds[full], top.values[:, -1]), thresholds[full])
            picked = torch.gather(rows[full], 1, top.indices).long()
            got_scores, got_rows, certified = search.rescore_and_certify(
                q[full], database, picked, cutoff, k, rounded_output=False, scorer=direct_scores
            )
            scores[full], positions[full] = got_scores, got_rows
            redo[torch.nonzero(full)[:, 0][~certified]] = True
        self.queries_searched += n_queries
        if bool(redo.any()):
            again = torch.nonzero(redo)[:, 0]
            self.queries_rescanned += int(again.numel())
            scores[again], positions[again] = search.exact_topk(q[again], database, k, self.chunk_scores)
        return scores, positions

    @staticmethod
    def _low_queries(q: torch.Tensor, metric: Metric) -> torch.Tensor:
        import torch

        from gpurag_torch.database import normalised

        unit = normalised(q, torch.linalg.vector_norm(q, dim=1)) if metric is Metric.COSINE else q
        return unit.to(torch.bfloat16).contiguous()

    def _scan_low(self, q: torch.Tensor, database: Database, k: int) -> Any:
        """Launch the bf16 scan of ``q`` (the stream for few queries and for l1, else the tensor-core tiles)."""
        import torch

        from gpurag_cuda import launch
        from gpurag_torch.database import LOW, SQ_NORMS

        metric = database.metric
        low_q = self._low_queries(q, metric)
        sq_norms = database.row_data[SQ_NORMS] if metric is Metric.L2 else None
        kp = _kp(k)
        mode = {Metric.L2: launch.L2, Metric.L1: launch.L1}.get(metric, launch.DOT)
        low_rows = database.row_data[LOW]
        if self._few_takes(metric, q.shape[0], database.dim, kp) and low_rows.data_ptr() % 16 == 0:
            return launch.stream_few(low_q.float(), low_rows, sq_norms, mode, kp)
        if metric is not Metric.L1 and not launch.streams(q.shape[0], database.dim, kp):
            ldm = self.fast_kernels and FAST_TC_LDM
            return launch.scan_tc(low_q, low_rows, sq_norms, kp, wide=self._wide_tile, ldm=ldm, reg=self._reg_tile)
        step = launch.STREAM_MAX_QUERIES
        parts = [
            launch.stream_scan(low_q[i : i + step].float(), database.row_data[LOW], sq_norms, mode, kp)
            for i in range(0, q.shape[0], step)
        ]
        if len(parts) == 1:
            return parts[0]
        return launch.Candidates(
            torch.cat([p.keys for p in parts]), torch.cat([p.rows for p in parts]), parts[0].rows_per_split
        )

    def _shortlist(
        self, q: torch.Tensor, database: Database, k: int, found: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The scan's candidates cut to the rows re-scored, re-scored in float32 and certified per query."""
        import torch

        from gpurag_torch import search

        n_queries, kp = q.shape[0], int(found.keys.shape[2])
        keys, rows = found.keys.reshape(n_queries, -1), found.rows.reshape(n_queries, -1)
        cutoff = found.keys[:, :, kp - 1].max(dim=1).values  # the best key any split left out
        kept = found.kept_per_query(database.count)
        keep = min(kept, max(2 * k, SHORTLIST_MIN))
        if keys.shape[1] > keep:  # the padding goes, and past `keep` real rows the cut raises the cutoff
            top = torch.topk(keys, keep, dim=1)
            if keep < kept:
                cutoff = torch.maximum(cutoff, top.values[:, -1])
            rows = torch.gather(rows, 1, top.indices)
        return search.rescore_and_certify(
            q, database, rows.long(), cutoff, k, rounded_output=False, scorer=direct_scores
        )

    def _l1_codes_shortlist(
        self, q: torch.Tensor, database: Database, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """l1 by the byte-code scan: its candidates cut to the rows re-scored, re-scored in float32, and each
        query certified against the codes' lower bound on every row left out (`gpurag_torch.l1_codes`)."""
        import torch

        from gpurag_cuda import launch
        from gpurag_torch import exact, l1_codes
        from gpurag_torch.database import L1_NORMS

        data = database.row_data
        words, query_error = l1_codes.encode(q, data[l1_codes.CODE_SCALE][0])
        kp = _kp(k)
        width = launch.l1_codes_width(q.shape[0], words.shape[1], kp, L1_CODES_WIDEST)
        # Enough kept keys for the shortlist: few splits (many query groups) keep more each, where the lists fit.
        splits = launch.l1_codes_layout(q.shape[0], database.count, width, launch.multiprocessors(q.device.index or 0))
        wider = min(launch.MAX_KP, launch.pow2_at_least(-(-L1_CODES_SHORTLIST // splits.splits)))
        if wider > kp and launch.l1_codes_shared_bytes(words.shape[1], width, wider) <= launch.WIDE_SHARED_LIMIT:
            kp = wider
        found = launch.l1_codes_scan(words, data[l1_codes.CODES_T], kp, width)
        n_queries = q.shape[0]
        keys, rows = found.keys.reshape(n_queries, -1), found.rows.reshape(n_queries, -1)
        cutoff = found.keys[:, :, kp - 1].max(dim=1).values  # the best key any split left out
        kept = found.kept_per_query(database.count)
        keep = min(kept, max(2 * k, L1_CODES_SHORTLIST))
        if keys.shape[1] > keep:  # the padding goes, and past `keep` real rows the cut raises the cutoff
            top = torch.topk(keys, keep, dim=1)
            if keep < kept:
                cutoff = torch.maximum(cutoff, top.values[:, -1])
            rows = torch.gather(rows, 1, top.indices)
        bound = l1_codes.lower_bound(cutoff, query_error, data)
        candidates = rows.long()
        scores = direct_scores(q, database.vectors, candidates, Metric.L1, None)
        scores, best = exact.best_first(scores, candidates, k, Metric.L1)
        slack = exact.float32_slack(Metric.L1, q.abs().sum(dim=1), data[L1_NORMS].max(), database.dim)
        certified = exact.certify(Metric.L1, scores[:, k - 1], -bound, torch.zeros_like(slack), slack, None)
        return scores, best, certified

    def _l1(self, q: torch.Tensor, database: Database, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        from gpurag_cuda import launch
        from gpurag_torch import exact

        kp = _kp(k)
        x = database.vectors
        if launch.streams(q.shape[0], database.dim, kp):
            found = launch.stream_scan(q, x, None, launch.L1, kp)
        elif self._l1_wide_takes(q, x, kp):
            found = launch.l1_tile_wide(q, x, kp)
        else:
            found = launch.l1_tile(q, x, kp)
        n_queries = q.shape[0]
        top = torch.topk(found.keys.reshape(n_queries, -1), k, dim=1)
        rows = torch.gather(found.rows.reshape(n_queries, -1), 1, top.indices).long()
        scores = direct_scores(q, database.vectors, rows, Metric.L1, None)
        return exact.best_first(scores, rows, k, Metric.L1)

    # --- LSH primitives ------------------------------------------------------------------------
    def hamming_topk(self, codes: Any, database_codes: Any, k: int) -> TopK:
        """The ``k`` database codes nearest each code, nearest first, by the fused Hamming kernel."""
        import torch

        from gpurag_cuda import launch
        from gpurag_torch import lsh

        a = self._codes(codes, "codes").contiguous()
        b = self._codes(database_codes, "database_codes").contiguous()
        lsh.check_codes(a, b, k)
        if k > KERNEL_MAX_K:
            return super().hamming_topk(a, b, k)
        found = launch.hamming_tile(a, b, _kp(k))
        n_queries = a.shape[0]
        top = torch.topk(found.keys.reshape(n_queries, -1), k, dim=1)
        rows = torch.gather(found.rows.reshape(n_queries, -1), 1, top.indices).long()
        return TopK((-top.values).to(torch.int32), rows)


def direct_scores(
    queries: torch.Tensor, vectors: torch.Tensor, rows: torch.Tensor, metric: Metric, row_norms: torch.Tensor | None
) -> torch.Tensor:
    """As `gpurag_torch.exact.direct_scores`, by the re-scoring kernel: rows read in place, no (Q, M, D) copy."""
    import torch

    from gpurag_cuda import launch

    term = {Metric.L2: 0, Metric.L1: 1, Metric.DOT: 2, Metric.COSINE: 2}[metric]
    sums = launch.rescore(queries.contiguous(), vectors.contiguous(), rows, term)
    if metric is not Metric.COSINE:
        return sums
    assert row_norms is not None
    denominator = row_norms[rows] * torch.linalg.vector_norm(queries, dim=1)[:, None]
    return torch.where(denominator > 0, sums / torch.where(denominator > 0, denominator, 1.0), 0.0)
