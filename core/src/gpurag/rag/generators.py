"""The built-in generators: ``extractive`` (no model), ``transformers`` (a local causal LM), ``openai``.

This module is a default plugin: `register_generators` registers the three classes, and
`get_generator` builds any registered generator by name. Heavy libraries (torch, transformers,
httpx) are imported only when a generator that needs them is built or used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import keyword
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpurag.errors import GenerationError, InvalidInputError
from gpurag.hookspecs import Register, hookimpl
from gpurag.rag.types import Generator, Passage
from gpurag.settings import get_settings

if TYPE_CHECKING:
    import httpx


@hookimpl
def register_generators(register: Register) -> None:
    """Register ``extractive``, ``transformers`` and ``openai``."""
    register(ExtractiveGenerator, "extractive")
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


def _check_batch(questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> None:
    if len(questions) != len(passages):
        raise InvalidInputError(
            f"passages must hold one list per question: {len(questions)} questions, {len(passages)} lists"
        )


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
    return value


# --- extractive ----------------------------------------------------------------------------------

# English function words and question words, left out of matching.
_ENGLISH_STOPWORDS = frozenset(
    """a about above after again against all am an and any are aren't as at be because been before
    being below between both but by can could did do does doing done down during each explain few for
    from further had has have having he her here hers herself him himself his how i if in into is it
    it's its itself just me mean means meaning more most my myself no nor not of off on once only or
    other our ours ourselves out over own please same she should so some such tell than that that's
    the their theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom whose why will with work works would you
    your yours yourself yourselves describe use""".split()  # noqa: SIM905
)
# Python keywords that are also English function words ("with", "for", "is"): in a question they
# count only where they are its subject: quoted, followed by a word such as "statement", or alone.
_KEYWORDS = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist)
_AMBIGUOUS = _ENGLISH_STOPWORDS & _KEYWORDS
_STOPWORDS = _ENGLISH_STOPWORDS - _KEYWORDS
_SYNTAX_NOUNS = frozenset(
    "statement statements clause clauses keyword keywords operator operators loop loops block blocks "  # noqa: SIM905
    "expression expressions test tests".split()
)
_QUOTED = re.compile(r"[\"'`“‘]+(\w+)[\"'`”’]+")

_TERM = re.compile(r"\w+")
_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
_SENTENCE_BREAK = re.compile(r"[.!?…][\"')\]”’]*(\s+)(?=[A-Z0-9\"'“‘(\[`])")
_SENTENCE_END = re.compile(r"[.!?…:;][\"')\]”’]*$")
_UNDERLINE = re.compile(r"[*=\-~^#_+]{3,}")
_MARKDOWN_HEADING = re.compile(r"#{1,6}\s")
_PROSE_START = re.compile(r"[A-Z0-9\"'“‘(\[`]")
# BM25's usual constants: term-frequency saturation and length normalisation.
_BM25_K1 = 1.2
_BM25_B = 0.75


def _stem(word: str) -> str:
    """A light suffix stripper: ``raises``, ``raised``, ``raising`` and ``raise`` become one term."""
    for suffix in ("'s", "’s"):
        word = word.removesuffix(suffix)
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif word.endswith("sses"):
        word = word[:-2]
    elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if len(word) > 5 and word.endswith("ing"):
        word = word[:-3]
    elif len(word) > 4 and word.endswith("ed"):
        word = word[:-2]
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


def _terms(text: str) -> list[str]:
    """The stemmed terms of ``text``, stopwords left out."""
    words = (word.lower() for word in _TERM.findall(text))
    return [_stem(word) for word in words if word not in _STOPWORDS]


def _question_terms(question: str) -> list[str]:
    """The distinct stemmed terms of a question, Python keywords kept only where they are its subject."""
    words = [word.lower() for word in _TERM.findall(question)]
    quoted = {word.lower() for word in _QUOTED.findall(question)}
    content = [w for w in words if w not in _STOPWORDS and w not in _AMBIGUOUS]
    kept = []
    for i, word in enumerate(words):
        if word in _STOPWORDS:
            continue
        if word in _AMBIGUOUS:
            following = words[i + 1] if i + 1 < len(words) else ""
            if not (word in quoted or following in _SYNTAX_NOUNS or not content):
                continue
        kept.append(_stem(word))
    return sorted(set(kept))


def _sentences(text: str) -> list[str]:
    """The prose sentences of a passage: headings, code blocks and fragments are left out."""
    sentences = []
    paragraphs = _PARAGRAPH_BREAK.split(text.strip())
    for number, paragraph in enumerate(paragraphs, start=1):
        lines = paragraph.rstrip().split("\n")
        kept: list[str] = []
        for line in lines:
            stripped = line.strip()
            if _UNDERLINE.fullmatch(stripped):
                if kept:
                    kept.pop()  # the heading this line underlines
                continue
            if stripped and not _MARKDOWN_HEADING.match(stripped):
                kept.append(line)
        if not kept:
            continue
        joined = " ".join(line.strip() for line in kept)
        indented = all(line[:1].isspace() for line in kept)
        if "::=" in joined or (indented and not joined.endswith((".", "!", "?"))):
            continue  # a grammar rule or a code block
        start = 0
        for match in _SENTENCE_BREAK.finditer(joined):
            sentences.append(joined[start : match.start(1)])
            start = match.end(1)
        last = joined[start:]
        if number < len(paragraphs) or _SENTENCE_END.search(last):
            sentences.append(last)  # else the passage was cut inside this sentence
    return [s for s in sentences if _PROSE_START.match(s) and len(_TERM.findall(s)) >= 4]


class ExtractiveGenerator(Generator):
    """Answers with the passages' sentences that best match the question, citing each passage.

    No model: sentences are scored against the question with BM25 over stemmed words
    (stopwords left out; a Python keyword such as "with" counts where it is the question's
    subject: ``the with statement``, ``"with"``), weighted by the share of the question's words they hold and slightly
    favouring better-ranked passages. The best ``max_sentences`` (those scoring at least
    ``min_relative_score`` of the best) are given grouped by passage, the passage of the best
    sentence first, each group in reading order and followed by its passage number, then the sources:
    ``The "with" statement is used to ... [1]`` / ``Sources: [1] pydoc:with``.
    Deterministic: the same question and passages always give the same answer.
    """

    name = "extractive"

    def __init__(self, max_sentences: int | None = None, min_relative_score: float | None = None) -> None:
        settings = get_settings()
        max_sentences = settings.extractive_max_sentences if max_sentences is None else max_sentences
        if min_relative_score is None:
            min_relative_score = settings.extractive_min_relative_score
        self.max_sentences = _positive_int("max_sentences", max_sentences)
        if not 0.0 <= min_relative_score <= 1.0:
            raise InvalidInputError(f"min_relative_score must be within [0, 1], got {min_relative_score!r}")
        self.min_relative_score = min_relative_score

    def generate(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        """One extracted answer per question."""
        _check_batch(questions, passages)
        return [self._answer(question, list(found)) for question, found in zip(questions, passages, strict=True)]

    def _answer(self, question: str, passages: list[Passage]) -> str:
        if not passages:
            return "No passages were found for this question, so there is nothing to answer from."
        # (rank, index in passage, sentence, its terms); a sentence repeated by overlapping chunks once.
        candidates: list[tuple[int, int, str, list[str]]] = []
        seen: set[str] = set()
        for rank, passage in enumerate(passages):
            for index, sentence in enumerate(_sentences(passage.text)):
                if sentence not in seen:
                    seen.add(sentence)
                    candidates.append((rank, index, sentence, _terms(sentence)))
        query = _question_terms(question)
        scored = self._score(query, candidates)
        best = max(scored, default=0.0)
        if best <= 0.0:
            if not candidates:
                first = " ".join(passages[0].text.split())
                return f"{first} [1]\n\nSources: [1] {passages[0].source}"
            rank, _, sentence, _ = candidates[0]
            return f"{sentence} [{rank + 1}]\n\nSources: [{rank + 1}] {passages[rank].source}"
        ranked = sorted(range(len(candidates)), key=lambda i: (-scored[i], candidates[i][0], candidates[i][1]))
        chosen = [i for i in ranked[: self.max_sentences] if scored[i] >= self.min_relative_score * best]
        # Best passage first, each passage's sentences in reading order.
        passage_order = {rank: order for order, rank in enumerate(dict.fromkeys(candidates[i][0] for i in chosen))}
        chosen.sort(key=lambda i: (passage_order[candidates[i][0]], candidates[i][1]))
        parts: list[str] = []
        cited: list[int] = []
        for position, i in enumerate(chosen):
            rank = candidates[i][0]
            parts.append(candidates[i][2])
            last_of_run = position == len(chosen) - 1 or candidates[chosen[position + 1]][0] != rank
            if last_of_run:
                parts[-1] += f" [{rank + 1}]"
                cited.append(rank)
        sources = "; ".join(f"[{rank + 1}] {passages[rank].source}" for rank in cited)
        return f"{' '.join(parts)}\n\nSources: {sources}"

    @staticmethod
    def _score(query: list[str], candidates: list[tuple[int, int, str, list[str]]]) -> list[float]:
        """BM25 of each candidate sentence against ``query``, over the candidates as the collection."""
        if not candidates or not query:
            return [0.0] * len(candidates)
        counts = [Counter(terms) for _, _, _, terms in candidates]
        n = len(candidates)
        average = sum(len(terms) for _, _, _, terms in candidates) / n or 1.0
        idf = {}
        for term in query:
            df = sum(1 for count in counts if term in count)
            idf[term] = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
        scores = []
        for (rank, _, _, terms), count in zip(candidates, counts, strict=True):
            norm = _BM25_K1 * (1.0 - _BM25_B + _BM25_B * len(terms) / average)
            matched = [t for t in query if t in count]
            score = sum(idf[t] * count[t] * (_BM25_K1 + 1.0) / (count[t] + norm) for t in matched)
            # Favour sentences that match more of the question, and better-ranked passages.
            scores.append(score * len(matched) / len(query) / (1.0 + 0.1 * rank))
        return scores


# --- transformers --------------------------------------------------------------------------------


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
        self.batch_size = _positive_int(
            "batch_size", get_settings().generate_batch_size if batch_size is None else batch_size
        )
        self.max_new_tokens = _positive_int(
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
        _check_batch(questions, passages)
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


# --- OpenAI-compatible endpoint --------------------------------------------------------------------

_RETRYABLE_STATUS = frozenset({408, 429})


class OpenAIGenerator(Generator):
    """Answers through an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp, OpenAI...).

    One request per question, all sent concurrently. A connection error, a timeout, a 5xx, 408
    or 429 is retried up to ``max_retries`` times, waiting ``backoff_s``, then twice that, and
    so on (or the server's ``Retry-After``, up to ``timeout_s``); another 4xx is a
    `GenerationError` naming the status and the endpoint's message. Unset arguments come from
    the ``openai_*``, ``max_new_tokens`` and ``prompt_template`` settings.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float | None = None,
        max_retries: int | None = None,
        max_new_tokens: int | None = None,
        prompt_template: str | None = None,
        backoff_s: float | None = None,
    ) -> None:
        settings = get_settings()
        self.base_url = (base_url or settings.openai_base_url).rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model or settings.openai_model
        self.api_key = api_key if api_key is not None else settings.openai_api_key
        self.timeout_s = settings.openai_timeout_s if timeout_s is None else timeout_s
        self.max_retries = settings.openai_max_retries if max_retries is None else max_retries
        self.max_new_tokens = _positive_int(
            "max_new_tokens", settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        )
        self.prompt_template = prompt_template
        self.backoff_s = settings.openai_backoff_s if backoff_s is None else backoff_s
        if not self.timeout_s > 0:
            raise InvalidInputError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise InvalidInputError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if not self.backoff_s >= 0:
            raise InvalidInputError(f"backoff_s must be >= 0, got {self.backoff_s!r}")

    def generate(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        """One answer per question; usable with or without a running event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(questions, passages))
        # Inside a running loop (a notebook, an async server): run a loop of our own in a thread.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(lambda: asyncio.run(self.agenerate(questions, passages))).result()

    async def agenerate(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        """One answer per question, the requests sent concurrently."""
        import httpx

        _check_batch(questions, passages)
        prompts = [build_prompt(q, found, self.prompt_template) for q, found in zip(questions, passages, strict=True)]
        if not prompts:
            return []
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(timeout=self.timeout_s, headers=headers) as client:
            results = await asyncio.gather(*(self._complete(client, p) for p in prompts), return_exceptions=True)
        answers = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            answers.append(result)
        return answers

    async def _complete(self, client: httpx.AsyncClient, prompt: str) -> str:
        import httpx

        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_new_tokens,
            "temperature": 0,
        }
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            wait = self.backoff_s * 2**attempt
            try:
                response = await client.post(self.url, json=body)
            except httpx.TimeoutException:
                problem = f"timed out after {self.timeout_s} s"
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                status = response.status_code
                if status < 400:
                    return self._content(response)
                problem = f"HTTP {status} {response.reason_phrase}: {_error_message(response)}"
                if status < 500 and status not in _RETRYABLE_STATUS:
                    raise GenerationError(f"{self.url} answered {problem}")
                retry_after = _retry_after_s(response)
                if retry_after is not None:
                    wait = min(retry_after, self.timeout_s)
            if attempt + 1 < attempts:
                await asyncio.sleep(wait)
        raise GenerationError(f"no answer from {self.url} after {attempts} attempt(s); the last: {problem}")

    def _content(self, response: httpx.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise GenerationError(
                f"{self.url} answered {response.status_code} without choices[0].message.content: "
                f"{response.text[:300]!r}"
            ) from error
        if content is None:
            return ""
        if not isinstance(content, str):
            raise GenerationError(f"{self.url} answered a {type(content).__name__} as content, not text")
        return content.strip()


def _error_message(response: httpx.Response) -> str:
    """What the endpoint said about an error: its JSON ``error.message`` or ``detail``, else the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        for key in ("error", "detail", "message"):
            if isinstance(body.get(key), str):
                return str(body[key])
    text = response.text.strip()
    return text[:500] if text else "(empty body)"


def _retry_after_s(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds, when it is a number."""
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
