"""A node's models get one core fewer than the machine has, so the head node's event loop keeps one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from gpurag_server.settings import ServerSettings  # noqa: E402
from gpurag_server.workload import Workload, model_threads  # noqa: E402


def test_zero_means_one_fewer_than_the_cores() -> None:
    assert model_threads(0) == max(1, (os.cpu_count() or 1) - 1)
    assert model_threads(3) == 3


@pytest.mark.parametrize("threads", [1, 3])
def test_a_rag_workload_caps_torch_threads(small_corpus: Path, threads: int) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(7)
        Workload(ServerSettings(workload="rag", corpus=small_corpus, node_threads=threads))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
