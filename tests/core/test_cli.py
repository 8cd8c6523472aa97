"""The `gpurag` command line: `gpurag plugins` and `--json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpurag.cli import add_plugin_commands, cli


def test_plugins_lists_backends_with_distribution_and_availability(fresh_plugins: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "numpy" in result.output
    assert "gpurag-numpy" in result.output
    assert "available" in result.output
    assert "retrievers: exact" in result.output


def test_plugins_json_names_each_plugin_version_and_what_it_registers(fresh_plugins: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    by_name = {p["name"]: p for p in report["plugins"]}
    assert by_name["numpy"]["distribution"] == "gpurag-numpy"
    assert by_name["numpy"]["version"] == "0.1.0"
    assert by_name["numpy"]["registers"] == {"backends": ["numpy"]}
    assert by_name["numpy"]["hooks"] == ["register_backends"]
    numpy_backend = {b["name"]: b for b in report["backends"]}["numpy"]
    assert numpy_backend["available"] is True
    assert report["failed"] == []


def test_the_installed_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from gpurag.cli import main; main()", "plugins", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["backends"]


def _gpurag(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    command = [sys.executable, "-c", "from gpurag.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)


def test_a_bad_setting_is_one_line_on_stderr_even_for_gpurag_plugins() -> None:
    out = _gpurag("plugins", env={"GPURAG_MEMORY_BUDGET_BYTES": "abc"})
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "Error: bad setting: GPURAG_MEMORY_BUDGET_BYTES='abc': Input should be a valid integer, "
        "unable to parse string as an integer"
    ]
    assert "Traceback" not in out.stderr


@pytest.fixture
def documents(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Gradients flow backwards through the graph.\n\nLoss goes down.")
    return tmp_path / "docs"


@pytest.mark.parametrize("kind", ["file", "foreign directory"])
def test_index_build_refuses_a_bad_out_before_any_embedding(
    tmp_path: Path, documents: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("not an index")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    from gpurag.rag import embedders

    monkeypatch.setattr(embedders, "get_embedder", lambda *a, **k: pytest.fail("embedding started"))
    add_plugin_commands()
    result = CliRunner().invoke(cli, ["index", "build", str(documents), "--out", str(out), "--embedder", "hashing"])
    assert result.exit_code == 1, result.output
    assert str(out) in result.output
    assert "not a directory" in result.output or "not a gpurag index" in result.output


def test_index_build_with_the_hashing_embedder_refuses_a_gpu_device(tmp_path: Path, documents: Path) -> None:
    add_plugin_commands()
    args = ["index", "build", str(documents), "--out", str(tmp_path / "ix"), "--embedder", "hashing"]
    result = CliRunner().invoke(cli, [*args, "--device", "cuda"])
    assert result.exit_code == 1
    assert "the hashing embedder runs on the CPU only; got device 'cuda'" in result.output
    assert CliRunner().invoke(cli, [*args, "--device", "cpu"]).exit_code == 0


def test_ask_refuses_a_huge_k_at_once() -> None:
    add_plugin_commands()
    result = CliRunner().invoke(cli, ["ask", "what?", "-k", "99999999999", "--embedder", "hashing"])
    assert result.exit_code == 1
    assert "k must be <= 65536 (the max_k setting" in result.output


def test_an_unknown_embedder_fails_at_once_when_the_hub_cannot_be_reached(tmp_path: Path, documents: Path) -> None:
    started = time.perf_counter()
    out = _gpurag(
        "index",
        "build",
        str(documents),
        "--out",
        str(tmp_path / "ix"),
        "--embedder",
        "no-such-org/no-such-model",
        env={"HF_ENDPOINT": "https://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")},
    )
    assert out.returncode == 1, out.stderr
    assert "no-such-org/no-such-model" in out.stderr
    assert "hub cannot be reached" in out.stderr
    assert time.perf_counter() - started < 20
