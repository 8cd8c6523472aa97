"""The errors a user of gpurag can meet; every one derives from `GpuragError`."""

from __future__ import annotations


class GpuragError(Exception):
    """Root of every error gpurag raises on purpose."""


class InvalidInputError(GpuragError, ValueError):
    """An argument has the wrong shape, type or value; the message names it, what was expected and what came."""


class BackendUnavailableError(GpuragError, RuntimeError):
    """A distance backend was asked for that is unknown or cannot run here; the message lists what is installed."""


class IndexFormatError(GpuragError, ValueError):
    """An index directory is missing, damaged or of an unknown format; the message names the file."""


class PluginError(GpuragError, RuntimeError):
    """A plugin broke a rule: two plugins registered one name, or a hook implementation is misspelled."""


class UnsupportedError(GpuragError, NotImplementedError):
    """A backend or retriever was asked for something it does not do (a metric, a k beyond its limit)."""


class GenerationError(GpuragError, RuntimeError):
    """A generator's model or endpoint failed; the message names the endpoint, the status and what it said."""
