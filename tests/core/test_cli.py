"""The `gpurag` command line: `gpurag plugins` and `--json`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from gpurag.cli import cli


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
