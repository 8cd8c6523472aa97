"""The default corpus: Python's language reference as CPython ships it (`pydoc_data.topics`).

Each pydoc topic is one document whose source is ``pydoc:<topic>`` (``pydoc:with``, ``pydoc:try``)
and whose title is the topic; its chunks also carry the section headings above them (``with >
The "with" statement``), which are embedded and lexically indexed with the text. It is chunked
and indexed on first use and cached under the ``cache_dir`` setting, keyed by the
Python version, the topics' text, the embedder and the chunk settings; later calls load the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpurag.errors import IndexFormatError
from gpurag.rag.corpus import CorpusIndex, Progress
from gpurag.rag.types import Chunk, Document, Embedder
from gpurag.settings import get_settings

#: Bump when the way the default corpus is made changes, so old caches are not reused.
CACHE_VERSION = 3  # 2: titled chunks and a lexical index; 3: a document index
SOURCE_PREFIX = "pydoc:"


def topics() -> dict[str, str]:
    """The pydoc topics of this Python: topic name -> text."""
    from pydoc_data.topics import topics as pydoc_topics

    return {str(name): str(text) for name, text in pydoc_topics.items()}


def default_documents() -> list[Document]:
    """One document per pydoc topic, sorted by topic, with source ``pydoc:<topic>``."""
    return [
        Document(text=text, source=f"{SOURCE_PREFIX}{name}", metadata={"topic": name, "title": name})
        for name, text in sorted(topics().items())
        if text.strip()
    ]


def cache_key(embedder: Embedder, retriever: str = "exact", titles: bool = True) -> dict[str, Any]:
    """What the cached index depends on: Python and topics, embedder, chunk settings, retriever, titles."""
    settings = get_settings()
    digest = hashlib.sha256()
    for name, text in sorted(topics().items()):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(text.encode())
        digest.update(b"\0")
    return {
        "cache_version": CACHE_VERSION,
        "python": ".".join(map(str, sys.version_info[:3])),
        "topics_sha256": digest.hexdigest(),
        "embedder": embedder.name,
        "dim": embedder.dim,
        "chunk_size": settings.chunk_size,
        "chunk_overlap": settings.chunk_overlap,
        "chunk_unit": settings.chunk_unit,
        "retriever": retriever,
        "titles": titles,
    }


def cache_path(
    embedder: Embedder, retriever: str = "exact", cache_dir: Path | None = None, titles: bool = True
) -> Path:
    """The directory the default corpus for ``embedder`` is cached in."""
    key = cache_key(embedder, retriever, titles)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", embedder.name).strip("._-")[-40:] or "embedder"
    name = f"py{key['python']}-{slug}-{key['chunk_unit']}{key['chunk_size']}-{digest}"
    return Path(cache_dir or get_settings().cache_dir) / "default-corpus" / name


def load_default_corpus(
    embedder: Embedder | None = None,
    *,
    retriever: str = "exact",
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    rebuild: bool = False,
    titles: bool = True,
) -> CorpusIndex:
    """The default corpus indexed with ``embedder`` (None: the default embedder), from the cache if there.

    The first call (or ``rebuild=True``, or a damaged cache) chunks and embeds the topics and saves
    the index atomically; ``progress`` sees each embedded batch. Two processes building at once take
    turns on a lock file, so the second loads what the first saved. ``titles=False`` indexes the
    chunks' text alone (as gpurag did before titled chunks; kept for comparison).
    """
    if embedder is None:
        from gpurag.rag.embedders import get_embedder

        embedder = get_embedder()
    path = cache_path(embedder, retriever, cache_dir, titles)
    if not rebuild:
        cached = _try_load(path, embedder)
        if cached is not None:
            return cached
    with contextlib.ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_exclusive(path.parent / f".{path.name}.lock"))
        except OSError as exc:
            warnings.warn(
                f"the default corpus cannot be cached in {path.parent} ({exc}); it is built for this process only",
                stacklevel=2,
            )
            return build_default_corpus(embedder, retriever=retriever, progress=progress, titles=titles)
        if not rebuild:
            cached = _try_load(path, embedder)  # another process may have built it while we waited
            if cached is not None:
                return cached
        corpus = build_default_corpus(embedder, retriever=retriever, progress=progress, titles=titles)
        try:
            corpus.save(path)
        except OSError as exc:
            warnings.warn(f"the default corpus could not be cached at {path} ({exc})", stacklevel=2)
        return corpus


def build_default_corpus(
    embedder: Embedder, *, retriever: str = "exact", progress: Progress | None = None, titles: bool = True
) -> CorpusIndex:
    """Chunk and index the pydoc topics with ``embedder`` and the chunk settings (no cache involved)."""
    return CorpusIndex.build(
        default_chunks(),
        embedder,
        retriever,
        progress=progress,
        metadata={"corpus": "default", **cache_key(embedder, retriever, titles)},
        titles=titles,
    )


def default_chunks() -> list[Chunk]:
    """The default corpus's chunks under the current chunk settings."""
    from gpurag.rag.chunking import chunk_documents

    settings = get_settings()
    return chunk_documents(
        default_documents(),
        size=settings.chunk_size,
        overlap=settings.chunk_overlap,
        unit=settings.chunk_unit,
    )


def is_cached(embedder: Embedder, retriever: str = "exact", cache_dir: Path | None = None) -> bool:
    """Whether a default corpus for ``embedder`` is in the cache (it is checked only when loaded)."""
    return (cache_path(embedder, retriever, cache_dir) / "manifest.json").is_file()


def _try_load(path: Path, embedder: Embedder) -> CorpusIndex | None:
    if not path.exists():
        return None
    try:
        return CorpusIndex.load(path, embedder)
    except IndexFormatError:
        return None  # damaged or half-written: rebuild it


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic save alone keeps the cache sound
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
