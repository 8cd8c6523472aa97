"""What every LM generator shares: the numbered-passages prompt and the checks of a batch and its options."""

from __future__ import annotations

from collections.abc import Sequence

from gpurag.errors import InvalidInputError
from gpurag.rag.types import Passage
from gpurag.settings import get_settings


def build_prompt(question: str, passages: Sequence[Passage], template: str | None = None) -> str:
    """The prompt for one question: ``template`` (default: the ``prompt_template`` setting) filled in.

    ``{question}`` becomes the question and ``{passages}`` the passages, numbered from 1 in the
    order given, each headed by its number and source (``[1] pydoc:with``), so that an answer
    can cite them as the extractive generator does.
    """
    template = get_settings().prompt_template if template is None else template
    numbered = "\n\n".join(f"[{i}] {p.source}\n{p.text.strip()}" for i, p in enumerate(passages, start=1))
    try:
        return template.format(question=question, passages=numbered or "(no passages were found)")
    except (KeyError, IndexError, ValueError) as error:
        raise InvalidInputError(
            "prompt_template may use only {question} and {passages} (write other braces doubled); "
            f"filling it in failed: {type(error).__name__}: {error}"
        ) from error


def check_batch(questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> None:
    """An `InvalidInputError` unless there is one passage list per question."""
    if len(questions) != len(passages):
        raise InvalidInputError(
            f"passages must hold one list per question: {len(questions)} questions, {len(passages)} lists"
        )


def positive_int(name: str, value: int) -> int:
    """``value`` when it is an integer >= 1, else an `InvalidInputError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
    return value
