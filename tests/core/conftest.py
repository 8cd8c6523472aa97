"""Fixtures for the core's tests: a clean plugin manager and settings, and a throwaway backend."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from core_toys import ToyBackend, UnavailableBackend, make_plugin

import gpurag
from gpurag import plugins
from gpurag.backend import DistanceBackend


@pytest.fixture
def fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Plugins and settings re-read from a clean environment, and restored afterwards."""
    for name in ("GPURAG_PLUGINS", "GPURAG_TRACE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    gpurag.get_settings.cache_clear()
    plugins.reset_plugins()
    yield monkeypatch
    monkeypatch.undo()
    gpurag.get_settings.cache_clear()
    plugins.reset_plugins()


@pytest.fixture
def toy_backend(fresh_plugins: pytest.MonkeyPatch) -> DistanceBackend:
    """The toy backend, registered as the plugin ``toy-plugin`` for the test's duration."""

    def register_backends(register: Any) -> None:
        register(ToyBackend, "toy")
        register(UnavailableBackend, "nowhere")

    plugins.register_plugin(make_plugin(register_backends=register_backends), "toy-plugin")
    return gpurag.get_backend("toy")
