"""The one plugin manager, the registries it fills, and lookups by name: `get_backend`, `get_retriever`."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import sys
import threading
from typing import Any

import pluggy

from gpurag import hookspecs
from gpurag.backend import Availability, DistanceBackend
from gpurag.errors import BackendUnavailableError, InvalidInputError, PluginError
from gpurag.metrics import Metric
from gpurag.settings import get_settings

#: The entry-point group third-party distributions announce themselves in.
ENTRY_POINT_GROUP = "gpurag"

#: The core's own plugins, registered through the same hooks as everyone else's.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "gpurag.builtin_plugins",
    "gpurag.rag.embedders",
    "gpurag.rag.generators",
    "gpurag.rag.commands",
    "gpurag.scaling",
)

#: Registration hooks and the registry each one fills.
REGISTRIES: dict[str, str] = {
    "backends": "register_backends",
    "retrievers": "register_retrievers",
    "embedders": "register_embedders",
    "generators": "register_generators",
    "dispatchers": "register_dispatchers",
    "node_providers": "register_node_providers",
    "scaling_policies": "register_scaling_policies",
}


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its name, the distribution that ships it, and that distribution's version."""

    name: str
    distribution: str
    version: str
    builtin: bool


@dataclasses.dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, and why."""

    name: str
    distribution: str
    error: str


@dataclasses.dataclass(frozen=True)
class Registration:
    """One object a plugin registered: the object, its name, and the plugin that registered it."""

    obj: Any
    name: str
    plugin: str
    distribution: str


class _State:
    """The lazily built manager, what it loaded, and the registries filled from it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.manager: pluggy.PluginManager | None = None
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginFailure] = []
        self.registries: dict[str, dict[str, Registration]] = {}
        self.backends: dict[tuple[str, str], DistanceBackend] = {}


_state = _State()


def _core_version() -> str:
    try:
        return importlib.metadata.version("gpurag")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _allow_list() -> set[str] | None:
    raw = get_settings().plugins
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _build_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("gpurag")
    manager.add_hookspecs(hookspecs)
    version = _core_version()
    for module_name in DEFAULT_PLUGINS:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # reported by `gpurag plugins`, never fatal
            _state.failures.append(PluginFailure(module_name, "gpurag", f"{type(exc).__name__}: {exc}"))
            continue
        manager.register(module, name=module_name)
        _state.plugins[module_name] = PluginInfo(module_name, "gpurag", version, builtin=True)

    allowed = _allow_list()
    for entry_point in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = entry_point.dist
        dist_name = dist.name if dist is not None else "unknown"
        dist_version = dist.version if dist is not None else "unknown"
        if allowed is not None and entry_point.name not in allowed and dist_name not in allowed:
            continue
        if manager.has_plugin(entry_point.name):
            continue
        try:
            module = entry_point.load()
            if manager.is_registered(module):
                continue
            manager.register(module, name=entry_point.name)
        except Exception as exc:  # a broken plugin is reported, never fatal
            _state.failures.append(PluginFailure(entry_point.name, dist_name, f"{type(exc).__name__}: {exc}"))
            continue
        _state.plugins[entry_point.name] = PluginInfo(entry_point.name, dist_name, dist_version, builtin=False)

    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements a hook gpurag does not define: {exc}") from exc
    if get_settings().trace_plugins:
        manager.trace.root.setwriter(lambda message: sys.stderr.write(message))
        manager.enable_tracing()
    return manager


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    with _state.lock:
        if _state.manager is None:
            _state.manager = _build_manager()
        return _state.manager


def reset_plugins() -> None:
    """Forget the manager and everything registered, so the next lookup loads plugins afresh."""
    global _state
    _state = _State()


def loaded_plugins() -> list[PluginInfo]:
    """Every plugin loaded, built-ins first."""
    get_plugin_manager()
    return sorted(_state.plugins.values(), key=lambda p: (not p.builtin, p.name))


def failed_plugins() -> list[PluginFailure]:
    """Every plugin that failed to load, with the error it raised."""
    get_plugin_manager()
    return list(_state.failures)


