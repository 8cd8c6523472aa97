"""Scale-out rows on one host with several GPUs (`nvidia-h200-x2`); writes OUT/scaleout.json and .md as it goes.

Parts, most important first; each writes its rows the moment it ends, and one that fails is
reported without stopping the next:

1. ``sharded``: `ShardedRetriever` with one shard per GPU against one `ExactRetriever` on GPU 0,
   N = 20M, D = 128, Q = 1,024, k = 10, the same vectors (generated on GPU 0), host queries for
   both. Results are checked equal to the single-device search before anything is timed; then
   interleaved repeats, medians, ratio.
2. ``process``: the default RAG pipeline served by the ``process`` provider, one node per GPU.
   A short closed-loop probe of 2 nodes fixes one open-loop rate above their capacity; `gpurag
   load` (Poisson) then drives 2 nodes and 1 node at that same rate; completed responses/s of each.
3. ``budget``: in a fresh process, every GPU capped with
   ``torch.cuda.set_per_process_memory_fraction`` below the index's own size: one GPU refuses the
   index, the shards hold and search it, ids equal to the uncapped single-GPU search of part 1.

Run: python3 benchmarks/scaleout_gpu.py --out DIR [--parts sharded,process,budget] [--deadline S]
(``--smoke``: a small index as two shards on GPU 0, short loads; to check the setup on one GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START = time.monotonic()
DIM = 128
CHUNK_ROWS = 1 << 20  # rows generated per call: the same vectors whatever process makes them


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:6.1f} s] {message}", flush=True)


class Results:
    """Rows collected so far, rewritten to OUT/scaleout.json and OUT/scaleout.md after every change."""

    def __init__(self, out: Path, machine: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {"machine": machine, "parts": {}}

    def put(self, part: str, row: dict[str, Any]) -> None:
        self.data["parts"][part] = row
        (self.out / "scaleout.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "scaleout.md").write_text(markdown(self.data))


def machine_info() -> dict[str, Any]:
    import torch

    cards = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    query = ["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"]
    smi = (
        subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
        if shutil.which(query[0])
        else ""
    )
    return {
        "gpus": cards,
        "nvidia_smi": smi.splitlines(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def make_rows(n: int, device: str) -> Any:
    """(n, 128) float32 standard normal rows on ``device``, generated in fixed chunks (reproducible anywhere)."""
    import torch

    out = torch.empty((n, DIM), dtype=torch.float32, device=device)
    for j, start in enumerate(range(0, n, CHUNK_ROWS)):
        rows = min(CHUNK_ROWS, n - start)
        out[start : start + rows] = make_rows_chunk(j, rows, device)
    return out


def shard_devices(args: argparse.Namespace) -> list[str]:
    """``--devices``, else one shard per GPU, or two shards on GPU 0 for a smoke run or a single GPU."""
    import torch

    count = torch.cuda.device_count()
    if args.devices:
        return list(args.devices.split(","))
    return ["cuda:0", "cuda:0"] if args.smoke or count < 2 else [f"cuda:{i}" for i in range(count)]


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_queries(q: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((q, DIM), dtype=np.float32)


def compare(expected: Any, found: Any) -> dict[str, Any]:
    """How two searches differ: ids equal except where neighbouring scores tie to float32 rounding."""
    differ = found.ids != expected.ids
    scores = expected.scores
    tied = np.zeros_like(differ)
    tied[:, 1:] |= np.isclose(scores[:, 1:], scores[:, :-1], rtol=1e-5, atol=1e-5)
    tied[:, :-1] |= np.isclose(scores[:, :-1], scores[:, 1:], rtol=1e-5, atol=1e-5)
    return {
        "ids_equal": int((~differ).sum()),
        "ids_total": int(differ.size),
        "ids_differ_not_tied": int((differ & ~tied).sum()),
        "max_score_diff": float(np.abs(found.scores - expected.scores).max()),
        "equal": bool(not (differ & ~tied).any() and np.allclose(found.scores, expected.scores, 1e-5, 1e-5)),
    }


def timed(function: Callable[..., Any], *args: Any) -> float:
    started = time.perf_counter()
    function(*args)
    return (time.perf_counter() - started) * 1000


# --- part 1: sharded against one GPU ---------------------------------------------------------------
def part_sharded(args: argparse.Namespace, results: Results, backend: str, metric: str) -> dict[str, Any]:
    import torch

    from gpurag.retriever import ExactRetriever
    from gpurag.sharded import ShardedRetriever

    count = torch.cuda.device_count()
    devices = shard_devices(args)
    home = devices[0]
    n, k = args.n, 10
    log(f"sharded: generating {n:,} x {DIM} on {home}")
    data = make_rows(n, home)
    queries = make_queries(args.q)
    sync()

    log(f"sharded: {backend} {metric}: one GPU")
    base = 0
    if count:
        torch.cuda.reset_peak_memory_stats(0)
        base = torch.cuda.memory_allocated(0)  # the generated vectors
    started = time.perf_counter()
    single = ExactRetriever(metric, backend, device=home)
    single.add(data)
    build_single = time.perf_counter() - started
    started = time.perf_counter()
    expected = single.search(queries, k)  # compiles the kernels
    single_peak = torch.cuda.max_memory_allocated(0) - base if count else None
    first_single = time.perf_counter() - started

    log(f"sharded: {backend} {metric}: {len(devices)} shards on {devices}")
    for i in range(count):
        torch.cuda.reset_peak_memory_stats(i)
    started = time.perf_counter()
    sharded = ShardedRetriever(metric, backend, devices=devices)
    sharded.add(data)
    build_sharded = time.perf_counter() - started
    del data
    started = time.perf_counter()
    found = sharded.search(queries, k)
    first_sharded = time.perf_counter() - started
    check = compare(expected, found)
    log(f"sharded: check {check}")
    if not check["equal"]:
        raise AssertionError(f"the sharded search differs from the single-device search: {check}")
    np.savez(args.ref, queries=queries, ids=expected.ids, scores=expected.scores)

    single_ms: list[float] = []
    sharded_ms: list[float] = []
    for _ in range(args.repeats):  # interleaved
        single_ms.append(timed(single.search, queries, k))
        sharded_ms.append(timed(sharded.search, queries, k))
    # one shard alone (half the index, its own GPU): what both shards at once can at best take
    shard_alone_ms = [
        timed(sharded._on_shard, sharded.shards[-1], lambda shard: shard.search(queries, k))
        for _ in range(args.repeats)
    ]
    device_queries = torch.from_numpy(queries).to(home)
    single_device_ms = [timed(single.search, device_queries, k) for _ in range(args.repeats)]
    shard_peak = torch.cuda.max_memory_allocated(devices[-1]) if devices[-1] != home and count else None
    row = {
        "backend": backend,
        "metric": metric,
        "n": n,
        "d": DIM,
        "q": args.q,
        "k": k,
        "devices": devices,
        "shard_sizes": [len(s) for s in sharded.shards],
        "check": check,
        "build_s": {"single": round(build_single, 2), "sharded": round(build_sharded, 2)},
        "first_search_s": {"single": round(first_single, 2), "sharded": round(first_sharded, 2)},
        "single_ms": single_ms,
        "sharded_ms": sharded_ms,
        "single_device_queries_ms": single_device_ms,
        "one_shard_alone_ms": shard_alone_ms,
        "one_shard_alone_median_ms": statistics.median(shard_alone_ms),
        "single_median_ms": statistics.median(single_ms),
        "sharded_median_ms": statistics.median(sharded_ms),
        "speedup": statistics.median(single_ms) / statistics.median(sharded_ms),
        "shard_peak_bytes_last_gpu": shard_peak,
        "single_peak_bytes": single_peak,
        "index_bytes": n * DIM * 4,
    }
    log(
        f"sharded: {backend} {metric}: one GPU {row['single_median_ms']:.2f} ms, "
        f"sharded {row['sharded_median_ms']:.2f} ms: {row['speedup']:.2f}x; one shard alone "
        f"{row['one_shard_alone_median_ms']:.2f} ms"
    )
    del single, sharded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


# --- part 2: the process provider, one node per GPU -------------------------------------------------
def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GPURAG_CACHE_DIR", str(Path(tempfile.gettempdir()) / "gpurag-scaleout-cache"))
    env["GPURAG_BACKEND"] = "torch"  # the corpus's search: no kernel compiled inside each node
    env["GPURAG_MAX_QUEUE_LENGTH"] = "4096"
    # something in the server imports JAX on the GPU machine; XLA would reserve most of every GPU
    # (on the two-H200 machine the nodes then ran out of memory beside the sharded rows' index)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


class ServerProcess:
    """A gpurag server with ``nodes`` process nodes (one per GPU), started at once, ready when every node is."""

    def __init__(self, nodes: int, node_threads: int, log_path: Path) -> None:
        self.nodes, self.log_path = nodes, log_path
        command = [sys.executable, "-c", "from gpurag.cli import main; main()", "serve", "--node-provider", "process"]
        command += ["--nodes", str(nodes), "--port", "0"]
        env = server_env()
        env["GPURAG_NODE_THREADS"] = str(node_threads)
        env["GPURAG_CACHE_DIR"] += f"-{nodes}"  # servers started together never build one cache at once
        self.started = time.monotonic()
        self.sink = log_path.open("w")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.sink, text=True, env=env)
        self.url: str | None = None
        self.ready_s: float | None = None

    def wait_ready(self, ready_s: float) -> str:
        """The URL once every node is ready (the corpus is built first if it is not cached)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("gpurag serving on "):
                self.url = line.split()[3].rstrip(";")
                break
        if self.url is None:
            raise RuntimeError(f"the server exited before serving: {self.log_path.read_text()[-2000:]}")
        rest = self.process.stdout  # drained, so that nothing the nodes print can fill the pipe and block them
        threading.Thread(target=lambda: [None for _ in rest], daemon=True).start()
        deadline = time.monotonic() + ready_s
        while True:
            status = json.loads(urllib.request.urlopen(f"{self.url}/v1/status", timeout=5).read())
            ready = sum(1 for node in status["nodes"] if node["state"] == "ready")
            if ready >= self.nodes:
                break
            if any(node["state"] == "dead" for node in status["nodes"]):  # no waiting for a node that failed
                raise RuntimeError(f"a node failed to start: {self.log_path.read_text()[-2000:]}")
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{ready} of {self.nodes} nodes ready: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        self.ready_s = round(time.monotonic() - self.started, 1)
        return self.url

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.sink.close()


