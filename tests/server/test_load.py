"""`gpurag load` against a real server: open and closed loop, statuses, late sends, the plot."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from server_harness import serving

from gpurag.cli import add_plugin_commands, cli
from gpurag_server.load import LoadSpec, run_load


def _cli() -> object:
    add_plugin_commands()
    return cli


def test_open_loop_sends_on_schedule_and_plots(tmp_path: Path) -> None:
    with serving(workload="zero") as running:
        plot = tmp_path / "load.png"
        report = run_load(LoadSpec(url=running.url, rate=200, arrivals="constant", duration_s=1.5, plot=plot))
        assert report.sent == 299 or report.sent == 300
        assert report.statuses == {"200": report.sent}
        assert report.errors == 0
        assert 0 < report.latency_s["p50"] <= report.latency_s["p99"] <= report.latency_s["max"]
        assert 1.4 <= report.elapsed_s < 5
        assert report.samples
        assert {"t", "queue", "nodes"} <= set(report.samples[0])
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_open_loop_that_cannot_keep_up_counts_late_sends() -> None:
    with serving(workload="zero") as running:
        report = run_load(LoadSpec(url=running.url, rate=5000, arrivals="poisson", duration_s=0.1, max_connections=4))
        assert report.late_sends > 0
        assert sum(report.statuses.values()) + report.errors == report.sent


def test_closed_loop_through_the_command_line() -> None:
    with serving(workload="sleep", sleep_per_batch_s=0.01) as running:
        result = CliRunner().invoke(
            _cli(), ["load", "--url", running.url, "--clients", "4", "--duration", "1", "--json"]
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["mode"] == "closed loop, 4 clients"
        assert report["statuses"]["200"] == report["sent"] > 10


def test_load_needs_exactly_one_of_rate_and_clients() -> None:
    result = CliRunner().invoke(_cli(), ["load", "--duration", "1"])
    assert result.exit_code != 0
    assert "exactly one of --rate" in result.output


def test_phases_fix_a_step_schedule_in_advance() -> None:
    spec = LoadSpec(arrivals="constant", phases=[(1.0, 10.0), (0.5, 100.0), (1.0, 0.0)])
    offsets = spec.schedule()
    assert len([t for t in offsets if t < 1.0]) == 9
    assert len([t for t in offsets if 1.0 <= t < 1.5]) == 49
    assert not [t for t in offsets if t >= 1.5]
    poisson = LoadSpec(arrivals="poisson", phases=[(100.0, 50.0)]).schedule()
    assert 4500 < len(poisson) < 5500
