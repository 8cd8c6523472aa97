"""A corpus index: the chunks of a corpus, their vectors in a retriever, and the embedder that made them.

On disk it is a directory written atomically and checked on load (see `gpurag.storage`)::

    manifest.json    kind "corpus", the embedder (name, dim), the retriever, the chunk count, checksums
    chunks.jsonl     one chunk a line: text, source, position, start, metadata (line i has id i)
    index/           the retriever's own index directory, with its own manifest
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpurag import storage
from gpurag.errors import IndexFormatError, InvalidInputError
from gpurag.rag.types import Chunk, Embedder, Passage
from gpurag.retriever import Retriever
from gpurag.settings import get_settings

#: The manifest's ``kind`` for a corpus index.
KIND = "corpus"
CHUNKS_FILE = "chunks.jsonl"
INDEX_DIR = "index"

#: Called after each embedded batch with the number of chunks it held.
Progress = Callable[[int], None]


def check_embedder(embedder: Embedder, name: str, dim: int, where: str) -> None:
    """Raise `InvalidInputError` naming both embedders if ``embedder`` is not the one (``name``, ``dim``)."""
    if embedder.name != name or int(embedder.dim) != int(dim):
        raise InvalidInputError(
            f"embedder {embedder.name!r} (dim {embedder.dim}) does not match the corpus {where}, "
            f"which was built with embedder {name!r} (dim {dim}); "
            "load it with that embedder or rebuild the index"
        )


class CorpusIndex:
    """Chunks, their vectors in a retriever (ids 0..N-1 are chunk positions), and the embedder's name and dim.

    Make one with `build` or `load`; `search` turns query vectors into passages.
    """

    def __init__(
        self,
        retriever: Retriever,
        chunks: Sequence[Chunk],
        embedder_name: str,
        embedder_dim: int,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if len(retriever) != len(chunks):
            raise InvalidInputError(f"the retriever holds {len(retriever)} vectors but {len(chunks)} chunks were given")
        if retriever.dim is not None and retriever.dim != embedder_dim:
            raise InvalidInputError(
                f"the retriever has dimension {retriever.dim}, embedder {embedder_name!r} has {embedder_dim}"
            )
        self.retriever = retriever
        self.chunks: list[Chunk] = list(chunks)
        self.embedder_name = embedder_name
        self.embedder_dim = int(embedder_dim)
        #: Free-form facts recorded in the manifest (chunk settings, build time...).
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __len__(self) -> int:
        return len(self.chunks)

    def __repr__(self) -> str:
        return (
            f"CorpusIndex(chunks={len(self)}, embedder={self.embedder_name!r}, dim={self.embedder_dim}, "
            f"retriever={self.retriever.name!r})"
        )

    @property
    def sources(self) -> list[str]:
        """The distinct sources of the chunks, in order of first appearance."""
        return list(dict.fromkeys(chunk.source for chunk in self.chunks))

    @classmethod
    def build(
        cls,
        chunks: Sequence[Chunk],
        embedder: Embedder,
        retriever: str | Retriever = "exact",
        *,
        progress: Progress | None = None,
        batch_size: int | None = None,
        backend: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CorpusIndex:
        """Embed ``chunks`` in batches and index them with ``retriever`` (a registered name or an empty one).

        :param progress: called after each batch with the number of chunks it embedded.
        :param batch_size: chunks per call to the embedder; None takes the ``embed_batch_size`` setting.
        :param backend: distance backend for a retriever given by name; None takes the ``backend`` setting.
        :param metadata: extra facts to record in the manifest.
        """
        chunk_list = list(chunks)
        if not chunk_list:
            raise InvalidInputError("chunks is empty: there is nothing to index")
        for i, chunk in enumerate(chunk_list):
            if not isinstance(chunk, Chunk):
                raise InvalidInputError(f"chunks[{i}] must be a Chunk; got {type(chunk).__name__}")
        size = batch_size or get_settings().embed_batch_size
        if size < 1:
            raise InvalidInputError(f"batch_size must be >= 1; got {size}")
        index = _make_retriever(retriever, backend)
        if len(index):
            raise InvalidInputError(f"retriever must be empty; it holds {len(index)} vectors")
        started = time.perf_counter()
        batches: list[np.ndarray[Any, Any]] = []
        for start in range(0, len(chunk_list), size):
            batch = chunk_list[start : start + size]
            vectors = np.asarray(embedder.embed_batch([chunk.text for chunk in batch]), dtype=np.float32)
            if vectors.shape != (len(batch), embedder.dim):
                raise InvalidInputError(
                    f"embedder {embedder.name!r} returned shape {vectors.shape} for {len(batch)} texts; "
                    f"expected ({len(batch)}, {embedder.dim})"
                )
            batches.append(vectors)
            if progress is not None:
                progress(len(batch))
        # One add: appending batch by batch would copy the growing index each time.
        index.add(np.concatenate(batches), ids=np.arange(len(chunk_list), dtype=np.int64))
        facts = {"build_s": round(time.perf_counter() - started, 3), **(metadata or {})}
        return cls(index, chunk_list, embedder.name, embedder.dim, facts)

    def search(self, query_vectors: Any, k: int) -> list[list[Passage]]:
        """The ``k`` best passages for each query vector, best first (fewer where the corpus is smaller)."""
        result = self.retriever.search(query_vectors, k)
        passages: list[list[Passage]] = []
        for scores, ids in zip(result.scores, result.ids, strict=True):
            row: list[Passage] = []
            for score, chunk_id in zip(scores.tolist(), ids.tolist(), strict=True):
                if chunk_id < 0:
                    continue
                chunk = self.chunks[chunk_id]
                row.append(Passage(id=int(chunk_id), score=float(score), text=chunk.text, source=chunk.source))
            passages.append(row)
        return passages

    def manifest(self) -> dict[str, Any]:
        """What the manifest records besides checksums: kind, embedder, retriever, chunk count, metadata."""
        return {
            "kind": KIND,
            "embedder": {"name": self.embedder_name, "dim": self.embedder_dim},
            "retriever": {
                "name": self.retriever.name,
                "metric": self.retriever.metric.value,
                "path": INDEX_DIR,
            },
            "chunks": {"file": CHUNKS_FILE, "count": len(self.chunks), "sources": len(self.sources)},
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the corpus to directory ``path`` atomically; an existing corpus there is replaced."""
        with storage.atomic_directory(path) as tmp:
            with (tmp / CHUNKS_FILE).open("w", encoding="utf-8") as handle:
                for i, chunk in enumerate(self.chunks):
                    handle.write(_chunk_line(chunk, i))
                    handle.write("\n")
            self.retriever.save(tmp / INDEX_DIR)
            storage.write_manifest(tmp, self.manifest(), files=[CHUNKS_FILE, f"{INDEX_DIR}/{storage.MANIFEST}"])

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        embedder: Embedder | None = None,
        *,
        backend: str | None = None,
    ) -> CorpusIndex:
        """Read a corpus that `save` wrote, checking every file.

        :param embedder: if given, it must be the embedder that built the corpus (same name and dim),
            else `InvalidInputError` naming both.
        :param backend: distance backend to search on; None takes the ``backend`` setting.
        """
        manifest = read_corpus_manifest(path)
        where = Path(manifest["path"])
        name, dim = manifest["embedder"]["name"], manifest["embedder"]["dim"]
        if embedder is not None:
            check_embedder(embedder, name, dim, f"at {str(where)!r}")
        retriever_name = manifest["retriever"]["name"]
        from gpurag.plugins import lookup

        try:
            retriever_class = lookup("retrievers", retriever_name)
        except InvalidInputError as exc:
            raise IndexFormatError(
                f"{where / storage.MANIFEST} names retriever {retriever_name!r}, which is not installed: {exc}"
            ) from exc
        retriever = retriever_class.load(where / INDEX_DIR, backend=backend or get_settings().backend)
        chunks = _read_chunks(where / CHUNKS_FILE)
        count = manifest["chunks"]["count"]
        if len(chunks) != count or len(retriever) != count:
            raise IndexFormatError(
                f"{where} is inconsistent: the manifest says {count} chunks, "
                f"{CHUNKS_FILE} holds {len(chunks)} and the index {len(retriever)} vectors"
            )
        return cls(retriever, chunks, name, dim, manifest.get("metadata") or {})


