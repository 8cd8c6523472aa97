"""`DocumentIndex`: whole-document scores for a corpus's documents, which hybrid fusion adds to their chunks.

A chunk is scored on its own words; a question about a topic is often answered best by the
chunk of the document that is *about* that topic, not by the chunk of a long neighbouring page
that mentions it in passing. Two document-level scores say what each document is about:

- ``lexical``: BM25 over each whole document (its title and the text of all its chunks, joined);
- ``dense``: the similarity of the question to the document's first chunk (its title, first
  heading and opening lines), whose vector is kept when the corpus is built.

Documents are numbered in order of first appearance among the chunks (`CorpusIndex.sources`);
``owners[i]`` is the document of chunk i. On disk it is a directory written atomically and checked
on load (see `gpurag.storage`)::

    manifest.json     kind "documents": the document and chunk counts, checksums
    vectors.npy       float32 (documents x dim): each document's first chunk's vector, L2-normalised
    lexical/          the BM25 index of the whole documents (`gpurag.rag.lexical`)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gpurag import storage
from gpurag.errors import IndexFormatError, InvalidInputError
from gpurag.rag.fusion import Ranking
from gpurag.rag.lexical import LexicalIndex
from gpurag.rag.types import Chunk

#: The manifest's ``kind`` for a document index.
KIND = "documents"
VECTORS_FILE = "vectors.npy"
LEXICAL_DIR = "lexical"


def document_owners(chunks: Sequence[Chunk]) -> tuple[list[str], npt.NDArray[np.int64]]:
    """The distinct sources in order of first appearance, and each chunk's document number."""
    numbers: dict[str, int] = {}
    owners = np.asarray([numbers.setdefault(chunk.source, len(numbers)) for chunk in chunks], dtype=np.int64)
    return list(numbers), owners


def document_texts(chunks: Sequence[Chunk], owners: npt.NDArray[np.int64], count: int, titles: bool) -> list[str]:
    """Each document's text rebuilt from its chunks (overlaps given once), after its title when ``titles``."""
    pieces: list[list[str]] = [[] for _ in range(count)]
    ends = [0] * count
    firsts: list[Chunk | None] = [None] * count
    for chunk, owner in zip(chunks, owners.tolist(), strict=True):
        if firsts[owner] is None:
            firsts[owner] = chunk
            if titles and chunk.title:
                pieces[owner].append(chunk.title)
        # A chunk that starts before the previous one of its document ended repeats the overlap.
        skip = max(0, ends[owner] - chunk.start)
        pieces[owner].append(chunk.text[skip:])
        ends[owner] = max(ends[owner], chunk.start + len(chunk.text))
    return ["\n\n".join(parts) for parts in pieces]


