"""A node's models and BLAS get one core fewer than the machine has, so the head node's event loop keeps one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from threadpoolctl import ThreadpoolController

torch = pytest.importorskip("torch")

from gpurag_server.settings import ServerSettings  # noqa: E402
from gpurag_server.workload import Workload, model_threads  # noqa: E402


def test_zero_means_one_fewer_than_the_cores() -> None:
    assert model_threads(0) == max(1, (os.cpu_count() or 1) - 1)
    assert model_threads(3) == 3


@pytest.fixture(autouse=True)
def _restore_blas_threads() -> Iterator[None]:
    controller = ThreadpoolController()
    before = controller.info()
    yield
    for pool in before:
        if pool["user_api"] == "blas":
            controller.select(filepath=pool["filepath"]).limit(limits=pool["num_threads"])


@pytest.mark.parametrize("threads", [1, 3])
def test_a_rag_workload_caps_torch_threads(small_corpus: Path, threads: int) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(7)
        Workload(ServerSettings(workload="rag", corpus=small_corpus, node_threads=threads))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


#: Builds a rag workload for each node_threads given, BLAS first set to 5 threads; prints the BLAS thread counts.
CAP_BLAS = """
import json, sys
from threadpoolctl import ThreadpoolController, threadpool_info
from gpurag_server.settings import ServerSettings
from gpurag_server.workload import Workload

found = []
for threads in map(int, sys.argv[2:]):
    ThreadpoolController().limit(limits=5, user_api="blas")
    Workload(ServerSettings(workload="rag", corpus=sys.argv[1], node_threads=threads))
    found.append(sorted({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}))
print(json.dumps(found))
"""


def test_a_rag_workload_caps_every_blas_library(small_corpus: Path) -> None:
    # A fresh process, as a process node is: in this one other tests' searches set BLAS limits of their own.
    done = subprocess.run(
        [sys.executable, "-c", CAP_BLAS, str(small_corpus), "3", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [[3], [1]]