def register_plugin(plugin: object, name: str) -> None:
    """Register ``plugin`` (a module or object with hook implementations) now, as an entry point would."""
    manager = get_plugin_manager()
    with _state.lock:
        manager.register(plugin, name=name)
        try:
            manager.check_pending()
        except pluggy.PluginValidationError as exc:
            manager.unregister(name=name)
            raise PluginError(f"plugin {name!r} implements a hook gpurag does not define: {exc}") from exc
        module = getattr(plugin, "__module__", None) or getattr(plugin, "__name__", name)
        _state.plugins[name] = PluginInfo(name, str(module).split(".")[0], "unknown", builtin=False)
        _state.registries.clear()
        _state.backends.clear()


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with `register_plugin`."""
    manager = get_plugin_manager()
    with _state.lock:
        manager.unregister(name=name)
        _state.plugins.pop(name, None)
        _state.registries.clear()
        _state.backends.clear()


def get_registry(kind: str) -> dict[str, Registration]:
    """Everything registered through the hook for ``kind`` (``backends``, ``retrievers``...), by name."""
    if kind not in REGISTRIES:
        raise InvalidInputError(f"kind must be one of {', '.join(REGISTRIES)}; got {kind!r}")
    manager = get_plugin_manager()
    with _state.lock:
        if kind in _state.registries:
            return _state.registries[kind]
        registry: dict[str, Registration] = {}
        hook_caller = getattr(manager.hook, REGISTRIES[kind])
        # Call each implementation with a `register` that knows its plugin, so clashes name both.
        for impl in reversed(hook_caller.get_hookimpls()):
            plugin_name = impl.plugin_name
            info = _state.plugins.get(plugin_name)
            distribution = info.distribution if info else plugin_name

            def register(obj: Any, name: str, *, _plugin: str = plugin_name, _dist: str = distribution) -> None:
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_plugin!r} registered a {kind[:-1]} without a name")
                if name in registry:
                    first = registry[name]
                    raise PluginError(
                        f"{kind[:-1]} {name!r} is registered twice: by plugin {first.plugin!r} "
                        f"(distribution {first.distribution}) and by plugin {_plugin!r} (distribution {_dist})"
                    )
                registry[name] = Registration(obj, name, _plugin, _dist)

            if _state.manager is not None and get_settings().trace_plugins:
                sys.stderr.write(f"gpurag: calling {REGISTRIES[kind]} of plugin {plugin_name!r}\n")
            impl.function(register=register)
        _state.registries[kind] = registry
        return registry


def backend_availability() -> dict[str, Availability]:
    """Each registered backend's availability, by name."""
    result: dict[str, Availability] = {}
    for name, registration in get_registry("backends").items():
        try:
            result[name] = registration.obj.availability()
        except Exception as exc:  # a backend that cannot even tell is unavailable, with the reason
            result[name] = Availability(False, f"availability() raised {type(exc).__name__}: {exc}")
    return result


def _describe_backends() -> str:
    lines = []
    for name, availability in sorted(backend_availability().items()):
        state = "available" if availability.available else f"unavailable: {availability.reason}"
        lines.append(f"  {name} ({state})")
    for failure in failed_plugins():
        lines.append(f"  plugin {failure.name!r} from {failure.distribution} failed to load: {failure.error}")
    allowed = _allow_list()
    if allowed is not None:
        lines.append(f"  GPURAG_PLUGINS limits plugins to: {', '.join(sorted(allowed)) or '(built-ins only)'}")
    return "\n".join(lines) if lines else "  (no backend is installed; pip install gpurag-numpy)"


def _device_kind(device: str) -> str:
    return device.strip().split(":", 1)[0].lower() if isinstance(device, str) else ""


def _first_available(
    registry: dict[str, Any],
    device: str | None,
    wanted_metric: Metric | None,
    *,
    cpu_first: bool,
    queries: int | None = None,
) -> tuple[DistanceBackend, str]:
    """The first backend in `auto`'s order that opens ``device``, and why it was chosen.

    With ``cpu_first``, `cpu_backend_preference` then `backend_preference`; otherwise the measured
    table's ranking for the device kind (``cuda`` when no device is named), metric and query bucket,
    then `backend_preference` (see `gpurag.auto`).
    """
    from gpurag import auto

    settings = get_settings()
    if cpu_first:
        preferred = (*settings.cpu_backend_preference, *settings.backend_preference)
        plan = None
    else:
        kind = _device_kind(device) if device is not None else "cuda"
        plan = auto.ranking(kind, wanted_metric, queries, settings.backend_preference)
        preferred = plan.order
    order = [n for n in dict.fromkeys(preferred) if n in registry]
    order += sorted(n for n in registry if n not in order)
    available = backend_availability()
    for candidate in order:
        cls = registry[candidate].obj
        if not available[candidate]:
            continue
        if device is not None and _device_kind(device) not in cls.device_kinds:
            continue
        if wanted_metric is not None and wanted_metric not in cls.metrics:
            continue
        try:
            chosen = get_backend(candidate, device)
        except (BackendUnavailableError, InvalidInputError):  # available, but it lacks this device ("cuda:0")
            continue
        if plan is None:
            reason = f"device kind cpu: cpu_backend_preference ({', '.join(settings.cpu_backend_preference)}) first"
        else:
            reason = plan.reason(candidate)
        return chosen, reason
    where = f" for device {device!r}" if device else ""
    needs = f" with metric {wanted_metric.value!r}" if wanted_metric else ""
    raise BackendUnavailableError(f"no distance backend is available{where}{needs}. Installed:\n{_describe_backends()}")