def read_corpus_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked manifest of the corpus at ``path``; `IndexFormatError` if missing, damaged or no corpus."""
    manifest = storage.read_manifest(path, kind=KIND)
    where = Path(manifest["path"]) / storage.MANIFEST
    try:
        name, dim = manifest["embedder"]["name"], manifest["embedder"]["dim"]
        retriever, count = manifest["retriever"]["name"], manifest["chunks"]["count"]
    except (KeyError, TypeError) as exc:
        raise IndexFormatError(f"{where} is damaged: missing entry {exc}") from exc
    if not isinstance(name, str) or isinstance(dim, bool) or not isinstance(dim, int):
        raise IndexFormatError(f"{where} is damaged: embedder must have a str name and an int dim")
    if not isinstance(retriever, str) or isinstance(count, bool) or not isinstance(count, int):
        raise IndexFormatError(f"{where} is damaged: retriever must have a str name and chunks an int count")
    return manifest


def _make_retriever(retriever: str | Retriever, backend: str | None) -> Retriever:
    if isinstance(retriever, Retriever):
        return retriever
    if not isinstance(retriever, str):
        raise InvalidInputError(f"retriever must be a name or a Retriever; got {type(retriever).__name__}")
    from gpurag.plugins import get_retriever

    made = get_retriever(retriever, metric="cosine", backend=backend or get_settings().backend)
    if not isinstance(made, Retriever):
        raise InvalidInputError(f"retriever {retriever!r} is not a Retriever; got {type(made).__name__}")
    return made


def _chunk_line(chunk: Chunk, position: int) -> str:
    record = {
        "text": chunk.text,
        "source": chunk.source,
        "position": chunk.position,
        "start": chunk.start,
        "metadata": chunk.metadata,
    }
    try:
        return json.dumps(record, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"chunk {position} (source {chunk.source!r}) has metadata that is not JSON-serialisable: {exc}"
        ) from exc


def _read_chunks(path: Path) -> list[Chunk]:
    chunks: list[Chunk] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
                chunks.append(
                    Chunk(
                        text=record["text"],
                        source=record["source"],
                        position=int(record["position"]),
                        start=int(record["start"]),
                        metadata=dict(record.get("metadata") or {}),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise IndexFormatError(f"{path} is damaged at line {number}: {exc}") from exc
    return chunks
