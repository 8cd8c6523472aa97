"""Document-level scores: whole-document BM25, first-chunk vectors, their save/load, and one passage per source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpurag import storage
from gpurag.errors import IndexFormatError, InvalidInputError
from gpurag.rag.chunking import chunk_documents
from gpurag.rag.corpus import CorpusIndex
from gpurag.rag.documents import DocumentIndex, at_most_per_document, document_owners, document_texts
from gpurag.rag.embedders import HashingEmbedder
from gpurag.rag.types import Chunk, Document

#: Three documents; ``loops`` spans several chunks, its last one alone mentions "walrus".
DOCUMENTS = [
    Document(
        "Loops repeat a block. "
        + " ".join(f"Sentence {i} talks about iteration and loops." for i in range(12))
        + " The walrus operator may appear in a loop condition.",
        "docs/loops.md",
        {"title": "Loops"},
    ),
    Document("Exceptions are raised and caught with try and except.", "docs/errors.md", {"title": "Errors"}),
    Document("Integers have unlimited precision.", "docs/ints.md", {"title": "Integers"}),
]


def chunks() -> list[Chunk]:
    return chunk_documents(DOCUMENTS, size=120, overlap=40, unit="chars")


def test_owners_number_documents_in_order_of_first_appearance() -> None:
    made = chunks()
    sources, owners = document_owners(made)
    assert sources == ["docs/loops.md", "docs/errors.md", "docs/ints.md"]
    assert owners.tolist() == [0] * (len(made) - 2) + [1, 2]
    assert len(made) - 2 >= 4  # the first document crosses several chunk boundaries


def test_document_texts_rebuild_each_document_once_with_its_title() -> None:
    made = chunks()
    _, owners = document_owners(made)
    texts = document_texts(made, owners, 3, titles=True)
    for text, document in zip(texts, DOCUMENTS, strict=True):
        title, body = text.split("\n\n", 1)
        assert title == document.metadata["title"]
        # the overlaps are given once: the words are the document's words, in order
        assert body.split() == document.text.split()
    untitled = document_texts(made, owners, 3, titles=False)
    assert [t.split() for t in untitled] == [d.text.split() for d in DOCUMENTS]


def test_build_keeps_each_documents_first_chunk_vector_normalised() -> None:
    made = chunks()
    vectors = np.arange(len(made) * 4, dtype=np.float32).reshape(len(made), 4) + 1
    index = DocumentIndex.build(made, vectors)
    first = [0, len(made) - 2, len(made) - 1]
    expected = vectors[first] / np.linalg.norm(vectors[first], axis=1, keepdims=True)
    np.testing.assert_allclose(index.vectors, expected, rtol=1e-6)
    assert len(index) == 3


def test_whole_document_bm25_finds_a_word_in_any_chunk() -> None:
    index = DocumentIndex.build(chunks(), HashingEmbedder(dim=64).embed_batch([c.text for c in chunks()]))
    dense, lexical = index.rankings(None, ["walrus", "precision", "zebra"], 5)
    assert [ids.tolist() for ids, _ in lexical] == [[0], [2], []]
    assert all(len(ids) == 0 for ids, _ in dense)


def test_dense_ranking_is_by_first_chunk_similarity() -> None:
    made = chunks()
    vectors = np.zeros((len(made), 3), dtype=np.float32)
    vectors[:, 0] = 1  # every chunk points along x...
    vectors[len(made) - 2] = [0, 1, 0]  # ...but the errors document's only chunk along y
    vectors[len(made) - 1] = [0, 0, 1]
    vectors[1] = [0, 0, 5]  # a later chunk of loops does not count
    index = DocumentIndex.build(made, vectors)
    dense, _ = index.rankings(np.asarray([[0, 0, 2.0], [0, 3.0, 0]], dtype=np.float32), ["a", "b"], 2)
    assert [ids.tolist() for ids, _ in dense] == [[2, 0], [1, 0]]
    np.testing.assert_allclose(dense[0][1], [1.0, 0.0], atol=1e-6)  # cosine: the query is normalised too


def test_save_load_round_trip_and_checks(tmp_path: Path) -> None:
    made = chunks()
    index = DocumentIndex.build(made, HashingEmbedder(dim=64).embed_batch([c.text for c in made]))
    index.save(tmp_path / "docs")
    loaded = DocumentIndex.load(tmp_path / "docs", made)
    np.testing.assert_array_equal(loaded.vectors, index.vectors)
    np.testing.assert_array_equal(loaded.owners, index.owners)
    queries = ["walrus loop", "exceptions"]
    assert [ids.tolist() for ids, _ in loaded.rankings(None, queries, 3)[1]] == [
        ids.tolist() for ids, _ in index.rankings(None, queries, 3)[1]
    ]
    with pytest.raises(IndexFormatError, match="inconsistent: it indexes 3 documents of"):
        DocumentIndex.load(tmp_path / "docs", made[:-1])  # other chunks than it was built for
    np.save(tmp_path / "docs" / "vectors.npy", np.zeros((3, 64), dtype=np.float32))
    with pytest.raises(IndexFormatError, match=r"vectors\.npy"):
        DocumentIndex.load(tmp_path / "docs", made)


def test_bad_arguments_are_named() -> None:
    made = chunks()
    with pytest.raises(InvalidInputError, match=r"chunk_vectors must have one row per chunk"):
        DocumentIndex.build(made, np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="chunks is empty"):
        DocumentIndex.build([], np.zeros((0, 4), dtype=np.float32))


def test_at_most_per_document() -> None:
    owners = np.asarray([0, 0, 0, 1, 1, 2], dtype=np.int64)
    ranking = (np.asarray([0, 1, 3, 2, 4, 5], dtype=np.int64), np.asarray([6, 5, 4, 3, 2, 1], dtype=np.float32))
    assert at_most_per_document(ranking, owners, 1, 10)[0].tolist() == [0, 3, 5]
    assert at_most_per_document(ranking, owners, 2, 10)[0].tolist() == [0, 1, 3, 4, 5]
    assert at_most_per_document(ranking, owners, 1, 2)[0].tolist() == [0, 3]
    ids, scores = at_most_per_document(ranking, owners, 0, 4)
    assert ids.tolist() == [0, 1, 3, 2]
    assert scores.tolist() == [6, 5, 4, 3]


# --- in the corpus -------------------------------------------------------------------------------


def test_the_corpus_saves_and_loads_its_document_index(tmp_path: Path) -> None:
    embedder = HashingEmbedder(dim=64)
    corpus = CorpusIndex.build(chunks(), embedder)
    assert corpus.documents is not None
    corpus.save(tmp_path / "corpus")
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["documents"] == {"path": "documents"}
    assert "documents/manifest.json" in manifest["files"]
    loaded = CorpusIndex.load(tmp_path / "corpus", embedder)
    assert loaded.documents is not None
    np.testing.assert_array_equal(loaded.documents.vectors, corpus.documents.vectors)


def test_a_corpus_saved_before_document_indexes_gets_one_built_once(tmp_path: Path) -> None:
    embedder = HashingEmbedder(dim=64)
    corpus = CorpusIndex.build(chunks(), embedder)
    path = tmp_path / "corpus"
    corpus.save(path)
    manifest = json.loads((path / "manifest.json").read_text())
    shutil.rmtree(path / "documents")
    del manifest["documents"]
    files = [name for name in manifest.pop("files") if not name.startswith("documents/")]
    storage.write_manifest(path, {k: v for k, v in manifest.items() if k not in ("format", "format_version")}, files)
    loaded = CorpusIndex.load(path, embedder)
    assert loaded.documents is None
    built = loaded.document_index(embedder)
    assert corpus.documents is not None
    np.testing.assert_allclose(built.vectors, corpus.documents.vectors, rtol=1e-6)
    assert loaded.document_index(embedder) is built
    with pytest.raises(InvalidInputError, match="does not match the corpus"):
        CorpusIndex.load(path, embedder).document_index(HashingEmbedder(dim=32))
