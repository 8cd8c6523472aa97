"""The Triton distance backend: fused distance + selection kernels on CUDA (or the CPU interpreter).

It shares the torch backend's database, conversions, re-scoring and certificate (`gpurag_torch`);
what differs is the scan: `kernels.scan` scores and selects on chip, so no Q x N tile reaches memory.
l2 / dot / cosine (and l1 for one query, where it is bandwidth-bound) shortlist from bf16 rows, l1 for
more queries from the rows' byte codes (`gpurag_torch.l1_codes`: exact integer sums of absolute byte
differences, four dimensions an instruction; the earlier bf16 / float16 l1 scans remain behind
`L1_CODES`); the shortlist is certified per query and uncertified queries are scanned again in float32.

A search costs one synchronisation when nothing needs answering again: the shortlist is re-scored,
ordered and certified by one kernel (`kernels.finish`), which also flags float32 overflow on the
device; small searches replay a CUDA graph of the whole pipeline (`graphs`); many-query scans start
from a floor sampled from the rows, so their running top-k is rarely touched.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from gpurag.backend import Availability, Boundaries, Database
from gpurag.errors import BackendUnavailableError
from gpurag.metrics import Metric, TopK
from gpurag_torch.backend import TorchBackend, cuda_present

if TYPE_CHECKING:
    import torch

#: Largest k the kernels select (their running top-KP); larger k goes through the torch backend's path.
KERNEL_MAX_K = 256
#: Rows kept per query for re-scoring at least. The certificate needs the best row left out to sit
#: more than twice the bf16 error bound below the k-th: on 1M x 768 random normal rows 32 kept rows
#: failed it for most queries (measured on an H200), 256 pass.
SHORTLIST_MIN = 256
#: Column-major (D, N) float32 rows, and their bf16 rounding, that the l1 kernel reads.
ROWS_T = "rows_t"
LOW_T = "low_t"
#: Whether l1's bf16 shortlist reads row-major bf16 rows through the SIMT scan (`kernels.scan`, a
#: D-tile of abs-difference sums per row) rather than column-major ones through `kernels.l1`. Off: on
#: the H200 the row-major scan took 1.24 ms for 1M x 768 at Q = 1, the column-major kernel 0.90.
L1_ROW_MAJOR = False
#: Largest Q for which l1 shortlists in bf16 (memory-bound scans: half the bytes of float32).
L1_LOW_MAX_QUERIES = 16
#: Above `L1_LOW_MAX_QUERIES` l1 is compute-bound: it shortlists from float16 rows (`HALF_T`), abs-differences
#: summed two at a time by f16x2 instructions in chunks of `launch.L1_HALF_CHUNK` dimensions, where every
#: query and row element lies within `L1_HALF_REACH` (so no float16 chunk sum overflows); else float32.
L1_HALF = True
HALF_T = "half_t"
#: Per-row largest |x_d| (float32), for the float16 range check.
MAX_ABS = "max_abs"
L1_HALF_REACH = 2.0**11
#: Whether l1 searches of at least `L1_CODES_MIN_QUERIES` queries shortlist from the rows' byte codes
#: (`gpurag_torch.l1_codes`: exact integer sums of absolute byte differences, one VABSDIFF4 per four
#: dimensions, whose error is bounded per query) instead of the bf16 / float16 scans; the finish kernel
#: re-scores and certifies them against the codes' lower bound on every row left out.
L1_CODES = True
L1_CODES_MIN_QUERIES = 2
#: Rows each query re-scores from the codes' shortlist at least: on 1M x 128 random normal rows the 256th
#: best code distance cleared the 10th best l1 by only 1.5-3 (the bound E(q) + max E(x) is about 3.8),
#: the 512th by more.
L1_CODES_SHORTLIST = 512
#: Keys each (query, split) keeps for the k the conformance kit asks (k <= 16): the shortlist
#: boundary is declared where the splits' kept keys first outnumber `SHORTLIST_MIN`.
BOUNDARY_KP = 16
#: Searches of at most this many queries over at least `GRAPH_MIN_ROWS` rows replay a CUDA graph of
#: the whole search (captured on the first search of each shape): a one-query search costs tens of
#: kernel launches, more host time than the scan itself.
GRAPH_MAX_QUERIES = 16
GRAPH_MIN_ROWS = 1 << 16
#: Searches of at least this many queries over at least `SEED_MIN_ROWS` rows first find, per query, a
#: floor from a sample of the rows (the `SEED_SAMPLE_RANK`-th best approximate score over every
#: `SEED_SAMPLE_STRIDE`-th row, so about rank x stride = 256 rows score above it): the scan then
#: keeps only rows above the floor, and its running top-k is updated far less often.
SEED_MIN_QUERIES = 64
SEED_MIN_ROWS = 1 << 16
SEED_SAMPLE_RANK = 8
SEED_SAMPLE_STRIDE = 32
#: Keys the sample's scan keeps per (query, split): the floor is the `SEED_SAMPLE_RANK`-th best of them,
#: so below `SEED_SAMPLE_RANK` (down to 1, each split's best alone) it is a little lower, and the
#: sample's own running top-k far cheaper to keep: at 10M x 128, Q = 1024 on an H200 the sample's
#: scan took 1.03 ms keeping 8, 0.58 ms keeping 1 (a part of every search that does not shrink with N).
SEED_SAMPLE_KP = 1
#: Below this many queries (an H200's multiprocessors) the finish kernel's one program per query would
#: leave most of the GPU idle while it gathers the candidates: `kernels.rescore` sums them first.
FINISH_SPLIT_BELOW = 132
#: Query counts probed for a change of kernel or tile (`launch.choose_scan_config` switches at 16 and 512).
BOUNDARY_QUERY_PROBE = 1024


def _infinite_key() -> Any:
    """A packed key (`kernels.select`) of score +inf: as a cutoff, no certificate holds against it."""
    import torch

    return torch.tensor(0x7F800000 << 32, dtype=torch.int64).view(torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(TorchBackend):
    """Exact search with Triton kernels on ``cuda[:n]``, or on ``cpu`` under ``TRITON_INTERPRET=1``."""

    name = "triton"
    device_kinds = ("cuda", "cpu")
    metrics = frozenset(Metric)
    max_k = None

    def __init__(
        self, device: str | None = None, *, low_precision: bool | None = None, chunk_scores: int | None = None
    ) -> None:
        super().__init__(device, low_precision=True if low_precision is None else low_precision,
                         chunk_scores=chunk_scores)  # fmt: skip
        #: Replay CUDA graphs for small searches (`GRAPH_MAX_QUERIES`); seed large ones with a sampled floor.
        self.use_graphs = True
        self.use_seed = True
        #: `host_topk` of a few device queries through a graph that ends in the host copy (one sync).
        self.use_host_graphs = True
        #: Whether `host_topk`'s graph takes the finish kernel's packed answer (`packed_topk`) as it is
        #: (H200, W1b: 1M x 768 Q=1 dot 0.580 -> 0.562 ms).
        self.packed_finish = True
        #: Whether the splits' keys are cut to the shortlist by `launch.merge_groups` (one kernel) rather
        #: than torch.topk over all of them with separate cutoff reductions (H200, W1b: 1M x 768 Q=1
        #: dot / l2 / cosine 0.580 / 0.548 / 0.567 -> 0.549 / 0.507 / 0.517 ms; Q=1024 5.69 / 5.70 /
        #: 5.76 -> 5.56 / 5.57 / 5.61 ms).
        self.merge_groups = True
        #: Whether the shortlist's top keys are also sorted (the finish kernel sorts them anyway; off
        #: saves torch.topk's sort pass).
        self.sort_shortlist = False
        #: Re-score, order and certify a scan's shortlist in one kernel (`kernels.finish`); below this
        #: many queries the re-scoring runs first on its own, wider grid.
        self.use_finish = True
        self.finish_split_below = FINISH_SPLIT_BELOW
        #: Few queries (at most `GRAPH_MAX_QUERIES`) go to the scan as float32, rounded to bf16 inside it,
        #: and cosine's unit queries come from one kernel (`kernels.queries`): fewer launches per search.
        #: Off: the scan's tensor-core loop slowed more than the launches saved (H200, S4 W2, 1M x 768
        #: Q=1 with the tail below: dot / l2 / cosine 0.480 / 0.484 / 0.562 ms off, 0.585 / 0.623 / 0.669 on).
        self.few_query_inputs = False
        #: Whether l1 shortlists from byte codes (`L1_CODES`; the databases then hold the codes).
        self.l1_codes = self.low_precision and L1_CODES
        self.l1_codes_min_queries = L1_CODES_MIN_QUERIES
        from gpurag_triton.graphs import GraphCache

        self._graphs = GraphCache()
        if self.torch_device.type == "cpu" and not _interpreting():
            raise BackendUnavailableError(
                f"backend {self.name!r} runs on the CPU only under TRITON_INTERPRET=1 (set before triton is imported)"
            )
        #: Small LSH searches' graphs (`lsh_topk`, also switched by `use_graphs`).
        self._lsh_graphs: Any = None
        self._host_planes: tuple[Any, np.ndarray[Any, Any]] | None = None  # (device planes, float64 host copy)

    @classmethod
    def availability(cls) -> Availability:
        """Available when triton imports and there is a CUDA device, or the interpreter is on."""
        for module in ("torch", "triton"):
            if importlib.util.find_spec(module) is None:
                return Availability(False, f"{module} is not installed")
        if _interpreting() or cuda_present():
            return Availability(True)
        return Availability(False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)")

    @classmethod
    def default_device(cls) -> str:
        """``cuda`` where torch sees a GPU, else ``cpu`` (the interpreter)."""
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    # --- the database --------------------------------------------------------------------------
    def prepare(self, vectors: Any, metric: Metric) -> Database:
        """As `TorchBackend.prepare`; for l1 also column-major (D, N) copies the l1 kernel reads."""
        database = super().prepare(vectors, metric)
        if database.metric is Metric.L1:
            from gpurag_torch.database import LOW

            database.row_data[ROWS_T] = database.vectors.T.contiguous()
            if LOW in database.row_data and not L1_ROW_MAJOR:
                database.row_data[LOW_T] = database.row_data.pop(LOW).T.contiguous()
            if self.low_precision and L1_HALF:
                import torch

                database.row_data[HALF_T] = database.vectors.to(torch.float16).T.contiguous()
                database.row_data[MAX_ABS] = database.vectors.abs().amax(dim=1)
            if self.l1_codes:  # every dimension (`required_keys` cannot tell them apart); used up to l1_codes.MAX_DIM
                from gpurag_torch import l1_codes

                database.row_data.update(l1_codes.row_data(database.vectors))
        return database

    def required_keys(self, metric: Metric) -> set[str]:
        """As the torch backend's; l1 holds column-major copies instead of bf16 rows."""
        keys = super().required_keys(metric)
        if metric is Metric.L1:
            from gpurag_torch.database import LOW

            keys.add(ROWS_T)
            if LOW in keys and not L1_ROW_MAJOR:
                keys.discard(LOW)
                keys.add(LOW_T)
            if self.low_precision and L1_HALF:
                keys |= {HALF_T, MAX_ABS}
            if self.l1_codes:
                from gpurag_torch import l1_codes

                keys |= {l1_codes.CODES_T, l1_codes.CODE_ERROR, l1_codes.CODE_SCALE}
        return keys

    def _codes_kept(self, dim: int) -> bool:
        from gpurag_torch import l1_codes

        return self.l1_codes and l1_codes.takes(dim)

    def _codes_fit(self, n_queries: int, database: Database) -> bool:
        """Whether an l1 search of ``n_queries`` queries shortlists from the byte codes (`L1_CODES`)."""
        from gpurag_torch import l1_codes

        return (
            database.metric is Metric.L1
            and self.use_finish
            and n_queries >= self.l1_codes_min_queries
            and self._codes_kept(database.dim)
            and l1_codes.CODES_T in database.row_data
        )

    # --- distances and selection ---------------------------------------------------------------
    def boundaries(self, metric: Metric, queries: int, dim: int) -> Boundaries:
        """Where the scan kernels split a search of ``queries`` queries, from the launch configuration itself.

        Rows: one ``BLOCK_N`` block, the row count from which the rows split across the most
        programs, and (bf16 shortlist) the first row count whose splits keep more keys than
        `SHORTLIST_MIN`, so the shortlist is cut. Queries: each count past which the kernel, its
        query tile or its precision changes, and each query tile (``BLOCK_Q``).
        """
        import triton

        from gpurag_triton import launch

        l1 = metric is Metric.L1

        def layout(n_queries: int, n_rows: int) -> tuple[int, int, int, bool, str]:
            """(BLOCK_Q, BLOCK_N, splits, tensor-core tiles, precision of the scan) of one launch."""
            if l1 and self._codes_kept(dim) and self.use_finish and n_queries >= self.l1_codes_min_queries:
                c0 = launch.choose_l1_config(n_queries, n_rows, device=self.torch_device, codes=True)
                return c0.block_q, c0.block_n, c0.splits, False, "codes"
            half = l1 and self.low_precision and L1_HALF and n_queries > L1_LOW_MAX_QUERIES
            low = self.low_precision and (not l1 or n_queries <= L1_LOW_MAX_QUERIES or half)
            if l1 and not (low and L1_ROW_MAJOR):
                c1 = launch.choose_l1_config(n_queries, n_rows, device=self.torch_device, half=half)
                return c1.block_q, c1.block_n, c1.splits, False, "float16" if half else "bf16" if low else "float32"
            c = launch.choose_scan_config(n_queries, n_rows, dim, l1=l1, low=low, device=self.torch_device)
            return c.block_q, c.block_n, c.splits, c.use_dot, "bf16" if low else "float32"

        def first_rows(holds: Any) -> int:  # the smallest row count for which holds(rows), by bisection
            low_n, high_n = 1, 1 << 24
            if not holds(high_n):
                return 0
            while low_n < high_n:
                mid = (low_n + high_n) // 2
                low_n, high_n = (low_n, mid) if holds(mid) else (mid + 1, high_n)
            return low_n

        block_q, block_n, most_splits, _, precision = layout(queries, 1 << 24)
        low = precision != "float32"
        rows = {block_n, first_rows(lambda n: layout(queries, n)[2] >= most_splits) - 1}
        if low:

            def kept(n: int) -> int:
                splits = layout(queries, n)[2]
                per_split = int(triton.cdiv(triton.cdiv(n, splits), block_n)) * block_n
                full, rest = divmod(n, per_split)
                return full * min(BOUNDARY_KP, per_split) + min(BOUNDARY_KP, rest)

            rows.add(first_rows(lambda n: kept(n) > SHORTLIST_MIN) - 1)
        query_bounds = {block_q}
        previous = layout(1, 1 << 24)
        for n_queries in range(2, BOUNDARY_QUERY_PROBE + 1):
            current = layout(n_queries, 1 << 24)
            if (current[0], current[1], current[3], current[4]) != (previous[0], previous[1], previous[3], previous[4]):
                query_bounds |= {n_queries - 1, current[0]}
            previous = current
        return Boundaries(
            rows=tuple(sorted(r for r in rows if r > 0)), queries=tuple(sorted(q for q in query_bounds if q > 1))
        )

    def working_scores(self, queries: int, rows: int) -> int:
        """The kernels keep no score matrix: a few tiles' worth, whatever the block."""
        return min(queries * rows, 1 << 20)

    def topk(self, queries: Any, database: Database, k: int) -> TopK:
        """The ``k`` best rows of ``database`` for each query, best first (see `TorchBackend.topk`).

        The kernels rank; the rows returned are scored again directly in float32; a bf16 ranking
        is trusted only where its certificate holds.
        """
        import torch

        database, q, k = self._topk_inputs(queries, database, k)
        if k > KERNEL_MAX_K:
            return super().topk(q, database, k)
        metric = database.metric
        low = self.low_precision and (
            metric is not Metric.L1
            or q.shape[0] <= L1_LOW_MAX_QUERIES
            or self._codes_fit(q.shape[0], database)
            or self._half_fits(q, database)
        )
        self.queries_searched += q.shape[0]
        if self._graphable(q, database):
            scores, rows, certified, overflow, good = self._graphs.run(self, q, database, k, low)
        else:
            scores, rows, certified, overflow, good = self.device_topk(q, database, k, low)
        if bool(good):  # the one synchronisation of a search that needed nothing else
            return TopK(scores, rows)
        if bool(overflow):
            return self.float64_topk(q, database, k)
        assert certified is not None
        redo = torch.nonzero(~certified)[:, 0]
        self.queries_rescanned += int(redo.numel())
        redo_scores, redo_rows, _ = self._scan(q[redo], database, k, low=False)
        scores[redo], rows[redo] = redo_scores, redo_rows
        return TopK(scores, rows)

    def _half_fits(self, q: torch.Tensor, database: Database) -> bool:
        """Whether an l1 search of many queries shortlists in float16 (the finish kernel holds its bound).

        Whether every element lies within `L1_HALF_REACH` is checked on the device: where one does not,
        no query is certified and all are scanned again in float32 (`_scan_finished`)."""
        return L1_HALF and self.use_finish and HALF_T in database.row_data

    def host_topk(self, queries: Any, database: Database, k: int, *, dim: int | None = None) -> TopK:
        """As `DistanceBackend.host_topk`; a few float32 queries already on this GPU cost one graph replay
        and one synchronisation, their finiteness checked by the search itself (`graphs.GraphCache.run_to_host`)."""
        import torch

        q = queries
        if isinstance(q, np.ndarray) and self._host_graph_shape(q.shape, database):
            q = self.asarray(q, "queries", dim=dim)  # checked on the host, copied up once
        fast = (
            self.use_host_graphs
            and isinstance(q, torch.Tensor)
            and q.device == self.torch_device
            and q.dtype == torch.float32
            and q.ndim == 2
            and q.shape[1] == database.dim
            and (dim is None or dim == database.dim)
            and not isinstance(k, bool)
            and isinstance(k, int)
            and 1 <= k <= min(database.count, KERNEL_MAX_K)
            and self._graphable(q, database)
        )
        if fast:
            database = self._own(database)
            low = self.low_precision and (database.metric is not Metric.L1 or q.shape[0] <= L1_LOW_MAX_QUERIES)
            found = self._graphs.run_to_host(self, q.detach(), database, k, low)
            if found is not None:
                self.queries_searched += q.shape[0]
                return found
        return super().host_topk(q, database, k, dim=dim)

    def _host_graph_shape(self, shape: tuple[int, ...], database: Database) -> bool:
        return (
            self.use_host_graphs
            and self.use_graphs
            and self.torch_device.type == "cuda"
            and len(shape) == 2
            and 1 <= shape[0] <= GRAPH_MAX_QUERIES
            and database.count >= GRAPH_MIN_ROWS
        )

    def _graphable(self, q: torch.Tensor, database: Database) -> bool:
        """Whether this search replays a captured CUDA graph (few queries, many rows, on CUDA)."""
        return self.use_graphs and q.is_cuda and q.shape[0] <= GRAPH_MAX_QUERIES and database.count >= GRAPH_MIN_ROWS

    def device_topk(
        self, q: torch.Tensor, database: Database, k: int, low: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """One search without any synchronisation: (scores, rows, certified (Q,) or None, overflow, good).

        ``overflow`` (0-d bool) says float32 terms may overflow (the answer must come from
        `float64_topk`); ``good`` (0-d bool) that neither that nor any failed certificate happened,
        so (scores, rows) is the answer. Captured whole in a CUDA graph for small searches.
        """
        if low and self.use_finish:
            done = self._scan_finished(q, database, k)
            return done.scores, done.rows, done.certified, done.flags[1] > 0, done.flags[0] == 0
        overflow = self.overflow_flag(q, database)
        scores, rows, certified = self._scan(q, database, k, low=low)
        good = ~overflow if certified is None else certified.all() & ~overflow
        return scores, rows, certified, overflow, good

    @staticmethod
    def _l1_scan(query_in: torch.Tensor, database: Database, kp: int, *, low: bool) -> Any:
        import torch

        from gpurag_torch.database import LOW
        from gpurag_triton import launch
        from gpurag_triton.kernels.scan import L1

        if low and L1_ROW_MAJOR:
            return launch.scan_topk(query_in, database.row_data[LOW], None, int(L1), kp)
        if query_in.dtype == torch.float16:
            return launch.l1_scan(query_in.T.contiguous(), database.row_data[HALF_T], kp)
        # bf16 rows: the bf16-rounded queries widened back to float32 (exactly), so the loop converts rows only.
        return launch.l1_scan(query_in.float().T.contiguous(), database.row_data[LOW_T if low else ROWS_T], kp)

    def _seeded(self, q: torch.Tensor, database: Database) -> bool:
        return (
            self.use_seed
            and database.metric is not Metric.L1
            and q.shape[0] >= SEED_MIN_QUERIES
            and database.count >= SEED_MIN_ROWS
        )

    def packed_topk(self, q: torch.Tensor, database: Database, k: int, low: bool) -> torch.Tensor | None:
        """The search as one int32 buffer (Q·k scores' bits, Q·k rows, queries not answered, queries that may
        overflow), without synchronising; None where the search has no such form (float32 scans, finish off)."""
        if not (low and self.use_finish and self.packed_finish):
            return None
        done = self._scan_finished(q, database, k, packed=True)
        return done.packed  # type: ignore[no-any-return]

    def _scan_finished(self, q: torch.Tensor, database: Database, k: int, *, packed: bool = False) -> Any:
        """The bf16 scan's shortlist re-scored, ordered and certified by one kernel (`kernels.finish`)."""
        import torch

        from gpurag_torch.database import L1_NORMS, NORMS
        from gpurag_triton import launch

        metric = database.metric
        kp = launch._pow2(max(k, 16 if not launch.interpreting() else k))
        codes = self._codes_fit(q.shape[0], database)
        if codes:
            from gpurag_torch import l1_codes

            words, query_error = l1_codes.encode(q, database.row_data[l1_codes.CODE_SCALE][0])
            query_in = words
        else:
            code, query_in, rows_in, extra = self._scan_inputs(q, database, low=True)
        floor = None
        if codes:
            code_config = launch.choose_l1_config(q.shape[0], database.count, device=q.device, codes=True)
            if not launch.interpreting():  # enough kept keys for the shortlist: few splits keep more each
                n_splits = launch.split_rows(database.count, code_config.splits, code_config.block_n)[1]
                kp = max(kp, min(launch.MAX_KP, launch._pow2(-(-L1_CODES_SHORTLIST // n_splits))))
            scan = launch.l1_scan(words.T.contiguous(), database.row_data[l1_codes.CODES_T], kp, code_config)
        elif metric is Metric.L1:
            scan = self._l1_scan(query_in, database, kp, low=True)
        elif self._seeded(q, database):
            stride = SEED_SAMPLE_STRIDE
            sample_extra = None if extra is None else extra[::stride].contiguous()
            sample_rows = rows_in[::stride]
            config = launch.choose_scan_config(
                q.shape[0], sample_rows.shape[0], database.dim,
                l1=False, low=rows_in.dtype == torch.bfloat16, device=rows_in.device,
            )  # fmt: skip
            splits = launch.split_rows(sample_rows.shape[0], config.splits, config.block_n)[1]
            sample_kp = SEED_SAMPLE_KP  # few splits: each keeps enough keys for the rank
            if splits * sample_kp < SEED_SAMPLE_RANK:
                sample_kp = min(launch._pow2(-(-SEED_SAMPLE_RANK // splits)), launch.MAX_KP)
            sample = launch.scan_topk(query_in, sample_rows, sample_extra, code, sample_kp, config=config)
            sampled = sample.keys.reshape(q.shape[0], -1)
            floor = self._kth_keys(sampled, min(SEED_SAMPLE_RANK, sampled.shape[1]))[1]
            scan = launch.scan_topk(query_in, rows_in, extra, code, kp, tau=launch.decode(floor)[0])
        else:
            scan = launch.scan_topk(query_in, rows_in, extra, code, kp)
        n_queries, splits, _ = scan.keys.shape
        keep = min(scan.kept_per_query(database.count), max(2 * k, L1_CODES_SHORTLIST if codes else SHORTLIST_MIN))
        groups = launch.merged_groups(splits, keep // kp) if keep >= kp else 0
        # The codes' certificate needs most of the shortlist: where whole groups of splits would keep far fewer
        # keys (33 splits in groups of 2 keep 272 of 512), the keys are cut by torch.topk instead.
        if self.merge_groups and splits * kp > keep >= kp and (not codes or 4 * groups * kp >= 3 * keep):
            # Groups of splits keep their kp best each (one kernel), with a cutoff bounding the rest.
            # The groups' cutoffs stay apart (the finish kernel takes their largest itself), except for the
            # codes' bound, which is taken per query.
            keys, cutoff = launch.merge_groups(scan.keys, keep // kp, reduce=codes)
        else:
            keys = scan.keys.reshape(n_queries, splits * kp)
            # Keys order as their scores do: the worst kept key of each split bounds every row it left out
            # (and the floor every row scoring at most it).
            cutoff = scan.keys.min(dim=2).values.max(dim=1).values
            if keys.shape[1] > keep:
                keys, worst = self._kth_keys(keys, keep)
                cutoff = torch.maximum(cutoff, worst)
        if floor is not None:
            cutoff = torch.maximum(cutoff, floor if cutoff.ndim == 1 else floor[:, None])
        if codes:  # the cutoff as the codes' lower bound on the l1 of every row left out
            cutoff = l1_codes.lower_bound_cutoff(cutoff, query_error, database.row_data)
        if query_in.dtype == torch.float16:  # an element beyond the float16 reach voids every certificate
            reach = torch.maximum(q.abs().amax(), database.row_data[MAX_ABS].amax())
            cutoff = torch.where(reach <= L1_HALF_REACH, cutoff, _infinite_key().to(cutoff.device))
        norms = database.row_data[L1_NORMS if metric is Metric.L1 else NORMS]
        metric_code = {Metric.DOT: 0, Metric.L2: 1, Metric.L1: 2, Metric.COSINE: 3}[metric]
        return launch.finish(
            q, database.vectors, keys, cutoff, norms.max(), norms if metric is Metric.COSINE else None, k,
            metric_code, finish_bounds(metric, database.dim, half=query_in.dtype == torch.float16, codes=codes),
            self.finish_split_below, packed,
        )  # fmt: skip

    def _kth_keys(self, keys: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's ``count`` largest keys (in no order unless `sort_shortlist`) and the smallest of them."""
        import torch

        if self.sort_shortlist:
            top = torch.topk(keys, count, dim=1).values
            return top, top[:, -1]
        top = torch.topk(keys, count, dim=1, sorted=False).values  # the finish kernel orders them itself
        return top, top.min(dim=1).values

    def _scan_inputs(
        self, q: torch.Tensor, database: Database, *, low: bool
    ) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(metric code, queries, rows, extra) as the scan kernels read them."""
        import torch

        from gpurag_torch.database import LOW, NORMS, SQ_NORMS, normalised
        from gpurag_triton import launch
        from gpurag_triton.kernels.scan import DOT, L1, L2, SCALED_DOT

        metric = database.metric
        extra = None
        # Few queries: no launch of their own to round them (the scan rounds float32 queries to bf16 as
        # it loads them), and cosine's unit queries by one kernel.
        few = self.few_query_inputs and q.shape[0] <= GRAPH_MAX_QUERIES
        if metric is Metric.COSINE:
            if low and few:
                return int(DOT), launch.unit_queries(q), database.row_data[LOW], None
            unit = normalised(q, torch.linalg.vector_norm(q, dim=1))
            if low:
                return int(DOT), unit.to(torch.bfloat16), database.row_data[LOW], None
            norms = database.row_data[NORMS]
            extra = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
            return int(SCALED_DOT), unit, database.vectors, extra
        code = {Metric.DOT: DOT, Metric.L2: L2, Metric.L1: L1}[metric]
        if low and metric is Metric.L1 and q.shape[0] > L1_LOW_MAX_QUERIES:
            return int(code), q.to(torch.float16), database.row_data[HALF_T], None
        query_in = q.to(torch.bfloat16) if low and not (few and metric is not Metric.L1) else q
        rows_in = database.row_data[LOW] if low and metric is not Metric.L1 else database.vectors
        if metric is Metric.L2:
            extra = database.row_data[SQ_NORMS]
        return int(code), query_in, rows_in, extra

    def _scan(
        self, q: torch.Tensor, database: Database, k: int, *, low: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        import torch

        from gpurag_torch import exact, search
        from gpurag_torch.database import NORMS
        from gpurag_triton import launch

        metric = database.metric
        code, query_in, rows_in, extra = self._scan_inputs(q, database, low=low)
        kp = launch._pow2(max(k, 16 if not launch.interpreting() else k))
        if metric is Metric.L1:
            scan = self._l1_scan(query_in, database, kp, low=low)
        else:
            scan = launch.scan_topk(query_in, rows_in, extra, code, kp)
        n_queries, splits, _ = scan.keys.shape
        approx, rows = launch.decode(scan.keys.reshape(n_queries, splits * kp))
        # The worst kept key of each split bounds every row that split left out.
        cutoff = approx.reshape(n_queries, splits, kp).min(dim=2).values.max(dim=1).values
        keep = min(scan.kept_per_query(database.count), max(2 * k, SHORTLIST_MIN) if low else k)
        if approx.shape[1] > keep:
            top = torch.topk(approx, keep, dim=1)
            cutoff = torch.maximum(cutoff, top.values[:, -1])
            rows = torch.gather(rows, 1, top.indices)
        # Padding keys (row -1 - slot) are kept only where scores are NaN (float32 overflow, answered
        # in float64 by the caller): keep the re-scoring's reads in bounds.
        rows = rows.clamp(0, database.count - 1)
        if low:
            return search.rescore_and_certify(q, database, rows, cutoff, k, rounded_output=False, scorer=direct_scores)
        scores = direct_scores(q, database.vectors, rows, metric, database.row_data.get(NORMS))
        scores, rows = exact.best_first(scores, rows, k, metric)
        return scores, rows, None

    # --- LSH primitives ------------------------------------------------------------------------
    def hamming_topk(self, codes: Any, database_codes: Any, k: int) -> TopK:
        """The ``k`` database codes nearest each code, nearest first (ties by row), by counting kernels, any k."""
        from gpurag_torch import lsh
        from gpurag_triton.candidates import nearest_codes

        a = self._codes(codes, "codes").contiguous()
        b = self._codes(database_codes, "database_codes").contiguous()
        lsh.check_codes(a, b, k)
        return nearest_codes(a, b, int(k))

    def hamming_candidates(self, codes: Any, database_codes: Any, count: int) -> Any:
        """The ``count`` nearest rows of each code, (Q, count) int64, in no promised order (for re-ranking)."""
        from gpurag_torch import lsh
        from gpurag_triton.candidates import nearest_codes

        a = self._codes(codes, "codes").contiguous()
        b = self._codes(database_codes, "database_codes").contiguous()
        lsh.check_codes(a, b, count)
        return nearest_codes(a, b, int(count), ordered=False).indices

    def rerank(self, queries: Any, database: Database, candidates: Any, k: int) -> TopK:
        """The ``k`` best candidate rows of each query, scored in float32 by the rescore kernel (rows read in place)."""
        from gpurag.rerank import best_k
        from gpurag_torch.database import NORMS

        database = self._own(database)
        q = self._tensor(queries, "queries")
        rows = self._as_result(candidates)
        scores = direct_scores(q, database.vectors, rows, database.metric, database.row_data.get(NORMS))
        return best_k(scores, rows, k, database.metric.higher_is_better)

    def lsh_topk(
        self, hashed: Any, queries: Any, planes: Any, codes: Any, database: Database, n_candidates: int, k: int
    ) -> TopK:
        """The LSH stages as one captured CUDA graph for up to `lsh_graphs.GRAPH_MAX_QUERIES` host queries on CUDA.

        The queries' codes come from the host (see `lsh_graphs.host_sign_codes`), so a code bit whose
        float64 projection rounds to the other side of zero there may differ from `sign_codes`'. With
        `lsh_graphs.HOST_OUTPUT` the graph's answer comes back as host (CPU) tensors.
        """
        import torch

        from gpurag_torch.database import NORMS
        from gpurag_triton import candidates, launch, lsh_fused, lsh_graphs

        small = isinstance(hashed, np.ndarray) and isinstance(queries, np.ndarray)
        small = small and 0 < hashed.shape[0] <= lsh_graphs.GRAPH_MAX_QUERIES and self.use_graphs
        on_gpu = self.torch_device.type == "cuda" and not launch.interpreting()
        if on_gpu and not small and self.use_graphs and lsh_fused.usable(k, int(hashed.shape[0])):
            try:
                return self._fused_lsh_topk(hashed, queries, planes, codes, database, n_candidates, k)
            except lsh_fused.build_errors() as exc:  # not buildable here: the torch-selected stages from now on
                lsh_fused.BROKEN.append(f"{type(exc).__name__}: {exc}")
        if not small or not on_gpu:
            return super().lsh_topk(hashed, queries, planes, codes, database, n_candidates, k)
        database = self._own(database)
        planes, codes = self._tensor(planes, "planes"), self._codes(codes, "database_codes")
        if self._lsh_graphs is None:
            self._lsh_graphs = lsh_graphs.LSHGraphs(self.torch_device)
        runner: lsh_graphs.LSHGraphs = self._lsh_graphs
        if self._host_planes is None or self._host_planes[0] is not planes:
            self._host_planes = (planes, planes.double().cpu().numpy())
        # The few queries' codes are made on the host (a small float64 product): a dozen kernels fewer.
        query_codes = lsh_graphs.host_sign_codes(np.asarray(hashed, np.float64), self._host_planes[1])
        width = query_codes.shape[1]

        n_queries = int(hashed.shape[0])
        fused = lsh_fused.usable(k, n_queries)
        if fused:
            sampled = lsh_fused.SAMPLED and n_queries >= lsh_fused.SAMPLED_MIN_QUERIES
        else:
            sampled = candidates.takes_sampled(n_queries, int(codes.shape[0]), n_candidates)

        def stages(words_in: torch.Tensor, queries_in: torch.Tensor) -> tuple[TopK, torch.Tensor | None]:
            # Device tensors checked on the host already: no `asarray` (its finiteness check syncs).
            query_codes_in = words_in.view(torch.uint8)[:, :width].contiguous()
            if fused:  # every selection a Triton kernel: about six launches in all
                failed = None
                if sampled:
                    near_rows, failed = lsh_fused.nearest_rows(query_codes_in, codes, n_candidates)
                else:
                    near_rows = candidates.nearest_codes(query_codes_in, codes, n_candidates, ordered=False,
                                                    sampled=False).indices  # fmt: skip
                norms = database.row_data.get(NORMS)
                return lsh_fused.rerank_best(queries_in, database.vectors, near_rows, k, database.metric, norms), failed
            if sampled:  # no sync inside the graph: whether the sample's limit held is read after the replay
                near, failed = candidates.sampled_nearest(query_codes_in, codes, n_candidates, ordered=False)
                return self.rerank(queries_in, database, near.indices, k), failed
            rows = candidates.nearest_codes(query_codes_in, codes, n_candidates, ordered=False, sampled=False)
            return self.rerank(queries_in, database, rows.indices, k), None

        words = lsh_graphs.as_float_words(query_codes)
        key = (*lsh_graphs.graph_key(words, queries, planes, codes, database, n_candidates, k), sampled, fused)
        try:
            top, failed = runner.run(stages, words, np.ascontiguousarray(queries, np.float32), key)
        except lsh_fused.build_errors() as exc:
            if not fused:
                raise
            lsh_fused.BROKEN.append(f"{type(exc).__name__}: {exc}")  # the torch-selected graph from now on
            return self.lsh_topk(hashed, queries, planes, codes, database, n_candidates, k)
        if failed:  # some query had fewer or more rows within its limit than the sample promised: count instead
            return super().lsh_topk(hashed, queries, planes, codes, database, n_candidates, k)
        return top

    def _fused_lsh_topk(
        self, hashed: Any, queries: Any, planes: Any, codes: Any, database: Database, n_candidates: int, k: int
    ) -> TopK:
        """`lsh_topk` of many queries by `lsh_fused`'s kernels, one sync (whether any query's limit failed:
        then the stages of `DistanceBackend.lsh_topk` answer)."""
        from gpurag_torch.database import NORMS
        from gpurag_triton import lsh_fused

        database = self._own(database)
        query_codes = self.sign_codes(self.asarray(hashed, "hashed queries"), planes)
        rows, failed = lsh_fused.nearest_rows(query_codes, self._codes(codes, "database_codes"), n_candidates)
        if bool(failed.any()):
            return super().lsh_topk(hashed, queries, planes, codes, database, n_candidates, k)
        q = self._tensor(queries, "queries")
        return lsh_fused.rerank_best(q, database.vectors, rows, k, database.metric, database.row_data.get(NORMS))

    def fused_hamming_topk(self, codes: Any, database_codes: Any, k: int) -> TopK:
        """`hamming_topk` by the fused top-KP kernel (k <= 256; kept to compare against the counting kernels)."""
        import torch

        from gpurag_torch import lsh
        from gpurag_triton import launch

        a = self._codes(codes, "codes").contiguous()
        b = self._codes(database_codes, "database_codes").contiguous()
        lsh.check_codes(a, b, k)
        if k > KERNEL_MAX_K:
            return super().hamming_topk(a, b, k)
        kp = launch._pow2(k)
        keys = launch.hamming_topk(a, b, kp).keys
        n_queries = keys.shape[0]
        scores, rows = launch.decode(keys.reshape(n_queries, -1))
        top = torch.topk(scores, k, dim=1)  # valid entries (distance >= 0) outrank the -inf padding
        distances = (-top.values).to(torch.int32)
        return TopK(distances, torch.gather(rows, 1, top.indices))


def finish_bounds(metric: Metric, dim: int, *, half: bool = False, codes: bool = False) -> Any:
    """`launch.Bounds` of ``metric`` at ``dim``: the factors of `gpurag_torch.exact`'s bounds that depend on D only.

    ``half``: l1's float16 shortlist (`half_l1_bounds`) rather than the bf16 one. ``codes``: l1's byte-code
    shortlist, whose cutoff is already a bound on the true l1 of every row left out (no error term).
    """
    from gpurag_torch import exact
    from gpurag_torch.backend import FLOAT32_SAFE_REACH
    from gpurag_triton import launch

    floor = dim * exact.UNDERFLOW
    if metric is Metric.L1 and codes:
        return launch.Bounds(0.0, 0.0, 0.0, 4 * (dim + 4) * exact.U32, FLOAT32_SAFE_REACH)
    if metric is Metric.L1 and half:
        rel, half_floor = half_l1_bounds(dim, launch.L1_HALF_CHUNK)
        floor += half_floor
    elif metric is Metric.L1:
        rel = exact.bf16_l1_relative_error(dim, rounded_output=False)
    else:
        rel = exact.bf16_relative_error(dim, rounded_output=False)
    unit = 1.0 + 8 * (dim + 4) * exact.U32
    cosine_error = rel * unit * unit + 8 * (dim + 4) * exact.U32 + floor
    return launch.Bounds(rel, floor, cosine_error, 4 * (dim + 4) * exact.U32, FLOAT32_SAFE_REACH)


#: float16 unit roundoff (11-bit significand), and half the spacing of its subnormals (the absolute rounding
#: error of any result below 2⁻¹⁴).
U_HALF = 2.0**-11
HALF_TINY = 2.0**-25


def half_l1_bounds(dim: int, chunk: int) -> tuple[float, float]:
    """(rel, floor): ``|ŝ - s| <= rel (Σ|q| + Σ|x|) + floor`` for the float16 l1 scan (`kernels.l1`'s float16 path).

    Per dimension with u = 2⁻¹¹ and elements within `L1_HALF_REACH` (no overflow): rounding q and x to
    float16 moves ``|q - x|`` by at most ``u (|q| + |x|)``, the rounded difference adds ``u |q̂ - x̂|``; a
    chunk of C such terms summed in float16 adds ``γ(C-1)`` of their sum; the float32 sum of ⌈D / C⌉
    chunk sums adds ``(⌈D / C⌉ + 2) 2⁻²³`` of the total. Each of the (at most four) float16 roundings per
    dimension that lands among the subnormals errs by up to 2⁻²⁵ absolutely: the floor. Both doubled.
    """
    from gpurag_torch import exact

    inputs = U_HALF
    grown = 1 + inputs
    difference = U_HALF * grown
    chunks = (chunk - 1) * U_HALF / (1 - (chunk - 1) * U_HALF) * grown * (1 + U_HALF)
    accumulation = (-(-dim // chunk) + 2) * 2 * exact.U32 * grown * (1 + chunks + U_HALF)
    rel = 2 * exact.BOUND_MARGIN * (inputs + difference + chunks + accumulation)
    floor = 2 * exact.BOUND_MARGIN * 4 * dim * HALF_TINY
    return rel, floor


def direct_scores(
    queries: torch.Tensor, vectors: torch.Tensor, rows: torch.Tensor, metric: Metric, row_norms: torch.Tensor | None
) -> torch.Tensor:
    """As `gpurag_torch.exact.direct_scores`, by the re-scoring kernel: rows read in place, no (Q, M, D) copy."""
    import torch

    from gpurag_torch import exact
    from gpurag_triton import launch

    if launch.interpreting():  # the interpreter runs a program at a time: torch's gather is far quicker there
        return exact.direct_scores(queries, vectors, rows, metric, row_norms)
    term = {Metric.L2: 0, Metric.L1: 1, Metric.DOT: 2, Metric.COSINE: 2}[metric]
    sums = launch.rescore(queries, vectors, rows, term)
    if metric is not Metric.COSINE:
        return sums
    assert row_norms is not None
    denominator = row_norms[rows] * torch.linalg.vector_norm(queries, dim=1)[:, None]
    return torch.where(denominator > 0, sums / torch.where(denominator > 0, denominator, 1.0), 0.0)
