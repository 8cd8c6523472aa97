"""The plugin manager: built-ins, entry points, the allow-list, failures, clashes, lookups."""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any

import pytest
from core_toys import ToyBackend, UnavailableBackend, make_plugin

import gpurag
from gpurag import plugins
from gpurag.errors import BackendUnavailableError, InvalidInputError, PluginError
from gpurag.metrics import Metric


class FakeEntryPoint:
    """An entry point whose load() returns a given object or raises."""

    def __init__(self, name: str, target: Any = None, error: Exception | None = None) -> None:
        self.name = name
        self.target = target
        self.error = error
        self.dist = type("Dist", (), {"name": f"dist-{name}", "version": "9.9"})()

    def load(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.target


def with_entry_points(monkeypatch: pytest.MonkeyPatch, extra: list[FakeEntryPoint]) -> None:
    real = importlib.metadata.entry_points

    def entry_points(**kwargs: Any) -> Any:
        return list(real(**kwargs)) + extra

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_builtin_plugins_register_the_exact_retriever(fresh_plugins: pytest.MonkeyPatch) -> None:
    registration = gpurag.get_registry("retrievers")["exact"]
    assert registration.obj is gpurag.ExactRetriever
    assert registration.distribution == "gpurag"


def test_numpy_backend_comes_through_its_entry_point(fresh_plugins: pytest.MonkeyPatch) -> None:
    registration = gpurag.get_registry("backends")["numpy"]
    assert registration.plugin == "numpy"
    assert registration.distribution == "gpurag-numpy"


class _NoL1(ToyBackend):
    name = "no-l1"
    metrics = frozenset({Metric.L2, Metric.DOT, Metric.COSINE})


class _GpuOnly(ToyBackend):
    name = "gpu-only"
    device_kinds = ("cuda",)


def _preferring(fresh: pytest.MonkeyPatch, *order: str, cpu: tuple[str, ...] | None = None) -> None:
    """Prefer ``order``; on the CPU (where the toy backends run) ``cpu``, by default the same order."""
    fresh.setenv("GPURAG_BACKEND_PREFERENCE", json.dumps(list(order)))
    fresh.setenv("GPURAG_CPU_BACKEND_PREFERENCE", json.dumps(list(order if cpu is None else cpu)))
    gpurag.get_settings.cache_clear()


@pytest.fixture
def ranked_backends(fresh_plugins: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    def register_backends(register: Any) -> None:
        for cls in (ToyBackend, UnavailableBackend, _NoL1, _GpuOnly):
            register(cls, cls.name)

    plugins.register_plugin(make_plugin(register_backends=register_backends), "ranked-plugin")
    return fresh_plugins


def test_auto_follows_the_preference_order_skipping_unavailable_backends(ranked_backends: pytest.MonkeyPatch) -> None:
    _preferring(ranked_backends, "nowhere", "no-l1", "toy", "numpy")
    backend = gpurag.get_backend("auto")
    assert backend.name == "no-l1"
    assert gpurag.get_backend("auto") is backend  # one instance per (name, device)
    _preferring(ranked_backends, "toy", "no-l1", "numpy")
    assert gpurag.get_backend("auto").name == "toy"
    _preferring(ranked_backends, "numpy", "toy")
    assert gpurag.get_backend("auto").name == "numpy"


def test_auto_skips_backends_that_lack_the_metric_or_the_device(ranked_backends: pytest.MonkeyPatch) -> None:
    _preferring(ranked_backends, "gpu-only", "no-l1", "toy", "numpy")
    assert gpurag.get_backend("auto").name == "gpu-only"
    assert gpurag.get_backend("auto", device="CPU").name == "no-l1"  # gpu-only runs on cuda only
    assert gpurag.get_backend("auto", device="cpu", metric="l1").name == "toy"
    index = gpurag.ExactRetriever(metric="l1", backend="auto", device="cpu")
    assert index.backend.name == "toy"


def test_auto_on_the_cpu_tries_the_cpu_preference_first(ranked_backends: pytest.MonkeyPatch) -> None:
    _preferring(ranked_backends, "gpu-only", "toy", "numpy", cpu=("numpy",))
    assert gpurag.get_backend("auto").name == "gpu-only"  # lands on cuda: the general order holds
    assert gpurag.get_backend("auto", device="cpu").name == "numpy"
    assert gpurag.get_backend("auto", device="cpu", metric="l1").name == "numpy"
    _preferring(ranked_backends, "toy", "numpy", cpu=("numpy",))
    assert gpurag.get_backend("auto").name == "numpy"  # toy would run on the CPU: the CPU order decides
    _preferring(ranked_backends, "toy", "numpy", cpu=())
    assert gpurag.get_backend("auto").name == "toy"
    assert gpurag.get_backend("auto", device="cpu").name == "toy"


def test_auto_says_when_no_backend_has_the_metric(fresh_plugins: pytest.MonkeyPatch) -> None:
    fresh_plugins.setenv("GPURAG_PLUGINS", "")  # the built-ins only: no entry-point backends
    gpurag.get_settings.cache_clear()
    plugins.reset_plugins()
    plugins.register_plugin(make_plugin(register_backends=lambda register: register(_NoL1, "no-l1")), "only")
    assert gpurag.get_backend("auto", metric="l2").name == "no-l1"
    with pytest.raises(BackendUnavailableError, match="with metric 'l1'"):
        gpurag.get_backend("auto", metric="l1")


def test_a_throwaway_plugin_registers_a_backend(toy_backend: ToyBackend) -> None:
    assert isinstance(toy_backend, ToyBackend)
    assert gpurag.get_registry("backends")["toy"].plugin == "toy-plugin"


def test_unknown_backend_error_lists_what_is_installed_and_why(toy_backend: ToyBackend) -> None:
    with pytest.raises(BackendUnavailableError) as caught:
        gpurag.get_backend("warp-drive")
    message = str(caught.value)
    assert "warp-drive" in message
    assert "toy (available)" in message
    assert "nowhere (unavailable: needs a device this machine lacks)" in message


def test_unavailable_backend_error_says_why(toy_backend: ToyBackend) -> None:
    with pytest.raises(BackendUnavailableError, match="needs a device this machine lacks"):
        gpurag.get_backend("nowhere")


def test_backend_on_a_device_kind_it_does_not_run_on(fresh_plugins: pytest.MonkeyPatch) -> None:
    fresh_plugins.setenv(
        "GPURAG_PLUGINS", ""
    )  # no installed backend (a GPU machine has some for cuda:0): the toy alone
    gpurag.get_settings.cache_clear()
    plugins.register_plugin(make_plugin(register_backends=lambda register: register(ToyBackend, "toy")), "toy-plugin")
    assert gpurag.get_backend("toy").name == "toy"
    with pytest.raises(BackendUnavailableError, match=r"runs on cpu; device 'cuda:1'"):
        gpurag.get_backend("toy", device="cuda:1")
    with pytest.raises(BackendUnavailableError, match="no distance backend is available for device 'cuda:0'"):
        gpurag.get_backend("auto", device="cuda:0")


def test_allow_list_loads_only_named_entry_points(fresh_plugins: pytest.MonkeyPatch) -> None:
    fresh_plugins.setenv("GPURAG_PLUGINS", "")
    gpurag.get_settings.cache_clear()
    assert "numpy" not in gpurag.get_registry("backends")
    assert "exact" in gpurag.get_registry("retrievers")  # built-ins always load
    with pytest.raises(BackendUnavailableError, match="GPURAG_PLUGINS limits plugins to: \\(built-ins only\\)"):
        gpurag.get_backend("numpy")


def test_allow_list_naming_a_plugin_loads_it(fresh_plugins: pytest.MonkeyPatch) -> None:
    fresh_plugins.setenv("GPURAG_PLUGINS", "numpy")
    gpurag.get_settings.cache_clear()
    assert "numpy" in gpurag.get_registry("backends")


def test_a_plugin_that_fails_to_import_is_reported_not_fatal(fresh_plugins: pytest.MonkeyPatch) -> None:
    with_entry_points(fresh_plugins, [FakeEntryPoint("broken", error=ImportError("no module named warp"))])
    assert "exact" in gpurag.get_registry("retrievers")
    failures = {f.name: f for f in plugins.failed_plugins()}
    assert failures["broken"].distribution == "dist-broken"
    assert "ImportError: no module named warp" in failures["broken"].error
    with pytest.raises(BackendUnavailableError, match="plugin 'broken' from dist-broken failed to load"):
        gpurag.get_backend("warp")


def test_an_entry_point_plugin_is_loaded_with_its_distribution(fresh_plugins: pytest.MonkeyPatch) -> None:
    plugin = make_plugin(register_backends=lambda register: register(ToyBackend, "toy"))
    with_entry_points(fresh_plugins, [FakeEntryPoint("toyep", target=plugin)])
    registration = gpurag.get_registry("backends")["toy"]
    assert (registration.plugin, registration.distribution) == ("toyep", "dist-toyep")
    info = {p.name: p for p in plugins.loaded_plugins()}["toyep"]
    assert (info.version, info.builtin) == ("9.9", False)


def test_two_plugins_registering_one_name_is_an_error_naming_both(fresh_plugins: pytest.MonkeyPatch) -> None:
    first = make_plugin(register_backends=lambda register: register(ToyBackend, "same"))
    second = make_plugin(register_backends=lambda register: register(ToyBackend, "same"))
    with_entry_points(fresh_plugins, [FakeEntryPoint("first", first), FakeEntryPoint("second", second)])
    with pytest.raises(PluginError) as caught:
        gpurag.get_registry("backends")
    message = str(caught.value)
    assert "'same' is registered twice" in message
    assert "dist-first" in message
    assert "dist-second" in message


def test_a_misspelled_hook_fails_loudly(fresh_plugins: pytest.MonkeyPatch) -> None:
    plugin = make_plugin(register_backend=lambda register: None)  # missing "s"
    with pytest.raises(PluginError, match="register_backend"):
        plugins.register_plugin(plugin, "typo")
    assert "typo" not in {p.name for p in plugins.loaded_plugins()}


def test_trace_prints_hook_calls(fresh_plugins: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fresh_plugins.setenv("GPURAG_TRACE_PLUGINS", "1")
    gpurag.get_settings.cache_clear()
    gpurag.get_registry("retrievers")
    assert "calling register_retrievers of plugin 'gpurag.builtin_plugins'" in capsys.readouterr().err


def test_unknown_registry_kind_and_name(fresh_plugins: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInputError, match="kind must be one of"):
        gpurag.get_registry("teleporters")
    with pytest.raises(InvalidInputError, match=r"unknown retriever 'magic'; registered: .*exact"):
        gpurag.get_retriever("magic")


def test_get_retriever_builds_a_registered_retriever(fresh_plugins: pytest.MonkeyPatch) -> None:
    retriever = gpurag.get_retriever("exact", metric="cosine", backend="numpy")
    assert isinstance(retriever, gpurag.ExactRetriever)
    assert retriever.metric is gpurag.Metric.COSINE


def test_importing_gpurag_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gpurag; gpurag.get_backend('numpy'); gpurag.get_registry('embedders');"
        "gpurag.get_registry('generators');"
        "heavy = [m for m in ('torch', 'cupy', 'triton', 'sentence_transformers', 'transformers', 'ray')"
        " if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_device_names_are_normalised_and_one_instance_serves_each_device(fresh_plugins: pytest.MonkeyPatch) -> None:
    backend = gpurag.get_backend("numpy", device="cpu")
    assert backend.device == "cpu"
    assert gpurag.get_backend("numpy", device="cpu:0") is backend
    assert gpurag.get_backend("numpy", device=" CPU ") is backend
    assert gpurag.get_backend("numpy") is backend


@pytest.mark.parametrize("device", ["cpu:7", "cpu:x", "cpu:-1"])
def test_a_device_that_does_not_exist_is_refused_with_those_that_do(
    fresh_plugins: pytest.MonkeyPatch, device: str
) -> None:
    with pytest.raises(InvalidInputError, match=rf"device must be one of cpu for backend 'numpy'; got '{device}'"):
        gpurag.get_backend("numpy", device=device)
