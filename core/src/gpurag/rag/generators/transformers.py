"""``transformers``: answers from a local Hugging Face causal language model directory."""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gpurag.errors import InvalidInputError
from gpurag.rag.generators.base import build_prompt, check_batch, positive_int
from gpurag.rag.generators.streaming import BatchStreamer, TextPiece, stream_in_thread
from gpurag.rag.types import Generator, Passage
from gpurag.settings import get_settings


class TransformersGenerator(Generator):
    """Answers with a local Hugging Face causal language model (a model directory, never downloaded).

    The prompt is `build_prompt`'s, wrapped in the tokenizer's chat template when it has one.
    Generation is greedy, in batches of ``batch_size`` left-padded prompts, on ``device``
    (default: the ``device`` setting, else CUDA when available, else CPU) in ``dtype`` (default:
    the checkpoint's); the answer is the newly generated text only. `stream` yields the answers'
    text as the batch generates it.
    """

    name = "transformers"

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        device: str | None = None,
        max_new_tokens: int | None = None,
        prompt_template: str | None = None,
        batch_size: int | None = None,
        dtype: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        settings = get_settings()
        path = Path(model_path)
        if not path.is_dir():
            raise InvalidInputError(f"model_path must be a local model directory; {str(path)!r} is not one")
        self.model_path = path
        self.batch_size = positive_int(
            "batch_size", get_settings().generate_batch_size if batch_size is None else batch_size
        )
        self.max_new_tokens = positive_int(
            "max_new_tokens", settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        )
        self.prompt_template = prompt_template
        self.device = device or settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as error:
            raise InvalidInputError(f"cannot load a causal language model from {str(path)!r}: {error}") from error
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise InvalidInputError(f"the tokenizer in {str(path)!r} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model: Any = model.to(self.device).eval()
        self.uses_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def format_prompts(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        """The exact text given to the model for each question."""
        check_batch(questions, passages)
        prompts = [build_prompt(q, found, self.prompt_template) for q, found in zip(questions, passages, strict=True)]
        if not self.uses_chat_template:
            return prompts
        return [
            str(
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
            )
            for prompt in prompts
        ]

    def generate(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        """One generated answer per question."""
        prompts = self.format_prompts(questions, passages)
        answers = [""] * len(prompts)
        for batch in self._batches(prompts):
            for i, text in zip(batch, self._generate_batch([prompts[i] for i in batch]), strict=True):
                answers[i] = text
        return answers

    def stream(
        self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]
    ) -> collections.abc.Generator[TextPiece, None, None]:
        """Each answer's text as the batch generates it, as `TextPiece` objects indexed by question.

        Batches as `generate` does; each answer ends with a ``done`` piece, and its pieces joined
        and stripped are its `generate` answer. Closing the iterator stops the generation.
        """
        prompts = self.format_prompts(questions, passages)
        for batch in self._batches(prompts):
            with contextlib.closing(self._stream_batch([prompts[i] for i in batch])) as pieces:
                for piece in pieces:
                    yield dataclasses.replace(piece, index=batch[piece.index])

    def _batches(self, prompts: list[str]) -> Iterator[list[int]]:
        """Indexes of ``prompts`` in batches; prompts of similar length share one, so that little is padding."""
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        for first in range(0, len(order), self.batch_size):
            yield order[first : first + self.batch_size]

    def _inputs(self, prompts: list[str]) -> dict[str, Any]:
        """``generate``'s arguments for ``prompts``: left-padded ids, their mask, a greedy configuration."""
        encoded = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=not self.uses_chat_template
        )
        config = copy.deepcopy(self.model.generation_config)
        config.update(
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return {
            "input_ids": encoded["input_ids"].to(self.device),
            "attention_mask": encoded["attention_mask"].to(self.device),
            "generation_config": config,
        }

    def _generate_batch(self, prompts: list[str]) -> list[str]:
        import torch

        inputs = self._inputs(prompts)
        with torch.inference_mode():
            output = self.model.generate(**inputs)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def _stream_batch(self, prompts: list[str]) -> collections.abc.Generator[TextPiece, None, None]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        inputs = self._inputs(prompts)
        eos = inputs["generation_config"].eos_token_id
        eos_ids = {*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id} - {None}
        streamer = BatchStreamer(self.tokenizer, len(prompts), eos_ids)

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                stop = streamer.should_stop()
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        def run() -> None:
            with torch.inference_mode():
                self.model.generate(**inputs, streamer=streamer, stopping_criteria=StoppingCriteriaList([Stopped()]))

        yield from stream_in_thread(streamer, run)
