"""gpurag: exact and approximate nearest-neighbour search on GPUs and CPUs, and RAG built on it.

Importing this package imports nothing heavy: backends load through entry points when first asked for.
"""

from gpurag.backend import Availability, Database, DistanceBackend
from gpurag.errors import (
    BackendUnavailableError,
    GpuragError,
    IndexFormatError,
    InvalidInputError,
    PluginError,
    UnsupportedError,
)
from gpurag.hookspecs import hookimpl
from gpurag.metrics import Metric, SearchResult, TopK
from gpurag.plugins import get_backend, get_registry, get_retriever
from gpurag.retriever import ExactRetriever, Retriever
from gpurag.settings import Settings, get_settings

__all__ = [
    "Availability",
    "BackendUnavailableError",
    "Database",
    "DistanceBackend",
    "ExactRetriever",
    "GpuragError",
    "IndexFormatError",
    "InvalidInputError",
    "Metric",
    "PluginError",
    "Retriever",
    "SearchResult",
    "Settings",
    "TopK",
    "UnsupportedError",
    "get_backend",
    "get_registry",
    "get_retriever",
    "get_settings",
    "hookimpl",
]
