"""Fixtures shared by the RAG tests: a tiny causal language model built offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpurag.testing.tiny_lm import build_tiny_causal_lm


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny causal LM directory whose tokenizer has a chat template."""
    pytest.importorskip("transformers")
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_causal_lm_without_chat_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model, its tokenizer without a chat template."""
    pytest.importorskip("transformers")
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm-raw"), chat_template=False)
