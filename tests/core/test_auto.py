"""`get_backend("auto")` on a GPU follows the measured table: per metric and query bucket, with a fallback order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from core_toys import ToyBackend, make_plugin

import gpurag
from gpurag import auto, plugins
from gpurag.backend import Availability
from gpurag.cli import cli
from gpurag.errors import InvalidInputError
from gpurag.metrics import Metric


class _Gpu(ToyBackend):
    device_kinds = ("cuda",)


class Swift(_Gpu):
    name = "swift"


class Steady(_Gpu):
    name = "steady"


class Sleepy(_Gpu):
    name = "sleepy"


class Absent(_Gpu):
    name = "absent"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(False, "its card is elsewhere")


def _table(entries: list[tuple[str, str, list[tuple[str, float]]]]) -> dict[str, Any]:
    return {
        "source": "a test",
        "entries": [
            {"device": "cuda", "metric": m, "queries": q, "ranking": [{"backend": b, "ms": ms} for b, ms in ranked]}
            for m, q, ranked in entries
        ],
    }


@pytest.fixture
def measured(fresh_plugins: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Four toy GPU backends, preferred in the order the table contradicts, and a table of their speeds."""

    def register_backends(register: Any) -> None:
        for cls in (Swift, Steady, Sleepy, Absent):
            register(cls, cls.name)

    plugins.register_plugin(make_plugin(register_backends=register_backends), "gpu-toys")
    table = _table(
        [
            ("dot", "1", [("steady", 0.9), ("swift", 0.5), ("sleepy", 3.0)]),  # listed out of order: ranked by ms
            ("dot", ">64", [("sleepy", 4.0), ("swift", 6.0)]),
            ("l2", "1", [("absent", 0.1), ("not-installed", 0.2), ("steady", 0.8), ("swift", 0.9)]),
            ("l1", "<=64", [("swift", 2.0), ("steady", 3.0)]),
        ]
    )
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    fresh_plugins.setenv("GPURAG_BACKEND_TABLE", str(path))
    fresh_plugins.setenv("GPURAG_BACKEND_PREFERENCE", json.dumps(["sleepy", "steady", "swift"]))
    gpurag.get_settings.cache_clear()
    return fresh_plugins


def test_query_buckets_are_one_up_to_64_and_more() -> None:
    assert [auto.query_bucket(q) for q in (1, 2, 64, 65, 4096)] == ["1", "<=64", "<=64", ">64", ">64"]


def test_auto_picks_the_fastest_measured_backend_per_metric_and_query_bucket(measured: pytest.MonkeyPatch) -> None:
    assert gpurag.get_backend("auto", device="cuda:0", metric="dot", queries=1).name == "swift"
    assert gpurag.get_backend("auto", device="cuda:0", metric="dot", queries=1000).name == "sleepy"
    assert gpurag.get_backend("auto", device="cuda", metric=Metric.L1, queries=16).name == "swift"
    assert gpurag.get_backend("auto", metric="dot", queries=1).name == "swift"  # no device named: the GPU table


def test_a_missing_bucket_takes_the_nearest_measured_one(measured: pytest.MonkeyPatch) -> None:
    backend, reason = plugins.auto_choice("cuda:0", metric="dot", queries=8)  # <=64 unmeasured for dot
    assert backend.name == "swift"  # the Q=1 rows stand in before the >64 ones
    assert "the Q 1 rows stand in" in reason
    assert plugins.auto_choice("cuda:0", metric="l1", queries=1)[0].name == "swift"  # from <=64


def test_unavailable_or_uninstalled_measured_backends_fall_to_the_next_measured(measured: pytest.MonkeyPatch) -> None:
    backend, reason = plugins.auto_choice("cuda:0", metric="l2", queries=1)
    assert backend.name == "steady"  # absent (unavailable) and not-installed are skipped, in measured order
    assert "faster but unavailable here: absent, not-installed" in reason


