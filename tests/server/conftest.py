"""Fixtures for the server tests: a small hashing-embedder corpus."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 chunks of the default corpus indexed with the model-free ``hashing`` embedder."""
    from gpurag.rag.corpus import CorpusIndex
    from gpurag.rag.default_corpus import default_chunks
    from gpurag.rag.embedders import get_embedder

    path = tmp_path_factory.mktemp("server") / "corpus"
    CorpusIndex.build(default_chunks()[:300], get_embedder("hashing"), "exact").save(path)
    return path
