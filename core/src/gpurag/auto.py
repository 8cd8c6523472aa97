"""What ``get_backend("auto")`` follows on a GPU: a table of the last GPU report's measured speeds.

The table (``backend_table.json``, package data, written by ``benchmarks/gpu_report.py
--write-table``) ranks the backends it timed, fastest first, per device kind, metric and coarse query
bucket: ``1`` query, ``<=64``, and ``>64``. `ranking` turns it into an order to try: the measured
backends fastest first, then every other backend in the ``backend_preference`` setting's order (the
stated fallback for a backend the table names but this install lacks, or one it never timed).
Where the table has no rows for a bucket, the nearest measured bucket of that metric stands in, and
the reason says so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

from gpurag.errors import InvalidInputError
from gpurag.metrics import Metric
from gpurag.settings import get_settings

#: The coarse query buckets, smallest first.
BUCKETS: tuple[str, ...] = ("1", "<=64", ">64")
#: The table shipped with gpurag.
TABLE_FILE = "backend_table.json"


def query_bucket(n_queries: int) -> str:
    """The bucket of a search of ``n_queries`` queries: ``1``, ``<=64`` or ``>64``."""
    if n_queries <= 1:
        return "1"
    return "<=64" if n_queries <= 64 else ">64"


@dataclasses.dataclass(frozen=True)
class Measured:
    """One backend's median time (ms) over the report rows of one (device kind, metric, bucket)."""

    backend: str
    ms: float


