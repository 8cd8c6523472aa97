"""Corpus indexes: build, search, the atomic checksummed save, load, and the errors a user can meet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gpurag
from gpurag import storage
from gpurag.errors import IndexFormatError, InvalidInputError
from gpurag.rag.corpus import CorpusIndex, read_corpus_manifest
from gpurag.rag.embedders import HashingEmbedder
from gpurag.rag.types import Chunk

TEXTS = [
    ("The with statement wraps a block in the methods of a context manager.", "docs/with.md"),
    ("A for loop iterates over the items of any iterable object.", "docs/for.md"),
    ("The try statement catches exceptions raised inside its block.", "docs/try.md"),
    ("A while loop runs as long as its condition stays true.", "docs/while.md"),
    ("Integers have unlimited precision and support bitwise operations.", "docs/ints.md"),
]


def make_chunks() -> list[Chunk]:
    return [
        Chunk(text=text, source=source, position=0, start=0, metadata={"n": i, "tags": ["a", "b"]})
        for i, (text, source) in enumerate(TEXTS)
    ]


@pytest.fixture
def embedder() -> HashingEmbedder:
    return HashingEmbedder(dim=128)


@pytest.fixture
def corpus(embedder: HashingEmbedder) -> CorpusIndex:
    return CorpusIndex.build(make_chunks(), embedder, batch_size=2)


def test_build_and_search(corpus: CorpusIndex, embedder: HashingEmbedder) -> None:
    assert len(corpus) == 5
    assert corpus.embedder_name == "hashing"
    assert corpus.embedder_dim == 128
    assert corpus.sources == [source for _, source in TEXTS]
    results = corpus.search(embedder.embed_batch([TEXTS[2][0], TEXTS[0][0]]), 2)
    assert results[0][0].source == "docs/try.md"
    assert results[0][0].id == 2
    assert results[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert results[0][0].text == TEXTS[2][0]
    assert results[1][0].source == "docs/with.md"
    assert all(len(row) == 2 for row in results)


def test_k_beyond_the_corpus_gives_every_chunk(corpus: CorpusIndex, embedder: HashingEmbedder) -> None:
    (row,) = corpus.search(embedder.embed_batch(["loop"]), 50)
    assert sorted(p.id for p in row) == [0, 1, 2, 3, 4]


def test_progress_sees_every_chunk(embedder: HashingEmbedder) -> None:
    seen: list[int] = []
    CorpusIndex.build(make_chunks(), embedder, progress=seen.append, batch_size=2)
    assert seen == [2, 2, 1]


def test_build_with_a_retriever_instance(embedder: HashingEmbedder) -> None:
    retriever = gpurag.ExactRetriever(metric="cosine")
    corpus = CorpusIndex.build(make_chunks(), embedder, retriever)
    assert corpus.retriever is retriever
    assert len(retriever) == 5


def test_build_errors(embedder: HashingEmbedder) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        CorpusIndex.build([], embedder)
    with pytest.raises(InvalidInputError, match=r"chunks\[0\]"):
        CorpusIndex.build(["text"], embedder)  # type: ignore[list-item]
    full = gpurag.ExactRetriever(metric="cosine")
    full.add(np.ones((1, 128), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="must be empty"):
        CorpusIndex.build(make_chunks(), embedder, full)
    with pytest.raises(InvalidInputError, match="unknown retriever"):
        CorpusIndex.build(make_chunks(), embedder, "no-such-retriever")


def test_save_load_round_trip(corpus: CorpusIndex, embedder: HashingEmbedder, tmp_path: Path) -> None:
    path = tmp_path / "corpus"
    corpus.save(path)
    assert sorted(p.name for p in path.iterdir()) == ["chunks.jsonl", "documents", "index", "lexical", "manifest.json"]
    loaded = CorpusIndex.load(path, embedder)
    assert loaded.chunks == corpus.chunks
    assert loaded.chunks[3].metadata == {"n": 3, "tags": ["a", "b"]}
    assert (loaded.embedder_name, loaded.embedder_dim) == ("hashing", 128)
    assert loaded.retriever.name == "exact"
    queries = embedder.embed_batch(["exceptions in a block", "bitwise integers"])
    assert loaded.search(queries, 3) == corpus.search(queries, 3)
    manifest = read_corpus_manifest(path)
    assert manifest["kind"] == "corpus"
    assert manifest["embedder"] == {"name": "hashing", "dim": 128}
    assert manifest["retriever"]["name"] == "exact"
    assert manifest["chunks"]["count"] == 5
    assert "build_s" in manifest["metadata"]
    # Loading without an embedder trusts the manifest.
    assert len(CorpusIndex.load(path)) == 5


def test_save_replaces_an_existing_corpus(corpus: CorpusIndex, embedder: HashingEmbedder, tmp_path: Path) -> None:
    path = tmp_path / "corpus"
    corpus.save(path)
    smaller = CorpusIndex.build(make_chunks()[:2], embedder)
    smaller.save(path)
    assert len(CorpusIndex.load(path, embedder)) == 2
    assert not [p for p in tmp_path.iterdir() if p.name != "corpus"]  # no temporary left behind


def test_a_failed_save_leaves_the_old_corpus(corpus: CorpusIndex, embedder: HashingEmbedder, tmp_path: Path) -> None:
    path = tmp_path / "corpus"
    corpus.save(path)
    bad = Chunk(text="x", source="s", position=0, start=0, metadata={"not json": object()})
    broken = CorpusIndex.build([bad], embedder)
    with pytest.raises(InvalidInputError, match="JSON"):
        broken.save(path)
    assert len(CorpusIndex.load(path, embedder)) == 5


def test_a_different_embedder_is_refused_naming_both(corpus: CorpusIndex, tmp_path: Path) -> None:
    path = tmp_path / "corpus"
    corpus.save(path)
    with pytest.raises(InvalidInputError, match=r"'hashing' \(dim 64\).*'hashing' \(dim 128\)"):
        CorpusIndex.load(path, HashingEmbedder(dim=64))

    class Renamed(HashingEmbedder):
        name = "all-MiniLM-L6-v2"

    with pytest.raises(InvalidInputError) as caught:
        CorpusIndex.load(path, Renamed(dim=128))
    assert "all-MiniLM-L6-v2" in str(caught.value)
    assert "hashing" in str(caught.value)


@pytest.mark.parametrize("damaged", ["chunks.jsonl", "index/vectors.npy", "index/manifest.json"])
def test_a_damaged_file_is_named(corpus: CorpusIndex, tmp_path: Path, damaged: str) -> None:
    path = tmp_path / "corpus"
    corpus.save(path)
    target = path / damaged
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=Path(damaged).name):
        CorpusIndex.load(path)


def test_a_truncated_chunks_file_is_an_error(corpus: CorpusIndex, tmp_path: Path) -> None:
    path = tmp_path / "corpus"
    corpus.save(path)
    lines = (path / "chunks.jsonl").read_text().splitlines()
    (path / "chunks.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(IndexFormatError, match=r"chunks\.jsonl"):
        CorpusIndex.load(path)


def test_missing_or_foreign_directories(corpus: CorpusIndex, tmp_path: Path) -> None:
    with pytest.raises(IndexFormatError, match="does not exist"):
        CorpusIndex.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexFormatError, match="manifest"):
        CorpusIndex.load(tmp_path / "empty")
    corpus.retriever.save(tmp_path / "bare-index")
    with pytest.raises(IndexFormatError, match="expected 'corpus'"):
        CorpusIndex.load(tmp_path / "bare-index")


def test_an_unknown_retriever_in_the_manifest(corpus: CorpusIndex, tmp_path: Path) -> None:
    path = tmp_path / "corpus"
    corpus.save(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["retriever"]["name"] = "from-a-plugin-not-installed"
    manifest[storage.CHECKSUM_KEY] = storage.manifest_checksum(manifest)  # as a deliberate edit would
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="from-a-plugin-not-installed"):
        CorpusIndex.load(path)


# --- titled chunks and the lexical index -------------------------------------------------------


class RecordingEmbedder(HashingEmbedder):
    """The hashing embedder, keeping every text it embedded."""

    def __init__(self) -> None:
        super().__init__(dim=128)
        self.texts: list[str] = []

    def embed_batch(self, texts):  # type: ignore[no-untyped-def]
        self.texts.extend(texts)
        return super().embed_batch(texts)


def titled_chunks() -> list[Chunk]:
    return [
        Chunk(text=text, source=source, position=0, start=0, title=f"Title{i}", headings=("Part", f"Heading{i}"))
        for i, (text, source) in enumerate(TEXTS)
    ]


def test_titles_and_headings_are_indexed_but_not_shown() -> None:
    embedder = RecordingEmbedder()
    corpus = CorpusIndex.build(titled_chunks(), embedder)
    assert embedder.texts == [f"Title{i} > Part > Heading{i}\n\n{text}" for i, (text, _) in enumerate(TEXTS)]
    assert corpus.indexed_texts() == embedder.texts
    assert corpus.metadata["titles"] is True
    ((ids, _),) = corpus.lexical_rankings(["heading3"], 5)
    assert ids.tolist() == [3]  # found through its heading alone
    (row,) = corpus.passages(corpus.lexical_rankings(["heading3"], 5))
    assert row[0].text == TEXTS[3][0]  # the passage is the chunk's text, without title or headings
    (dense,) = corpus.search(embedder.embed_batch(["Heading4"]), 1)
    assert dense[0].id == 4
    assert dense[0].text == TEXTS[4][0]


def test_without_titles_only_the_text_is_indexed() -> None:
    embedder = RecordingEmbedder()
    corpus = CorpusIndex.build(titled_chunks(), embedder, titles=False)
    assert embedder.texts == [text for text, _ in TEXTS]
    assert corpus.metadata["titles"] is False
    assert corpus.lexical_rankings(["heading3"], 5)[0][0].tolist() == []


def test_the_lexical_index_is_saved_checked_and_loaded(tmp_path: Path) -> None:
    corpus = CorpusIndex.build(titled_chunks(), HashingEmbedder(dim=128))
    corpus.save(tmp_path / "corpus")
    manifest = read_corpus_manifest(tmp_path / "corpus")
    assert "lexical/manifest.json" in manifest["files"]
    assert (tmp_path / "corpus" / "lexical" / "data.npy").is_file()
    loaded = CorpusIndex.load(tmp_path / "corpus")
    assert loaded.chunks == corpus.chunks  # titles and headings survive the round trip
    queries = ["loop heading1", "try", "precision"]
    before, after = corpus.lexical_rankings(queries, 5), loaded.lexical_rankings(queries, 5)
    assert [ids.tolist() for ids, _ in after] == [ids.tolist() for ids, _ in before]
    assert loaded._lexical is not None  # read from disk, not rebuilt

    vocab = tmp_path / "corpus" / "lexical" / "vocab.json"
    vocab.write_text(vocab.read_text().replace("loop", "lool"))
    with pytest.raises(IndexFormatError, match=r"vocab\.json"):
        CorpusIndex.load(tmp_path / "corpus")


def test_a_corpus_saved_before_lexical_indexes_gets_one_built(tmp_path: Path) -> None:
    import shutil

    from gpurag import storage

    corpus = CorpusIndex.build(make_chunks(), HashingEmbedder(dim=128), titles=False)
    corpus.save(tmp_path / "corpus")
    path = tmp_path / "corpus"
    manifest = json.loads((path / "manifest.json").read_text())
    shutil.rmtree(path / "lexical")
    del manifest["lexical"], manifest["metadata"]["titles"]
    files = [name for name in manifest.pop("files") if not name.startswith("lexical/")]
    storage.write_manifest(path, {k: v for k, v in manifest.items() if k not in ("format", "format_version")}, files)
    loaded = CorpusIndex.load(path)
    assert loaded._lexical is None
    assert loaded.titles is False
    assert loaded.lexical_rankings(["precision"], 3)[0][0].tolist() == [4]