def ask(url: str) -> dict[str, Any]:
    body = json.dumps({"query": "What does the with statement do?", "k": 3}).encode()
    request = urllib.request.Request(f"{url}/v1/rag", data=body, headers={"content-type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=60).read())  # type: ignore[no-any-return]


def part_process(
    args: argparse.Namespace,
    results: Results,
    started: dict[int, ServerProcess] | None = None,
    before_load: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """2 nodes against 1 at one open-loop rate; servers ``started`` early are used, the others started here.

    Servers started together run side by side: the one not measured is idle (its nodes hold their
    GPU memory, nothing more). With time left, the pair is measured again in the other order.
    """
    from gpurag_server.load import LoadSpec, run_load
    from gpurag_server.nodes.process import gpu_ids

    row: dict[str, Any] = {
        "gpus_seen": gpu_ids(),
        "node_threads": args.node_threads,
        "settings": "default pipeline (default corpus, all-MiniLM-L6-v2, hybrid retrieval, extractive), "
        "max_batch_size 8, max_wait_s 0.1, round_robin",
        "runs": {},
    }
    servers = started or {}
    try:
        for nodes in (2, 1):
            if nodes not in servers:
                servers[nodes] = ServerProcess(nodes, args.node_threads, args.out / f"server_{nodes}.log")
        urls = {nodes: server.wait_ready(90) for nodes, server in servers.items()}
        for nodes, url in urls.items():
            answer = ask(url)
            assert answer.get("sources"), answer
            row["runs"][f"start_{nodes}_s"] = servers[nodes].ready_s
            log(f"process: {nodes} node(s) ready {servers[nodes].ready_s} s after start")
        if before_load is not None:
            before_load()
        rate = args.rate
        if rate is None:
            probe = run_load(LoadSpec(url=urls[2], clients=args.probe_clients, duration_s=args.probe_s))
            rate = round(probe.throughput * 1.15, 1)
            row["probe_2_nodes"] = {"clients": args.probe_clients, "responses_per_s": probe.throughput}
            log(f"process: 2-node probe {probe.throughput:.1f} responses/s; open-loop rate {rate}")
        order = [2, 1, 1, 2]
        for step, nodes in enumerate(order):
            left = args.deadline - (time.monotonic() - START)
            if step >= 2 and left < 2 * (args.load_s + 3):
                break
            report = run_load(LoadSpec(url=urls[nodes], rate=rate, duration_s=args.load_s, max_connections=1024))
            ok = report.statuses.get("200", 0)
            row["runs"].setdefault(str(nodes), []).append(
                {
                    "rate": rate,
                    "sent": report.sent,
                    "statuses": report.statuses,
                    "errors": report.errors,
                    "elapsed_s": report.elapsed_s,
                    "responses_per_s": report.throughput,
                    "ok_per_s": ok / report.elapsed_s,
                    # completions in the steady part of the send window (the first second is ramp-up)
                    "ok_per_s_steady": steady_rate(report.completions, 1.0, args.load_s),
                    "latency_ms": {name: value * 1000 for name, value in report.latency_s.items()},
                    "late_sends": report.late_sends,
                }
            )
            log(f"process: {nodes} node(s) at {rate} req/s: {report.describe()}")
            if "1" in row["runs"] and "2" in row["runs"]:
                one = statistics.median(r["ok_per_s_steady"] for r in row["runs"]["1"])
                two = statistics.median(r["ok_per_s_steady"] for r in row["runs"]["2"])
                row["speedup"] = two / one
                log(f"process: 2 nodes {two:.1f} vs 1 node {one:.1f} responses/s: {row['speedup']:.2f}x")
            results.put("process", row)
    finally:
        for server in servers.values():
            server.stop()
    return row


def steady_rate(completions: list[tuple[float, float, int]], begin: float, end: float) -> float:
    """200 responses per second completed between ``begin`` and ``end`` seconds after the start."""
    done = sum(1 for t, _, status in completions if status == 200 and begin <= t < end)
    return done / (end - begin)


# --- part 3: an index larger than one GPU's memory budget ------------------------------------------
class BudgetRun:
    """`budget_child` in a fresh process (the cap must hold from its first allocation), started now."""

    def __init__(self, args: argparse.Namespace, shard_peak: int | None, backend: str, single_peak: int | None) -> None:
        index_bytes = args.n * DIM * 4
        # room for one shard as it was measured on its GPU, well short of what the whole index took on one
        budget = int(shard_peak * 1.15) if shard_peak else index_bytes * 3 // 4
        if args.smoke:  # two shards on one GPU: a cap cannot split them, so only the code path is checked
            budget = index_bytes * 4
        command = [sys.executable, __file__, "--child-budget", str(budget), "--n", str(args.n)]
        command += ["--ref", str(args.ref), "--backend", backend, "--metric", args.metrics.split(",")[0]]
        command += ["--out", str(args.out)] + (["--smoke"] if args.smoke else [])
        command += ["--devices", args.devices] if args.devices else []
        self.single_peak = single_peak
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self, timeout_s: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout_s)

    def result(self) -> dict[str, Any]:
        out, err = self.process.communicate()
        sys.stdout.write(out)
        sys.stdout.write(err[-3000:])
        lines = [line for line in out.splitlines() if line.startswith("BUDGET ")]
        if self.process.returncode != 0 or not lines:
            raise RuntimeError(f"budget child failed (status {self.process.returncode})")
        row: dict[str, Any] = json.loads(lines[-1][len("BUDGET ") :])
        row["single_gpu_peak_bytes_uncapped"] = self.single_peak  # the whole index on one GPU, part 1
        return row


def part_budget(
    args: argparse.Namespace, shard_peak: int | None, backend: str, single_peak: int | None
) -> dict[str, Any]:
    return BudgetRun(args, shard_peak, backend, single_peak).result()


def budget_child(args: argparse.Namespace) -> None:
    import torch

    from gpurag.retriever import ExactRetriever
    from gpurag.sharded import ShardedRetriever

    count = torch.cuda.device_count()
    devices = shard_devices(args)
    home = devices[0]
    budget = args.child_budget
    for i in range(count):
        total = torch.cuda.get_device_properties(i).total_memory
        torch.cuda.set_per_process_memory_fraction(budget / total, i)
    ref = np.load(args.ref)
    row: dict[str, Any] = {"budget_bytes_per_gpu": budget, "index_bytes": args.n * DIM * 4, "devices": devices}
    log(f"budget: every GPU capped at {budget / 2**30:.2f} GiB; index {args.n * DIM * 4 / 2**30:.2f} GiB")
    host = np.empty((args.n, DIM), dtype=np.float32)
    for start in range(0, args.n, CHUNK_ROWS):  # the same vectors as part 1, a chunk at a time
        rows = min(CHUNK_ROWS, args.n - start)
        chunk = make_rows_chunk(start // CHUNK_ROWS, rows, home)
        host[start : start + rows] = chunk.cpu().numpy()
        del chunk
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    single = ExactRetriever(args.metric, args.backend, device=home)
    try:
        single.add(torch.from_numpy(host))  # a CPU tensor goes up without a host-side check first
        single.search(ref["queries"], 10)
        row["single_gpu"] = "held and searched the index (the cap did not bind)"
    except Exception as exc:  # torch.OutOfMemoryError, expected; any other refusal is reported as it is
        row["single_gpu"] = f"refused: {type(exc).__name__} ({str(exc).splitlines()[0][:160]})"
    del single
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log(f"budget: one GPU: {row['single_gpu']}")
    sharded = ShardedRetriever(args.metric, args.backend, devices=devices)
    sharded.add(host)
    found = sharded.search(ref["queries"], 10)

    class Expected:
        ids = ref["ids"]
        scores = ref["scores"]

    row["check"] = compare(Expected, found)
    row["shard_sizes"] = [len(s) for s in sharded.shards]
    row["peak_bytes"] = [torch.cuda.max_memory_allocated(i) for i in range(count)]
    log(f"budget: sharded check {row['check']}")
    print("BUDGET " + json.dumps(row), flush=True)


def make_rows_chunk(j: int, rows: int, device: str) -> Any:
    import torch

    generator = torch.Generator(device=device).manual_seed(j)
    return torch.randn((rows, DIM), generator=generator, device=device)


# --- the report --------------------------------------------------------------------------------------
def markdown(data: dict[str, Any]) -> str:
    machine = data["machine"]
    lines = [
        "# Scale-out rows on two GPUs",
        "",
        f"`python3 benchmarks/scaleout_gpu.py` on {', '.join(machine['gpus'])} "
        f"({machine['cpu_cores']} CPU cores), torch {machine['torch']}, {machine['date']}.",
        "",
    ]
    parts = data["parts"]
    sharded = [v for key, v in parts.items() if key.startswith("sharded") and "error" not in v]
    if sharded:
        lines += [
            "## ShardedRetriever, one shard per GPU, against one GPU (target ≥ 1.8×)",
            "",
            "| backend | metric | N × D, Q, k | one GPU ms | sharded ms | speed-up | one shard alone ms "
            "| equal to one GPU |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sharded:
            c = r["check"]
            lines.append(
                f"| {r['backend']} | {r['metric']} | {r['n']:,} × {r['d']}, {r['q']}, {r['k']} "
                f"| {r['single_median_ms']:.2f} | {r['sharded_median_ms']:.2f} | {r['speedup']:.2f}× "
                f"| {r.get('one_shard_alone_median_ms', float('nan')):.2f} "
                f"| {c['ids_equal']}/{c['ids_total']} ids, {c['ids_differ_not_tied']} differ untied |"
            )
        lines.append("")
    if "process" in parts and "runs" in parts["process"]:
        p = parts["process"]
        lines += [
            "## RAG pipeline, `process` provider, one node per GPU (target 2 nodes ≥ 1.8× 1 node)",
            "",
            "| nodes | open-loop rate | sent | 200 | responses/s (steady window) | responses/s (whole run) "
            "| p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for nodes in ("2", "1"):
            for r in p["runs"].get(nodes, []):
                lines.append(
                    f"| {nodes} | {r['rate']} | {r['sent']} | {r['statuses'].get('200', 0)} "
                    f"| {r['ok_per_s_steady']:.1f} "
                    f"| {r['ok_per_s']:.1f} "
                    f"| {r['latency_ms']['p50']:.1f} | {r['latency_ms']['p99']:.1f} |"
                )
        if "speedup" in p:
            lines.append(f"\n2 nodes / 1 node: **{p['speedup']:.2f}×**")
        lines.append("")
    if "budget" in parts and "check" in parts["budget"]:
        b = parts["budget"]
        lines += [
            "## An index larger than one GPU's memory budget",
            "",
            f"Every GPU capped at {b['budget_bytes_per_gpu'] / 2**30:.2f} GiB "
            f"(`torch.cuda.set_per_process_memory_fraction`); the index is {b['index_bytes'] / 2**30:.2f} GiB "
            f"of float32 vectors, and one GPU held it in "
            f"{(b.get('single_gpu_peak_bytes_uncapped') or 0) / 2**30:.2f} GiB at its peak without the cap "
            "(the backend's bf16 and transposed copies, search scratch).",
            f"One GPU: {b['single_gpu']}. Sharded over {b['devices']}: shards {b['shard_sizes']}, "
            f"{b['check']['ids_equal']}/{b['check']['ids_total']} ids equal to the uncapped one-GPU search "
            f"({b['check']['ids_differ_not_tied']} differ untied); peak bytes per GPU {b['peak_bytes']}.",
            "",
        ]
    errors = {key: v["error"] for key, v in parts.items() if "error" in v}
    if errors:
        lines += ["## Failed or skipped", ""] + [f"- {key}: {message}" for key, message in errors.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--parts", default="sharded,process,budget,more")
    parser.add_argument("--n", type=int, default=20_000_000)
    parser.add_argument("--q", type=int, default=1024)
    parser.add_argument("--backends", default="triton,torch")
    parser.add_argument("--metrics", default="dot,l2")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rate", type=float, default=None, help="open-loop rate; default: 1.15x the 2-node probe")
    parser.add_argument("--probe-clients", type=int, default=64)
    parser.add_argument("--probe-s", type=float, default=3.0)
    parser.add_argument("--load-s", type=float, default=6.0)
    parser.add_argument("--node-threads", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds from the start; later parts are skipped")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--devices", default=None, help="shard devices, e.g. cpu,cpu for a dry run")
    parser.add_argument("--early-servers", action="store_true", help="start both servers first, measure them last")
    parser.add_argument("--ref", type=Path, default=Path(tempfile.gettempdir()) / "scaleout_ref.npz")
    parser.add_argument("--child-budget", type=int, default=None)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--metric", default="dot")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child_budget is not None:
        budget_child(args)
        return
    results = Results(args.out, machine_info())
    log(f"machine: {results.data['machine']}")
    parts = args.parts.split(",")
    backends, metrics = args.backends.split(","), args.metrics.split(",")
    # (name, estimated seconds, action)
    plan: list[tuple[str, float, Callable[[], dict[str, Any]]]] = []
    first = f"sharded_{backends[0]}_{metrics[0]}"
    if "sharded" in parts:
        plan.append((first, 30, lambda: part_sharded(args, results, backends[0], metrics[0])))
    early: dict[int, ServerProcess] = {}
    if "process" in parts and args.early_servers:  # they start while the GPU rows run
        early = {n: ServerProcess(n, args.node_threads, args.out / f"server_{n}.log") for n in (2, 1)}
    if "process" in parts and not args.early_servers:
        plan.append(("process", 35, lambda: part_process(args, results)))
    background: list[BudgetRun] = []

    def start_budget() -> dict[str, Any]:
        background.append(BudgetRun(args, *measured_shard()))
        return {"error": "started in the background; its row follows the process row"}

    def wait_budget() -> None:  # the loads run alone on the GPUs, unless the budget run is late
        if background:
            background[0].wait(max(args.deadline - (time.monotonic() - START) - (2 * args.load_s + 10), 0))

    if "budget" in parts and not ("process" in parts and args.early_servers):
        plan.append(("budget", 30, lambda: part_budget(args, *measured_shard())))
    if "process" in parts and args.early_servers:
        if "budget" in parts:
            plan.append(("budget", 0, start_budget))
        plan.append(("process", 2 * args.load_s + 6, lambda: part_process(args, results, early, wait_budget)))
        if "budget" in parts:
            plan.append(("budget", 0, lambda: background[0].result()))
    if "more" in parts:
        for backend in backends:
            for metric in metrics:
                if (backend, metric) != (backends[0], metrics[0]):
                    name = f"sharded_{backend}_{metric}"
                    plan.append((name, 25, functools.partial(part_sharded, args, results, backend, metric)))

    def measured_shard() -> tuple[int | None, str, int | None]:
        """Peak bytes of one GPU's shard, the backend, and the whole index's peak on one GPU, as measured."""
        for key, row in results.data["parts"].items():
            if key.startswith("sharded_") and "error" not in row:
                return row.get("shard_peak_bytes_last_gpu"), str(row["backend"]), row.get("single_peak_bytes")
        return None, backends[0], None

    position = 0
    while position < len(plan):
        name, estimate, action = plan[position]
        position += 1
        left = args.deadline - (time.monotonic() - START)
        if left < estimate * (0.3 if args.smoke else 1.0):
            log(f"{name}: skipped ({left:.0f} s left, needs about {estimate:.0f})")
            results.put(name, {"error": f"skipped: {left:.0f} s left of the slot"})
            continue
        log(f"{name}: start")
        try:
            results.put(name, action())
        except Exception as exc:  # reported, and the next part runs
            import traceback

            traceback.print_exc()
            results.put(name, {"error": f"{type(exc).__name__}: {exc}"[:500]})
            fallback = f"sharded_torch_{metrics[0]}"
            if name == first and backends[0] != "torch":  # the headline row on the other backend, next
                plan = [item for item in plan if item[0] != fallback]
                plan.insert(position, (fallback, 25, lambda: part_sharded(args, results, "torch", metrics[0])))
    log("done")


if __name__ == "__main__":
    main()
