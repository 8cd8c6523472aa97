"""``transformers``: answers from a local Hugging Face causal language model directory."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpurag.errors import InvalidInputError
from gpurag.rag.generators.base import build_prompt, check_batch, positive_int
from gpurag.rag.types import Generator, Passage
from gpurag.settings import get_settings


class TransformersGenerator(Generator):
    """Answers with a local Hugging Face causal language model (a model directory, never downloaded).

    The prompt is `build_prompt`'s, wrapped in the tokenizer's chat template when it has one.
    Generation is greedy, in batches of ``batch_size`` left-padded prompts, on ``device``
    (default: the ``device`` setting, else CUDA when available, else CPU); the answer is the
    newly generated text only.
    """

    name = "transformers"

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        device: str | None = None,
        max_new_tokens: int | None = None,
        prompt_template: str | None = None,
        batch_size: int | None = None,
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
            model: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto")
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
        # Prompts of similar length share a batch, so that little of it is padding.
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        answers = [""] * len(prompts)
        for first in range(0, len(order), self.batch_size):
            batch = order[first : first + self.batch_size]
            for i, text in zip(batch, self._generate_batch([prompts[i] for i in batch]), strict=True):
                answers[i] = text
        return answers

    def _generate_batch(self, prompts: list[str]) -> list[str]:
        import torch

        encoded = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=not self.uses_chat_template
        )
        input_ids = encoded["input_ids"].to(self.device)
        attention_mask = encoded["attention_mask"].to(self.device)
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
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        new_tokens = output[:, input_ids.shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
