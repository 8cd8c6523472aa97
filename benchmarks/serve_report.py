"""The server's three speed rows, measured in one run on this machine; writes benchmarks/results/serve_report.md.

1. Head-node cost: gpurag serving a zero-cost node against the minimal Starlette batcher
   (`minimal_batcher.py`), each server pinned to CPU 0, wrk (closed loop, 32 connections) pinned to
   CPU 1, interleaved; then `gpurag load` open loop (Poisson) at half of gpurag's saturation rate.
2. Batching: the default pipeline (default corpus, MiniLM, extractive), 32 closed-loop clients,
   max_batch_size 8 / max_wait_s 0.1 against max_batch_size 1, interleaved.
3. Autoscaling: a step from 20 to 500 req/s and back to 0 against `sleep` nodes (40 ms a batch,
   so one node serves at most 200 req/s), autoscale_interval_s 2; the plot is committed.

Run: make serve-report (needs wrk: apt-get install wrk).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import httpx

from gpurag_server.load import LoadReport, LoadSpec, plot_report, run_load
from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent
BODY = '{"query": "What does the with statement do?", "k": 3}'
REPEATS = int(os.environ.get("SERVE_REPORT_REPEATS", "3"))
# The batching row with another generator (the GPU machine: SERVE_REPORT_GENERATOR=local), fewer
# clients or shorter runs, and the report written elsewhere (SERVE_REPORT_OUT).
GENERATOR = os.environ.get("SERVE_REPORT_GENERATOR")
CLIENTS = int(os.environ.get("SERVE_REPORT_CLIENTS", "32"))
SECONDS = float(os.environ.get("SERVE_REPORT_SECONDS", "15"))
WARMUP_S = float(os.environ.get("SERVE_REPORT_WARMUP_S", "3"))  # 0: the answer checks are the only warm-up
REPORT = Path(os.environ.get("SERVE_REPORT_OUT", str(RESULTS / "serve_report.md")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def launch(command: list[str], cpu: int | None = None) -> subprocess.Popen[str]:
    """Start ``command`` (pinned to ``cpu``)."""
    full = (["taskset", "-c", str(cpu)] if cpu is not None else []) + command
    return subprocess.Popen(full, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def server(
    command: list[str],
    port: int,
    cpu: int | None = None,
    ready_s: float = 900,
    process: subprocess.Popen[str] | None = None,
) -> Iterator[str]:
    """Start ``command`` (unless ``process`` runs it already), wait until it answers, yield its URL, stop it."""
    process = process or launch(command, cpu)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_s
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command} exited: {process.stderr.read() if process.stderr else ''}")
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.post(
                    f"{url}/v1/rag", content=BODY, headers={"content-type": "application/json"}, timeout=120
                )
                if response.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command} did not answer within {ready_s} s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def wrk(url: str, seconds: int, connections: int, script: Path) -> dict[str, float]:
    """wrk's req/s, p50 and p99 (ms) for POSTs of BODY; refuses a run with non-2xx responses."""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            f"{url}/v1/rag",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failed requests:\n{out}")

    def ms(label: str) -> float:
        match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
        assert match, out
        return float(match.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rate, out
    return {"rps": float(rate.group(1)), "p50": ms("50%"), "p99": ms("99%")}


def check_answer(url: str, expect_sources: bool) -> None:
    """The answer's shape before anything is timed."""
    body = httpx.post(f"{url}/v1/rag", content=BODY, headers={"content-type": "application/json"}, timeout=60).json()
    assert body["query"] == "What does the with statement do?", body
    if expect_sources:
        assert "pydoc:with" in [s["source"] for s in body["sources"]], body


def mean_batch_size(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    total = float(re.search(r"^gpurag_batch_size_sum ([\d.e+]+)$", text, re.M).group(1))  # type: ignore[union-attr]
    count = float(re.search(r"^gpurag_batch_size_count ([\d.e+]+)$", text, re.M).group(1))  # type: ignore[union-attr]
    return total / count if count else 0.0


def gpurag_command() -> list[str]:
    """The ``gpurag`` command: its script beside this Python, else the CLI run by this Python (no scripts installed)."""
    script = BIN / "gpurag"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from gpurag.cli import main; sys.exit(main())"]


def gpu_description() -> str:
    """The GPU the servers' models use (``CUDA_VISIBLE_DEVICES`` applies), or nothing without one."""
    out = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        if shutil.which("nvidia-smi")
        else None
    )
    if out is None or out.returncode != 0:
        return ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    cards = out.stdout.strip().splitlines()
    card = cards[int(visible.split(",")[0])] if visible and visible.split(",")[0].isdigit() else cards[0]
    return f"GPU: {card} (driver). "


def runs_text(runs: list[dict[str, float]]) -> str:
    return ", ".join(f"{r['rps']:,.0f}" for r in runs)


def row_head_node(lines: list[str]) -> None:
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(f"wrk.method = 'POST'\nwrk.body = '{BODY}'\nwrk.headers['Content-Type'] = 'application/json'\n")
    anchor_port, ours_port, strict_port = free_port(), free_port(), free_port()
    anchor_cmd = [
        str(BIN / "uvicorn"),
        "--app-dir",
        "benchmarks",
        "minimal_batcher:app",
        "--port",
        str(anchor_port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    ours_cmd = [
        str(BIN / "gpurag"),
        "serve",
        "--workload",
        "zero",
        "--port",
        str(ours_port),
        "--max-queue-length",
        "4096",
    ]
    strict_cmd = [
        str(BIN / "gpurag"),
        "serve",
        "--workload",
        "zero",
        "--port",
        str(strict_port),
        "--max-queue-length",
        "4096",
        "--no-dispatch-when-idle",
    ]
    anchor_runs, ours_runs, strict_runs = [], [], []
    with (
        server(anchor_cmd, anchor_port, cpu=0) as anchor,
        server(ours_cmd, ours_port, cpu=0) as ours,
        server(strict_cmd, strict_port, cpu=0) as strict,
    ):
        for url in (anchor, ours, strict):
            check_answer(url, expect_sources=False)
            wrk(url, 2, 32, script)  # warm-up
        for _ in range(REPEATS):
            anchor_runs.append(wrk(anchor, 8, 32, script))
            ours_runs.append(wrk(ours, 8, 32, script))
            strict_runs.append(wrk(strict, 8, 32, script))
            print("  wrk anchor", anchor_runs[-1], "ours", ours_runs[-1], "strict", strict_runs[-1], flush=True)
        ours_rps = statistics.median(r["rps"] for r in ours_runs)
        anchor_rps = statistics.median(r["rps"] for r in anchor_runs)
        os.sched_setaffinity(0, {1})
        half = ours_rps / 2
        open_loop = run_load(LoadSpec(url=ours, rate=half, arrivals="poisson", duration_s=10, max_connections=64))
        print("  open loop", open_loop.describe().replace("\n", " | "), flush=True)
        quarter = run_load(LoadSpec(url=ours, rate=half / 2, arrivals="poisson", duration_s=10, max_connections=64))
        print("  open loop", quarter.describe().replace("\n", " | "), flush=True)
        anchor_open = run_load(LoadSpec(url=anchor, rate=half, arrivals="poisson", duration_s=10, max_connections=64))
        print("  anchor open loop", anchor_open.describe().replace("\n", " | "), flush=True)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    ratio = ours_rps / anchor_rps
    p99 = open_loop.latency_s["p99"] * 1000
    lines += [
        "## 1. Head-node cost (zero-cost node; server on CPU 0, load generator on CPU 1)",
        "",
        f"| server | wrk -c32 req/s, median of {REPEATS} (runs) | p50 / p99 ms (median run) |",
        "|---|---|---|",
        wrk_row("minimal Starlette batcher (anchor)", anchor_runs),
        wrk_row("gpurag head node (validation, metrics, ledger, node thread)", ours_runs),
        wrk_row("same, `--no-dispatch-when-idle` (strict 8 / 0.1 s, the anchor's rule)", strict_runs),
        "",
        f"- gpurag / anchor saturation throughput: **{ratio:.2f}** "
        f"(target ≥ 0.50: {'met' if ratio >= 0.5 else 'MISSED'}).",
        f"- `gpurag load` open loop, Poisson, {half:,.0f} req/s (half of gpurag's saturation) for 10 s: "
        + open_loop_text(open_loop)
        + f" (target p99 ≤ 20 ms: {'met' if p99 <= 20 else 'MISSED'}).",
        f"- Same at a quarter ({half / 2:,.0f} req/s): " + open_loop_text(quarter) + ".",
        f"- The anchor, same load ({half:,.0f} req/s), same run: " + open_loop_text(anchor_open) + ".",
        "",
    ]


def wrk_row(label: str, runs: list[dict[str, float]]) -> str:
    rps = statistics.median(r["rps"] for r in runs)
    p50 = statistics.median(r["p50"] for r in runs)
    p99 = statistics.median(r["p99"] for r in runs)
    return f"| {label} | {rps:,.0f} ({runs_text(runs)}) | {p50:.2f} / {p99:.2f} |"


def open_loop_text(report: LoadReport) -> str:
    ms = {name: value * 1000 for name, value in report.latency_s.items()}
    return (
        f"sent {report.sent}, statuses {report.statuses}, late sends {report.late_sends}; p50 {ms['p50']:.2f} ms, "
        f"p99 **{ms['p99']:.2f} ms**, p99.9 {ms['p99.9']:.2f} ms, max {ms['max']:.2f} ms; "
        f"{report.throughput:,.0f} responses/s over {report.elapsed_s:.1f} s"
    )


def row_batching(lines: list[str]) -> None:
    batched_port, single_port = free_port(), free_port()
    options = ["--request-timeout-s", "600", *(["--generator", GENERATOR] if GENERATOR else [])]
    batched_cmd = [*gpurag_command(), "serve", "--port", str(batched_port), *options]
    single_cmd = [*gpurag_command(), "serve", "--port", str(single_port), *options, "--max-batch-size", "1"]
    runs: dict[str, list[LoadReport]] = {"batched": [], "single": []}
    with contextlib.ExitStack() as stack:
        # Both servers load their models at once; stopped whatever happens.
        processes = [launch(command) for command in (batched_cmd, single_cmd)]
        for process in processes:
            stack.callback(process.kill)
        batched = stack.enter_context(server(batched_cmd, batched_port, process=processes[0]))
        single = stack.enter_context(server(single_cmd, single_port, process=processes[1]))
        check_answer(batched, expect_sources=True)
        check_answer(single, expect_sources=True)
        print(f"  both servers answer ({time.strftime('%H:%M:%S')})", flush=True)
        for url in (batched, single) if WARMUP_S > 0 else ():
            run_load(LoadSpec(url=url, clients=CLIENTS, duration_s=WARMUP_S))
        for _ in range(max(REPEATS - 1, 2)):
            for name, url in (("batched", batched), ("single", single)):
                report = run_load(LoadSpec(url=url, clients=CLIENTS, duration_s=SECONDS))
                assert set(report.statuses) == {"200"}, report.statuses
                assert report.errors == 0
                runs[name].append(report)
                print(f"  {name}", report.describe().replace("\n", " | "), flush=True)
                with contextlib.suppress(OSError):  # a run cut short (a GPU slot) keeps what it measured
                    REPORT.with_suffix(".partial.txt").open("a").write(
                        f"{name} {report.throughput:.2f} responses/s, p50 {report.latency_s['p50']:.3f} s\n"
                    )
        sizes = {"batched": mean_batch_size(batched), "single": mean_batch_size(single)}
    med = {name: statistics.median(r.throughput for r in reports) for name, reports in runs.items()}
    ratio = med["batched"] / med["single"]
    lines += [
        f"## 2. Batching pays (default pipeline: default corpus, all-MiniLM-L6-v2, {GENERATOR or 'extractive'}"
        + (f" (at most {os.environ.get('GPURAG_LOCAL_MAX_NEW_TOKENS', 160)} new tokens)" * (GENERATOR == "local"))
        + f"; {CLIENTS} closed-loop clients, {SECONDS:g} s runs, warm-up {WARMUP_S:g} s)",
        "",
        "| configuration | responses/s, median (runs) | p50 / p99 ms (median run) | mean batch size |",
        "|---|---|---|---|",
    ]
    for name, label in (("batched", "max_batch_size 8, max_wait_s 0.1"), ("single", "max_batch_size 1")):
        reports = runs[name]
        lines.append(
            f"| {label} | {med[name]:.1f} ({', '.join(f'{r.throughput:.1f}' for r in reports)}) "
            f"| {statistics.median(r.latency_s['p50'] for r in reports) * 1000:.0f} / "
            f"{statistics.median(r.latency_s['p99'] for r in reports) * 1000:.0f} | {sizes[name]:.2f} |"
        )
    lines += [
        "",
        f"- batched / unbatched throughput: **{ratio:.2f}×** (target ≥ 3×: {'met' if ratio >= 3 else 'MISSED'}).",
        "",
    ]


def row_autoscaling(lines: list[str]) -> None:
    port, interval = free_port(), 2.0
    command = [
        str(BIN / "gpurag"),
        "serve",
        "--port",
        str(port),
        "--workload",
        "sleep",
        "--sleep-per-batch-s",
        "0.04",
        "--autoscale",
        "--autoscale-interval-s",
        str(interval),
        "--min-nodes",
        "1",
        "--max-nodes",
        "4",
    ]
    phases = [(6.0, 20.0), (16.0, 500.0), (20.0, 0.0)]
    with server(command, port) as url:
        report = run_load(
            LoadSpec(url=url, phases=phases, arrivals="poisson", max_connections=256, sample_interval_s=0.2)
        )
        decisions = httpx.get(f"{url}/v1/status").json()["autoscaler"]["decisions"]
    plot = RESULTS / "serve_autoscale_step.png"
    plot_report(
        report, plot, title="step 20 -> 500 -> 0 req/s; sleep nodes (40 ms a batch: 200 req/s each); interval 2 s"
    )
    step_at, end_at = phases[0][0], phases[0][0] + phases[1][0]
    up = next((s["t"] for s in report.samples if s["t"] >= step_at and s["nodes_all"] > 1), None)
    most = max(s["nodes_all"] for s in report.samples)
    down = next((s["t"] for s in report.samples if s["t"] >= end_at and s["nodes_all"] == 1), None)
    failed = report.sent - report.statuses.get("200", 0)
    print("  autoscale", report.describe().replace("\n", " | "), f"up at {up}, most {most}, down at {down}", flush=True)
    lines += [
        "## 3. Autoscaling reacts (`queue_length` policy, autoscale_interval_s 2, min 1, max 4 nodes)",
        "",
        f"- Load: {report.mode}; sent {report.sent}, statuses {report.statuses}, connection errors {report.errors}, "
        f"failed requests **{failed}**.",
        f"- First node added {up - step_at:.1f} s after the step "
        f"({(up - step_at) / interval:.1f} intervals; target ≤ 3)"
        if up is not None
        else "- The node count never rose (MISSED).",
        f"- Most nodes: {most}; back to min_nodes = 1 {down - end_at:.1f} s after the load ended."
        if down is not None
        else f"- Most nodes: {most}; never back to 1 within {phases[2][0]:g} s (MISSED).",
        f"- Decisions logged: {len(decisions)}; changes: "
        + "; ".join(f"{d['time_s']:.1f} s {d['old']}→{d['new']}" for d in decisions if d["old"] != d["new"]),
        "- Plot: `benchmarks/results/serve_autoscale_step.png`.",
        "",
    ]


def main() -> None:
    rows = {"head": row_head_node, "batching": row_batching, "autoscaling": row_autoscaling}
    chosen = sys.argv[1:] or list(rows)
    wrk_version = "none"
    if "head" in chosen:
        if shutil.which("wrk") is None:
            raise SystemExit("wrk is not installed: apt-get install wrk")
        wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1]
    avx512 = "avx512f" in Path("/proc/cpuinfo").read_text()
    lines = [
        "# Serving report",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, avx512f {'yes' if avx512 else 'no'}; shared with other jobs. "
        f"Python {platform.python_version()}, starlette {version('starlette')}, uvicorn {version('uvicorn')}, "
        f"wrk {wrk_version}. {gpu_description()}"
        f"Date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at the start "
        f"{os.getloadavg()[0]:.1f}. Produced by `make serve-report`.",
        "",
    ]
    for name in chosen:
        print(name, flush=True)
        before = len(lines)
        rows[name](lines)
        lines.insert(before + 1, f"\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    report = REPORT
    if chosen != list(rows) and report.exists():  # rerun rows replace their sections, the rest stays
        old = report.read_text().split("\n## ")
        new = "\n".join(lines).split("\n## ")
        fresh = {section.split(".", 1)[0]: section for section in new[1:]}
        merged = [new[0]] + [fresh.get(section.split(".", 1)[0], section) for section in old[1:]]
        report.write_text("\n## ".join(merged))
    else:
        report.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
