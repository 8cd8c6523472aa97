"""`gpurag serve` takes every ServerSettings field as a flag; the default corpus is served end to end."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from server_harness import serving

from gpurag import plugins
from gpurag.cli import add_plugin_commands, cli
from gpurag.settings import get_settings
from gpurag_server.commands import serve_command, settings_from_flags
from gpurag_server.serve import curl_example
from gpurag_server.settings import ServerSettings


def test_every_setting_is_a_serve_flag() -> None:
    add_plugin_commands()
    help_text = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200).output
    for name in ServerSettings.model_fields:
        flag = "--api-key" if name == "api_keys" else "--" + name.replace("_", "-")
        assert flag in help_text, flag
    assert {p.name for p in serve_command.params} == set(ServerSettings.model_fields)


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPURAG_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("GPURAG_MAX_WAIT_S", "0.5")
    settings = settings_from_flags({"max_wait_s": 0.01, "api_keys": ("k1", "k2"), "autoscale": True, "host": None})
    assert settings.max_batch_size == 4
    assert settings.max_wait_s == 0.01
    assert settings.api_keys == ("k1", "k2")
    assert settings.autoscale is True
    assert settings.host == "127.0.0.1"


def test_a_bad_flag_value_names_the_setting() -> None:
    add_plugin_commands()
    result = CliRunner().invoke(cli, ["serve", "--max-batch-size", "0", "--workload", "zero"])
    assert result.exit_code != 0
    assert "max_batch_size" in result.output


def test_the_curl_example_names_the_route_and_the_key() -> None:
    assert "http://127.0.0.1:8000/v1/rag" in curl_example(ServerSettings(), 8000)
    assert "Authorization: Bearer" in curl_example(ServerSettings(api_keys=("k",)), 8000)


def test_the_default_corpus_is_served_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No corpus named: the nodes serve Python's language reference (here with the hashing embedder)."""
    monkeypatch.setenv("GPURAG_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GPURAG_EMBEDDER", "hashing")
    get_settings.cache_clear()
    plugins.reset_plugins()
    try:
        with serving(nodes=1) as running:
            response = httpx.post(f"{running.url}/v1/rag", json={"query": "What does the with statement do?", "k": 3})
            assert response.status_code == 200
            body = response.json()
            assert "pydoc:with" in [s["source"] for s in body["sources"]]
            assert "context manager" in body["answer"]
            seed = httpx.post(f"{running.url}/rag", json={"query": "How does the try statement work?"}).json()
            assert "try" in seed["result"].lower()
    finally:
        get_settings.cache_clear()
