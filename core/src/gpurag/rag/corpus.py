"""A corpus index: the chunks of a corpus, their vectors in a retriever, and the embedder that made them.

On disk it is a directory written atomically and checked on load (see `gpurag.storage`)::

    manifest.json    kind "corpus", the embedder (name, dim), the retriever, the chunk count, checksums
    chunks.jsonl     one chunk a line: text, source, position, start, metadata, title, headings
                     (line i has id i)
    index/           the retriever's own index directory, with its own manifest
    lexical/         the BM25 index of the same chunks (`gpurag.rag.lexical`), with its own manifest
    documents/       whole-document scores of the chunks' documents (`gpurag.rag.documents`), with its own manifest

What is embedded and lexically indexed is each chunk's `Chunk.indexed_text` (its title and
headings, then its text) when the corpus is built with ``titles=True`` (the default), else its
text alone; a passage shows the chunk's text alone either way.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gpurag import storage
from gpurag.errors import IndexFormatError, InvalidInputError
from gpurag.rag.documents import DocumentIndex, document_owners
from gpurag.rag.fusion import Ranking
from gpurag.rag.lexical import LexicalIndex
from gpurag.rag.types import Chunk, Embedder, Passage
from gpurag.retriever import Retriever
from gpurag.settings import get_settings

#: The manifest's ``kind`` for a corpus index.
KIND = "corpus"
CHUNKS_FILE = "chunks.jsonl"
INDEX_DIR = "index"
LEXICAL_DIR = "lexical"
DOCUMENTS_DIR = "documents"

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
        lexical: LexicalIndex | None = None,
        documents: DocumentIndex | None = None,
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
        #: Free-form facts recorded in the manifest (chunk settings, build time, ``titles``...).
        self.metadata: dict[str, Any] = dict(metadata or {})
        if lexical is not None and len(lexical) != len(self.chunks):
            raise InvalidInputError(
                f"the lexical index holds {len(lexical)} documents but {len(chunks)} chunks were given"
            )
        self._lexical = lexical
        self._owners = document_owners(self.chunks)[1]
        if documents is not None and len(documents.owners) != len(self.chunks):
            raise InvalidInputError(
                f"the document index covers {len(documents.owners)} chunks but {len(chunks)} chunks were given"
            )
        self._documents = documents

    @property
    def titles(self) -> bool:
        """Whether titles and headings were indexed with the chunks' text (``titles`` in the metadata)."""
        return bool(self.metadata.get("titles", False))

    def indexed_texts(self) -> list[str]:
        """What was embedded and lexically indexed for each chunk."""
        if self.titles:
            return [chunk.indexed_text() for chunk in self.chunks]
        return [chunk.text for chunk in self.chunks]

    @property
    def lexical(self) -> LexicalIndex:
        """The BM25 index of the chunks; a corpus saved without one gets it built here, once."""
        if self._lexical is None:
            self._lexical = LexicalIndex.build(self.indexed_texts())
        return self._lexical

    @property
    def owners(self) -> npt.NDArray[np.int64]:
        """The document number of each chunk: its source's place in `sources`."""
        return self._owners

    @property
    def documents(self) -> DocumentIndex | None:
        """The whole-document index (None for a corpus saved before it; see `document_index`)."""
        return self._documents

    def document_index(self, embedder: Embedder) -> DocumentIndex:
        """The whole-document index; a corpus saved without one gets it built here, once, with ``embedder``.

        Building it embeds each document's first chunk (one call) and indexes the documents' text.
        """
        if self._documents is None:
            check_embedder(embedder, self.embedder_name, self.embedder_dim, "whose documents are indexed")
            texts = self.indexed_texts()
            rows = np.unique(self._owners, return_index=True)[1]  # each document's first chunk
            vectors = np.zeros((len(self.chunks), self.embedder_dim), dtype=np.float32)
            vectors[rows] = np.asarray(embedder.embed_batch([texts[i] for i in rows.tolist()]), dtype=np.float32)
            self._documents = DocumentIndex.build(self.chunks, vectors, titles=self.titles)
        return self._documents

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
        titles: bool = True,
    ) -> CorpusIndex:
        """Embed ``chunks`` in batches, index them with ``retriever`` (a registered name or an empty one) and BM25.

        :param progress: called after each batch with the number of chunks it embedded.
        :param batch_size: chunks per call to the embedder; None takes the ``embed_batch_size`` setting.
        :param backend: distance backend for a retriever given by name; None takes the ``backend`` setting.
        :param metadata: extra facts to record in the manifest.
        :param titles: embed and lexically index each chunk's title and headings with its text.
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
        texts = [chunk.indexed_text() if titles else chunk.text for chunk in chunk_list]
        batches: list[np.ndarray[Any, Any]] = []
        for start in range(0, len(chunk_list), size):
            batch = texts[start : start + size]
            vectors = np.asarray(embedder.embed_batch(batch), dtype=np.float32)
            if vectors.shape != (len(batch), embedder.dim):
                raise InvalidInputError(
                    f"embedder {embedder.name!r} returned shape {vectors.shape} for {len(batch)} texts; "
                    f"expected ({len(batch)}, {embedder.dim})"
                )
            batches.append(vectors)
            if progress is not None:
                progress(len(batch))
        # One add: appending batch by batch would copy the growing index each time.
        vectors = np.concatenate(batches)
        index.add(vectors, ids=np.arange(len(chunk_list), dtype=np.int64))
        lexical = LexicalIndex.build(texts)
        documents = DocumentIndex.build(chunk_list, vectors, titles=titles)
        facts = {"build_s": round(time.perf_counter() - started, 3), "titles": bool(titles), **(metadata or {})}
        return cls(index, chunk_list, embedder.name, embedder.dim, facts, lexical, documents)

    def search(self, query_vectors: Any, k: int) -> list[list[Passage]]:
        """The ``k`` best passages for each query vector by the dense retriever alone, best first."""
        return self.passages(self.dense_rankings(query_vectors, k))

    def dense_rankings(self, query_vectors: Any, k: int) -> list[Ranking]:
        """Each query vector's ``k`` nearest chunks (ids, similarities), best first, in one search."""
        result = self.retriever.search(query_vectors, k)
        rankings: list[Ranking] = []
        for scores, ids in zip(result.scores, result.ids, strict=True):
            keep = ids >= 0
            rankings.append((ids[keep].astype(np.int64), np.asarray(scores[keep], dtype=np.float32)))
        return rankings

    def lexical_rankings(self, queries: Sequence[str], k: int) -> list[Ranking]:
        """Each query text's ``k`` best chunks by BM25 (ids, scores), best first; only chunks sharing a term."""
        return self.lexical.search(queries, k)

    def document_rankings(
        self, embedder: Embedder, query_vectors: Any, queries: Sequence[str], depth: int
    ) -> tuple[list[Ranking], list[Ranking]]:
        """Each query's ``depth`` best documents by first-chunk similarity and by whole-document BM25.

        Rankings hold document numbers (see `owners`); `DocumentIndex.rankings` says more.
        """
        return self.document_index(embedder).rankings(query_vectors, queries, depth)

    def passages(self, rankings: Sequence[Ranking]) -> list[list[Passage]]:
        """The passages of each ranking's chunk ids, in order, scored with the ranking's scores."""
        return [
            [
                Passage(id=chunk_id, score=score, text=self.chunks[chunk_id].text, source=self.chunks[chunk_id].source)
                for chunk_id, score in zip(_ints(ids), scores.tolist(), strict=True)
            ]
            for ids, scores in rankings
        ]

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
            "lexical": {"path": LEXICAL_DIR, "kind": "bm25"},
            **({"documents": {"path": DOCUMENTS_DIR}} if self._documents is not None else {}),
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
            self.lexical.save(tmp / LEXICAL_DIR)
            files = [CHUNKS_FILE, f"{INDEX_DIR}/{storage.MANIFEST}", f"{LEXICAL_DIR}/{storage.MANIFEST}"]
            if self._documents is not None:
                self._documents.save(tmp / DOCUMENTS_DIR)
                files.append(f"{DOCUMENTS_DIR}/{storage.MANIFEST}")
            storage.write_manifest(tmp, self.manifest(), files=files)

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
        lexical = None
        if manifest.get("lexical"):  # corpora saved before hybrid retrieval have none; it is built on use
            lexical = LexicalIndex.load(where / LEXICAL_DIR)
            if len(lexical) != count:
                raise IndexFormatError(f"{where} is inconsistent: {count} chunks, the lexical index {len(lexical)}")
        documents = None
        if manifest.get("documents"):  # corpora saved before document scores have none; built on use
            documents = DocumentIndex.load(where / DOCUMENTS_DIR, chunks)
            if documents.vectors.shape[1] != dim:
                raise IndexFormatError(f"{where} is inconsistent: document vectors of dim {documents.vectors.shape[1]}")
        return cls(retriever, chunks, name, dim, manifest.get("metadata") or {}, lexical, documents)


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
        "title": chunk.title,
        "headings": list(chunk.headings),
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
                        title=str(record.get("title") or ""),
                        headings=tuple(str(heading) for heading in record.get("headings") or ()),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise IndexFormatError(f"{path} is damaged at line {number}: {exc}") from exc
    return chunks


def _ints(ids: npt.NDArray[np.int64]) -> list[int]:
    return [int(i) for i in ids.tolist()]