@dataclasses.dataclass(frozen=True)
class BackendTable:
    """The measured rankings: ``(device kind, metric, bucket) -> backends fastest first``, and their source."""

    source: str
    rankings: dict[tuple[str, str, str], tuple[Measured, ...]]
    rows: dict[tuple[str, str, str], str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> BackendTable:
        """The table in ``data`` (as `to_json` writes it); a malformed one is an `InvalidInputError` naming where."""
        try:
            rankings: dict[tuple[str, str, str], tuple[Measured, ...]] = {}
            rows: dict[tuple[str, str, str], str] = {}
            for entry in data["entries"]:
                key = (str(entry["device"]), Metric.parse(entry["metric"]).value, str(entry["queries"]))
                if key[2] not in BUCKETS:
                    raise ValueError(f"queries must be one of {', '.join(BUCKETS)}; got {key[2]!r}")
                ranked = tuple(Measured(str(m["backend"]), float(m["ms"])) for m in entry["ranking"])
                rankings[key] = tuple(sorted(ranked, key=lambda m: m.ms))
                rows[key] = str(entry.get("rows", ""))
            return cls(source=str(data.get("source", "")), rankings=rankings, rows=rows)
        except (KeyError, TypeError, ValueError, InvalidInputError) as exc:
            raise InvalidInputError(f"backend table {where} is malformed: {type(exc).__name__}: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        """The table as JSON-ready data."""
        return {
            "source": self.source,
            "entries": [
                {
                    "device": device,
                    "metric": metric,
                    "queries": bucket,
                    "rows": self.rows.get((device, metric, bucket), ""),
                    "ranking": [{"backend": m.backend, "ms": m.ms} for m in ranked],
                }
                for (device, metric, bucket), ranked in sorted(self.rankings.items())
            ],
        }

    def lookup(self, device_kind: str, metric: Metric, n_queries: int) -> tuple[tuple[Measured, ...], str]:
        """The measured ranking for this search and which bucket it came from ('' when none was measured)."""
        wanted = query_bucket(n_queries)
        position = BUCKETS.index(wanted)
        # The bucket itself, then the nearest measured one (the smaller first on a tie).
        for bucket in sorted(BUCKETS, key=lambda b: (abs(BUCKETS.index(b) - position), BUCKETS.index(b))):
            ranked = self.rankings.get((device_kind, metric.value, bucket))
            if ranked:
                return ranked, bucket
        return (), ""


@functools.cache
def _load(path: str | None) -> BackendTable:
    if path is None:
        text = resources.files("gpurag").joinpath(TABLE_FILE).read_text()
        where = f"gpurag/{TABLE_FILE}"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise InvalidInputError(f"backend_table {path!r} cannot be read: {exc}") from exc
        where = path
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"backend table {where} is not JSON: {exc}") from exc
    return BackendTable.from_json(data, where)


def load_table() -> BackendTable:
    """The table named by the ``backend_table`` setting, or the one shipped with gpurag (cached per path)."""
    path = get_settings().backend_table
    return _load(None if path is None else str(path))


@dataclasses.dataclass(frozen=True)
class Ranking:
    """The order `auto` tries backends in for one search, and why."""

    order: tuple[str, ...]
    measured: tuple[Measured, ...]
    bucket: str
    wanted_bucket: str

    def reason(self, chosen: str) -> str:
        """Why ``chosen`` (the first of `order` that could run) was picked."""
        times = ", ".join(f"{m.backend} {m.ms:g} ms" for m in self.measured)
        where = f"Q {self.wanted_bucket}"
        if self.bucket and self.bucket != self.wanted_bucket:
            where += f" (no rows measured there; the Q {self.bucket} rows stand in)"
        names = [m.backend for m in self.measured]
        if chosen in names:
            skipped = names[: names.index(chosen)]
            faster = f"; faster but unavailable here: {', '.join(skipped)}" if skipped else ""
            return f"fastest available in the measured table for {where}: {times}{faster}"
        if names:
            return f"none of the measured backends ({times}) can run here; fallback order {', '.join(self.order)}"
        return f"no measurement for {where}; fallback order {', '.join(self.order)}"


def ranking(device_kind: str, metric: Metric | None, n_queries: int | None, fallback: tuple[str, ...]) -> Ranking:
    """The measured backends for this search, fastest first, followed by ``fallback`` (the stated order)."""
    queries = get_settings().auto_queries if n_queries is None else n_queries
    wanted = query_bucket(queries)
    if metric is None:
        return Ranking(tuple(dict.fromkeys(fallback)), (), "", wanted)
    measured, bucket = load_table().lookup(device_kind, metric, queries)
    order = tuple(dict.fromkeys([*(m.backend for m in measured), *fallback]))
    return Ranking(order, measured, bucket, wanted)


def table_from_report(results: list[dict[str, Any]], backends: list[str], source: str) -> BackendTable:
    """The table of a GPU report's rows (``benchmarks/gpu_report.py``'s JSON ``results``), for device kind ``cuda``.

    Each row names its scenario (``N=1M D=768 Q=1``), metric and each backend's median search time
    as ``<backend>_ms``. Per (metric, bucket) a backend's figure is the geometric mean of its times
    over the bucket's rows; a backend missing from any of those rows (an error, not installed) is
    left out of that ranking.
    """
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results:
        queries = int(str(row["scenario"]).split("Q=")[1].split()[0])
        grouped.setdefault((Metric.parse(row["metric"]).value, query_bucket(queries)), []).append(row)
    rankings: dict[tuple[str, str, str], tuple[Measured, ...]] = {}
    rows: dict[tuple[str, str, str], str] = {}
    for (metric, bucket), group in sorted(grouped.items()):
        measured = []
        for backend in backends:
            times = [float(r[f"{backend}_ms"]) for r in group if f"{backend}_ms" in r]
            if len(times) == len(group) and all(t > 0 for t in times):
                mean = 1.0
                for t in times:
                    mean *= t ** (1.0 / len(times))
                measured.append(Measured(backend, round(mean, 4)))
        if measured:
            key = ("cuda", metric, bucket)
            rankings[key] = tuple(sorted(measured, key=lambda m: m.ms))
            rows[key] = "; ".join(str(r["scenario"]) for r in group)
    return BackendTable(source=source, rankings=rankings, rows=rows)