class DocumentIndex:
    """Whole-document BM25 and first-chunk vectors of a corpus's documents; `rankings` scores questions.

    Make one with `build` or `load`.
    """

    def __init__(self, owners: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32], lexical: LexicalIndex) -> None:
        owners = np.asarray(owners, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32)
        count = len(vectors)
        if vectors.ndim != 2 or count == 0:
            raise InvalidInputError(f"vectors must be a non-empty 2-d array; got shape {vectors.shape}")
        if len(lexical) != count:
            raise InvalidInputError(f"the lexical index holds {len(lexical)} documents but {count} vectors were given")
        if owners.ndim != 1 or (owners.size and (owners.min() < 0 or owners.max() >= count)):
            raise InvalidInputError(f"owners must name documents 0..{count - 1}")
        self.owners = owners
        self.vectors = vectors
        self.lexical = lexical

    def __len__(self) -> int:
        return len(self.vectors)

    def __repr__(self) -> str:
        return f"DocumentIndex(documents={len(self)}, chunks={len(self.owners)}, dim={self.vectors.shape[1]})"

    @classmethod
    def build(cls, chunks: Sequence[Chunk], chunk_vectors: Any, *, titles: bool = True) -> DocumentIndex:
        """The documents of ``chunks``, with ``chunk_vectors`` (row i: chunk i's vector) giving their first chunks'.

        :param titles: index each document's title with its text.
        """
        vectors = np.asarray(chunk_vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(chunks):
            raise InvalidInputError(f"chunk_vectors must have one row per chunk ({len(chunks)}); got {vectors.shape}")
        sources, owners = document_owners(chunks)
        if not sources:
            raise InvalidInputError("chunks is empty: there is nothing to index")
        first = np.unique(owners, return_index=True)[1]  # each document's first chunk
        lexical = LexicalIndex.build(document_texts(chunks, owners, len(sources), titles))
        return cls(owners, _normalised(vectors[first]), lexical)

    def rankings(self, query_vectors: Any, questions: Sequence[str], depth: int) -> tuple[list[Ranking], list[Ranking]]:
        """Each question's ``depth`` best documents by first-chunk similarity, and by whole-document BM25.

        Rankings hold document numbers (see `owners`), best first. ``query_vectors`` may be None
        (no dense ranking: empty lists).
        """
        lexical = self.lexical.search(questions, depth)
        if query_vectors is None:
            empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
            return [empty for _ in questions], lexical
        queries = _normalised(np.asarray(query_vectors, dtype=np.float32))
        similarity = queries @ self.vectors.T
        keep = min(depth, len(self))
        dense: list[Ranking] = []
        for row in similarity:
            best = np.argpartition(-row, keep - 1)[:keep] if keep < len(row) else np.arange(len(row))
            best = best[np.lexsort((best, -row[best]))]
            dense.append((best.astype(np.int64), row[best].astype(np.float32)))
        return dense, lexical

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to directory ``path`` atomically; an existing one there is replaced."""
        with storage.atomic_directory(path) as tmp:
            storage.write_array(tmp, VECTORS_FILE, self.vectors)
            self.lexical.save(tmp / LEXICAL_DIR)
            manifest = {"kind": KIND, "documents": len(self), "chunks": len(self.owners)}
            storage.write_manifest(tmp, manifest, files=[VECTORS_FILE, f"{LEXICAL_DIR}/{storage.MANIFEST}"])

    @classmethod
    def load(cls, path: str | os.PathLike[str], chunks: Sequence[Chunk]) -> DocumentIndex:
        """Read an index that `save` wrote for ``chunks``, checking every file and the counts."""
        manifest = storage.read_manifest(path, kind=KIND)
        where = manifest["path"]
        vectors = storage.read_array(manifest, VECTORS_FILE)
        lexical = LexicalIndex.load(os.path.join(where, LEXICAL_DIR))
        sources, owners = document_owners(chunks)
        if manifest.get("documents") != len(sources) or manifest.get("chunks") != len(chunks):
            raise IndexFormatError(
                f"{where} is inconsistent: it indexes {manifest.get('documents')} documents of "
                f"{manifest.get('chunks')} chunks; the corpus has {len(sources)} of {len(chunks)}"
            )
        if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != len(sources):
            raise IndexFormatError(f"{where}/{VECTORS_FILE} must be float32 with one row per document")
        try:
            return cls(owners, vectors, lexical)
        except InvalidInputError as exc:
            raise IndexFormatError(f"{where} is inconsistent: {exc}") from exc


def at_most_per_document(ranking: Ranking, owners: npt.NDArray[np.int64], limit: int, k: int) -> Ranking:
    """The ``k`` best of ``ranking`` keeping at most ``limit`` chunks of each document (0: no limit), in order."""
    ids, scores = ranking
    if limit <= 0:
        return ids[:k], scores[:k]
    taken: dict[int, int] = {}
    keep: list[int] = []
    for position, owner in enumerate(np.asarray(owners)[np.asarray(ids, dtype=np.int64)].tolist()):
        if taken.get(owner, 0) < limit:
            taken[owner] = taken.get(owner, 0) + 1
            keep.append(position)
            if len(keep) == k:
                break
    return ids[keep], scores[keep]


def _normalised(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1)).astype(np.float32)
