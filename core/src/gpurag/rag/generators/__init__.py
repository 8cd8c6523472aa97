"""The built-in generators: ``extractive`` (no model), ``local`` (a packaged small model),
``transformers`` (a causal LM directory), ``openai`` (an OpenAI-compatible endpoint).

This package is a default plugin: `register_generators` registers the four classes, and
`get_generator` builds any registered generator by name. Heavy libraries (torch, transformers,
httpx) are imported only when a generator that needs them is built or used.
"""

from __future__ import annotations

from typing import Any

from gpurag.hookspecs import Register, hookimpl
from gpurag.rag.generators.base import build_prompt
from gpurag.rag.generators.extractive import ExtractiveGenerator
from gpurag.rag.generators.local import LocalGenerator
from gpurag.rag.generators.openai import OpenAIGenerator
from gpurag.rag.generators.streaming import TextPiece
from gpurag.rag.generators.transformers import TransformersGenerator
from gpurag.rag.types import Generator
from gpurag.settings import get_settings

__all__ = [
    "ExtractiveGenerator",
    "LocalGenerator",
    "OpenAIGenerator",
    "TextPiece",
    "TransformersGenerator",
    "build_prompt",
    "get_generator",
    "register_generators",
]


@hookimpl
def register_generators(register: Register) -> None:
    """Register ``extractive``, ``local``, ``transformers`` and ``openai``."""
    register(ExtractiveGenerator, "extractive")
    register(LocalGenerator, "local")
    register(TransformersGenerator, "transformers")
    register(OpenAIGenerator, "openai")


def get_generator(name: str | None = None, **options: Any) -> Generator:
    """A new generator of the kind registered as ``name`` (default: the ``generator`` setting).

    ``options`` go to the registered factory (``model_path=`` for ``transformers``,
    ``base_url=`` for ``openai``...). An unknown name is an `InvalidInputError` listing the
    registered ones.
    """
    from gpurag.plugins import lookup

    factory = lookup("generators", name or get_settings().generator)
    generator: Generator = factory(**options)
    return generator