def test_without_a_measurement_the_preference_order_is_the_fallback(measured: pytest.MonkeyPatch) -> None:
    backend, reason = plugins.auto_choice("cuda:0", metric="cosine", queries=1)
    assert backend.name == "sleepy"  # first of backend_preference
    assert "no measurement" in reason
    assert "fallback order sleepy, steady, swift" in reason


def test_the_retrievers_default_pick_follows_the_table_for_the_assumed_query_count(
    measured: pytest.MonkeyPatch,
) -> None:
    measured.setenv("GPURAG_AUTO_QUERIES", "1")
    gpurag.get_settings.cache_clear()
    assert gpurag.ExactRetriever(metric="dot", device="cuda:0").backend.name == "swift"
    measured.setenv("GPURAG_AUTO_QUERIES", "512")
    gpurag.get_settings.cache_clear()
    assert gpurag.ExactRetriever(metric="dot", device="cuda:0").backend.name == "sleepy"


def test_gpurag_plugins_shows_what_auto_picks_and_why(measured: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines() if line.startswith("  dot ")]
    assert lines[0][:4] == ["dot", "Q", "1", "swift"]
    assert lines[2][:4] == ["dot", "Q", ">64", "sleepy"]
    assert "fastest available in the measured table for Q 1: swift 0.5 ms, steady 0.9 ms, sleepy 3 ms" in result.output
    report = json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).output)
    pick = next(p for p in report["auto"] if p["metric"] == "l2" and p["queries"] == "1")
    assert pick["backend"] == "steady"
    assert pick["device"] == "cuda:0"


def test_the_shipped_table_ranks_gpu_backends_for_every_metric() -> None:
    table = auto.BackendTable.from_json(
        json.loads((Path(auto.__file__).parent / auto.TABLE_FILE).read_text()), "shipped"
    )
    assert "gpu_report.py" in table.source
    for metric in Metric:
        ranked, bucket = table.lookup("cuda", metric, 1)
        assert ranked, f"no Q=1 ranking for {metric.value}"
        assert bucket == "1"
        assert [m.ms for m in ranked] == sorted(m.ms for m in ranked)
        assert table.lookup("cuda", metric, 1024)[1] == ">64"
    assert auto.load_table().rankings == table.rankings  # the default setting loads the shipped one


def test_a_malformed_table_is_an_error_naming_the_file(fresh_plugins: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"entries": [{"device": "cuda", "metric": "dot", "queries": "few", "ranking": []}]}))
    fresh_plugins.setenv("GPURAG_BACKEND_TABLE", str(path))
    gpurag.get_settings.cache_clear()
    with pytest.raises(InvalidInputError, match=r"broken\.json is malformed.*queries must be one of 1, <=64, >64"):
        auto.load_table()


def test_the_report_writer_ranks_by_the_geometric_mean_of_each_buckets_rows() -> None:
    rows = [
        {"scenario": "N=1M D=768 Q=1024", "metric": "dot", "a_ms": 2.0, "b_ms": 1.0, "c_ms": 1.0},
        {"scenario": "N=10M D=128 Q=1024", "metric": "dot", "a_ms": 8.0, "b_ms": 20.0},
        {"scenario": "N=1M D=768 Q=1", "metric": "dot", "a_ms": 0.9, "b_ms": 0.5, "c_ms": 0.1},
    ]
    table = auto.table_from_report(rows, ["a", "b", "c"], source="test")
    large = table.rankings[("cuda", "dot", ">64")]
    assert [(m.backend, m.ms) for m in large] == [("a", 4.0), ("b", pytest.approx(4.4721, abs=1e-4))]  # c lacks a row
    assert [m.backend for m in table.rankings[("cuda", "dot", "1")]] == ["c", "b", "a"]
    again = auto.BackendTable.from_json(json.loads(json.dumps(table.to_json())), "round trip")
    assert again.rankings == table.rankings
