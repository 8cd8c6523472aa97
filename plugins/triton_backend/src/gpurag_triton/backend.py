"""The Triton distance backend: fused distance + selection kernels on CUDA (or the CPU interpreter).

It shares the torch backend's database, conversions, re-scoring and certificate (`gpurag_torch`);
what differs is the scan: `kernels.scan` scores and selects on chip, so no Q x N tile reaches memory.
l2 / dot / cosine (and l1 for small Q, where it is bandwidth-bound) shortlist from bf16 rows; the
shortlist is certified per query and uncertified queries are scanned again in float32.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from gpurag.backend import Availability, Boundaries, Database
from gpurag.errors import BackendUnavailableError, InvalidInputError
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
#: Largest Q for which l1 also shortlists in bf16 (above it l1 is compute-bound and stays float32).
L1_LOW_MAX_QUERIES = 16
#: Keys each (query, split) keeps for the k the conformance kit asks (k <= 16): the shortlist
#: boundary is declared where the splits' kept keys first outnumber `SHORTLIST_MIN`.
BOUNDARY_KP = 16
#: Query counts probed for a change of kernel or tile (`launch.choose_scan_config` switches at 16 and 512).
BOUNDARY_QUERY_PROBE = 1024


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
        if self.torch_device.type == "cpu" and not _interpreting():
            raise BackendUnavailableError(
                f"backend {self.name!r} runs on the CPU only under TRITON_INTERPRET=1 (set before triton is imported)"
            )
        #: Whether small LSH searches run as captured CUDA graphs (`lsh_topk`); off only to compare.
        self.use_graphs = True
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
            if LOW in database.row_data:
                database.row_data[LOW_T] = database.row_data.pop(LOW).T.contiguous()
        return database

    def required_keys(self, metric: Metric) -> set[str]:
        """As the torch backend's; l1 holds column-major copies instead of bf16 rows."""
        keys = super().required_keys(metric)
        if metric is Metric.L1:
            from gpurag_torch.database import LOW

            keys.add(ROWS_T)
            if LOW in keys:
                keys.discard(LOW)
                keys.add(LOW_T)
        return keys

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

        def layout(n_queries: int, n_rows: int) -> tuple[int, int, int, bool, bool]:
            """(BLOCK_Q, BLOCK_N, splits, tensor-core tiles, bf16 shortlist) of one launch."""
            low = self.low_precision and (not l1 or n_queries <= L1_LOW_MAX_QUERIES)
            if l1:
                c1 = launch.choose_l1_config(n_queries, n_rows, device=self.torch_device)
                return c1.block_q, c1.block_n, c1.splits, False, low
            c = launch.choose_scan_config(n_queries, n_rows, dim, l1=False, low=low, device=self.torch_device)
            return c.block_q, c.block_n, c.splits, c.use_dot, low

        def first_rows(holds: Any) -> int:  # the smallest row count for which holds(rows), by bisection
            low_n, high_n = 1, 1 << 24
            if not holds(high_n):
                return 0
            while low_n < high_n:
                mid = (low_n + high_n) // 2
                low_n, high_n = (low_n, mid) if holds(mid) else (mid + 1, high_n)
            return low_n

        block_q, block_n, most_splits, _, low = layout(queries, 1 << 24)
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

        database = self._own(database)
        n_rows = database.count
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n_rows:
            raise InvalidInputError(f"k must be an integer in 1..{n_rows} (the database's rows); got {k!r}")
        k = int(k)
        q = self._tensor(queries, "queries")
        if q.shape[1] != database.dim:
            raise InvalidInputError(f"queries must be (Q, {database.dim}); got shape {tuple(q.shape)}")
        if k > KERNEL_MAX_K:
            return super().topk(q, database, k)
        if self.needs_float64(q, database):
            return self.float64_topk(q, database, k)
        metric = database.metric
        low = self.low_precision and (metric is not Metric.L1 or q.shape[0] <= L1_LOW_MAX_QUERIES)
        scores, rows, certified = self._scan(q, database, k, low=low)
        self.queries_searched += q.shape[0]
        if certified is not None and not bool(certified.all()):
            redo = torch.nonzero(~certified)[:, 0]
            self.queries_rescanned += int(redo.numel())
            redo_scores, redo_rows, _ = self._scan(q[redo], database, k, low=False)
            scores[redo], rows[redo] = redo_scores, redo_rows
        return TopK(scores, rows)

    def _scan(
        self, q: torch.Tensor, database: Database, k: int, *, low: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        import torch

        from gpurag_torch import exact, search
        from gpurag_torch.database import LOW, NORMS, SQ_NORMS, normalised
        from gpurag_triton import launch
        from gpurag_triton.kernels.scan import DOT, L1, L2, SCALED_DOT

        metric = database.metric
        extra = None
        if metric is Metric.COSINE:
            unit = normalised(q, torch.linalg.vector_norm(q, dim=1))
            if low:
                code, query_in, rows_in = DOT, unit.to(torch.bfloat16), database.row_data[LOW]
            else:
                norms = database.row_data[NORMS]
                code, query_in, rows_in = SCALED_DOT, unit, database.vectors
                extra = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
        else:
            code = {Metric.DOT: DOT, Metric.L2: L2, Metric.L1: L1}[metric]
            query_in = q.to(torch.bfloat16) if low else q
            rows_in = database.row_data[LOW] if low and metric is not Metric.L1 else database.vectors
            if metric is Metric.L2:
                extra = database.row_data[SQ_NORMS]
        kp = launch._pow2(max(k, 16 if not launch.interpreting() else k))
        if metric is Metric.L1:
            queries_t = query_in.T.contiguous()
            scan = launch.l1_scan(queries_t, database.row_data[LOW_T if low else ROWS_T], kp)
        else:
            scan = launch.scan_topk(query_in, rows_in, extra, int(code), kp)
        n_queries, splits, _ = scan.keys.shape
        approx, rows = launch.decode(scan.keys.reshape(n_queries, splits * kp))
        # The worst kept key of each split bounds every row that split left out.
        cutoff = approx.reshape(n_queries, splits, kp).min(dim=2).values.max(dim=1).values
        keep = min(scan.kept_per_query(database.count), max(2 * k, SHORTLIST_MIN) if low else k)
        if approx.shape[1] > keep:
            top = torch.topk(approx, keep, dim=1)
            cutoff = torch.maximum(cutoff, top.values[:, -1])
            rows = torch.gather(rows, 1, top.indices)
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
        """The LSH stages as one captured CUDA graph for up to `graphs.GRAPH_MAX_QUERIES` host queries on CUDA.

        The queries' codes come from the host (see `graphs.host_sign_codes`), so a code bit whose
        float64 projection rounds to the other side of zero there may differ from `sign_codes`'.
        """
        import torch

        from gpurag_triton import graphs, launch

        small = isinstance(hashed, np.ndarray) and isinstance(queries, np.ndarray)
        small = small and 0 < hashed.shape[0] <= graphs.GRAPH_MAX_QUERIES and self.use_graphs
        if not small or self.torch_device.type != "cuda" or launch.interpreting():
            return super().lsh_topk(hashed, queries, planes, codes, database, n_candidates, k)
        database = self._own(database)
        planes, codes = self._tensor(planes, "planes"), self._codes(codes, "database_codes")
        if self._lsh_graphs is None:
            self._lsh_graphs = graphs.LSHGraphs(self.torch_device)
        runner: graphs.LSHGraphs = self._lsh_graphs
        if self._host_planes is None or self._host_planes[0] is not planes:
            self._host_planes = (planes, planes.double().cpu().numpy())
        # The few queries' codes are made on the host (a small float64 product): a dozen kernels fewer.
        query_codes = graphs.host_sign_codes(np.asarray(hashed, np.float64), self._host_planes[1])
        width = query_codes.shape[1]

        def stages(words_in: torch.Tensor, queries_in: torch.Tensor) -> TopK:
            # Device tensors checked on the host already: no `asarray` (its finiteness check syncs).
            query_codes_in = words_in.view(torch.uint8)[:, :width].contiguous()
            candidates = self.hamming_candidates(query_codes_in, codes, n_candidates)
            return self.rerank(queries_in, database, candidates, k)

        words = graphs.as_float_words(query_codes)
        key = graphs.graph_key(words, queries, planes, codes, database, n_candidates, k)
        return runner.run(stages, words, np.ascontiguousarray(queries, np.float32), key)

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