def auto_choice(
    device: str | None = None, *, metric: Metric | str | None = None, queries: int | None = None
) -> tuple[DistanceBackend, str]:
    """The backend ``get_backend("auto", ...)`` returns for these arguments, and the reason it does."""
    wanted_metric = None if metric is None else Metric.parse(metric)
    registry = get_registry("backends")
    kind = _device_kind(device) if device is not None else None
    chosen, reason = _first_available(registry, device, wanted_metric, cpu_first=kind == "cpu", queries=queries)
    if device is None and _device_kind(chosen.device) == "cpu" and get_settings().cpu_backend_preference:
        chosen, reason = _first_available(registry, "cpu", wanted_metric, cpu_first=True)  # landed on the CPU
        reason = f"no GPU backend runs here; {reason}"
    return chosen, reason


def get_backend(
    name: str | DistanceBackend = "auto",
    device: str | None = None,
    *,
    metric: Metric | str | None = None,
    queries: int | None = None,
) -> DistanceBackend:
    """The backend ``name`` on ``device``, or for ``"auto"`` the fastest available one by the measured table.

    ``"auto"`` skips backends that cannot run on ``device``'s kind or lack ``metric``. On a GPU (a
    ``cuda`` device, or none named) it tries first the backends the last GPU report found fastest for
    the metric and the bucket of ``queries`` (default: the ``auto_queries`` setting), then the
    ``backend_preference`` order (`gpurag.auto`); on device kind ``cpu`` (named, or where the first
    choice would run) it tries ``cpu_backend_preference`` first,
    so numpy, the tuned CPU backend, wins over torch there. Devices are
    normalised (``"CPU"`` and ``"cpu:0"`` are ``"cpu"``) and instances cached per (name, device). An
    unknown or unavailable name raises `BackendUnavailableError` listing every installed backend and
    why each unavailable one is; a device that does not exist, an `InvalidInputError`.
    """
    if isinstance(name, DistanceBackend):
        return name
    if not isinstance(name, str):
        raise InvalidInputError(f"backend must be a name or a DistanceBackend; got {type(name).__name__}")
    if name == "auto":
        return auto_choice(device, metric=metric, queries=queries)[0]
    if metric is not None:
        Metric.parse(metric)  # a bad metric name is an error whichever backend is named
    registry = get_registry("backends")
    if name not in registry:
        raise BackendUnavailableError(f"unknown backend {name!r}. Installed:\n{_describe_backends()}")
    cls = registry[name].obj
    availability = backend_availability()[name]
    if not availability:
        raise BackendUnavailableError(
            f"backend {name!r} is unavailable: {availability.reason}. Installed:\n{_describe_backends()}"
        )
    if device is not None and _device_kind(device) not in cls.device_kinds:
        raise BackendUnavailableError(
            f"backend {name!r} runs on {', '.join(cls.device_kinds)}; device {device!r} was asked for"
        )
    key = (name, cls.normalize_device(device))
    with _state.lock:
        if key not in _state.backends:
            _state.backends[key] = cls(device=key[1])
        return _state.backends[key]


def lookup(kind: str, name: str) -> Any:
    """The object registered as ``name`` for ``kind``; an unknown name lists the registered ones."""
    registry = get_registry(kind)
    if name not in registry:
        known = ", ".join(sorted(registry)) or "(none)"
        raise InvalidInputError(f"unknown {kind[:-1].replace('_', ' ')} {name!r}; registered: {known}")
    return registry[name].obj


def get_retriever(name: str = "exact", **options: Any) -> Any:
    """A new retriever of the kind registered as ``name`` (``exact``, ``lsh``...), built with ``options``."""
    return lookup("retrievers", name)(**options)
