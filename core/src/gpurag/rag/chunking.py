"""Splitting documents into chunks that fit a budget, with overlap, at the most natural boundary.

A budget is counted in one of two units:

- ``"chars"``: characters of the chunk's text;
- ``"tokens"``: whitespace-separated words of the chunk's text (not a model tokenizer's tokens,
  of which English text has about 1.3 per word; choose the budget with that in mind).

A chunk ends, in order of preference, at a paragraph break (a blank line), the end of a
sentence, a line break, any whitespace, or (only for a word longer than a whole ``"chars"``
budget) a hard cut inside the word. A preferred boundary is taken only when the chunk then fills
at least half its budget, so chunks do not come out tiny. The next chunk starts up to ``overlap``
units before the previous one ended, at the start of a sentence where one lies in that range,
else at the start of a word.

Guarantees: every chunk is within budget; every non-whitespace character of the text lies in
some chunk; no chunk begins or ends with whitespace; neighbours share at most ``overlap`` units;
whitespace-only text gives no chunks.

Each chunk also knows where it sits: its document's title (the ``title`` metadata) and the
section headings in force where it starts (`section_headings`: reStructuredText headings, a
line underlined with ``=``, ``*``, ``-``...; Markdown ``#`` headings), which `Chunk.indexed_text`
puts before the text that is embedded and lexically indexed.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable

from gpurag.errors import InvalidInputError
from gpurag.rag.types import Chunk, Document
from gpurag.settings import get_settings

#: The budget units `chunk_text` understands.
UNITS = ("chars", "tokens")

_WORD = re.compile(r"\S+")
# A reStructuredText underline: one punctuation character repeated, at least three times.
_UNDERLINE = re.compile(r"([=*\-~^\"'`#+:.])\1{2,}")
_MARKDOWN_HEADING = re.compile(r"(#{1,6})[ \t]+(\S.*?)[ \t#]*")
_SENTENCE_END = frozenset(".!?…")
_CLOSERS = frozenset("\"')]}»”’`*_")
# Boundary levels, strongest first; a boundary of a level also counts for every weaker one.
_PARAGRAPH, _SENTENCE, _LINE, _SPACE = 3, 2, 1, 0


def chunk_text(text: str, size: int, overlap: int = 0, unit: str = "chars") -> list[tuple[int, int]]:
    """The ``(start, end)`` character spans of ``text``'s chunks, in order.

    :param size: the most units a chunk may hold (>= 1)
    :param overlap: the most units neighbouring chunks share (>= 0 and < ``size``)
    :param unit: ``"chars"`` or ``"tokens"`` (whitespace-separated words)
    """
    _check_budget(size, overlap, unit)
    return _Splitter(text, size, overlap, unit == "tokens").spans()


def chunk_documents(
    documents: Iterable[Document],
    size: int | None = None,
    overlap: int | None = None,
    unit: str | None = None,
) -> list[Chunk]:
    """The chunks of every document, in order; unset budget arguments come from the settings.

    Each chunk keeps its document's source and a copy of its metadata, its position among that
    document's chunks and the character offset where it starts in the document's text.
    """
    settings = get_settings()
    size = settings.chunk_size if size is None else size
    overlap = settings.chunk_overlap if overlap is None else overlap
    unit = settings.chunk_unit if unit is None else unit
    _check_budget(size, overlap, unit)
    tokens = unit == "tokens"
    chunks = []
    for document in documents:
        spans = _Splitter(document.text, size, overlap, tokens).spans()
        title = document.metadata.get("title")
        headings = section_headings(document.text)
        for position, (start, end) in enumerate(spans):
            chunks.append(
                Chunk(
                    text=document.text[start:end],
                    source=document.source,
                    position=position,
                    start=start,
                    metadata=dict(document.metadata),
                    title=title if isinstance(title, str) else "",
                    headings=headings_at(headings, start),
                )
            )
    return chunks


def section_headings(text: str) -> list[tuple[int, int, str]]:
    """The section headings of ``text``: ``(offset of the heading line, level, heading)``, in order.

    A heading is a line of text preceded by a blank line (or the start) and underlined by one
    punctuation character repeated at least as long as it (reStructuredText), or a Markdown
    ``#`` line. Levels are numbered from 0 in the order their adornments first appear, as
    reStructuredText does.
    """
    found: list[tuple[int, int, str]] = []
    levels: dict[str, int] = {}
    lines = text.split("\n")
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)
    for i, line in enumerate(lines):
        adornment, heading = "", ""
        markdown = _MARKDOWN_HEADING.fullmatch(line)
        if markdown is not None:
            adornment, heading = markdown.group(1), markdown.group(2)
        elif i + 1 < len(lines) and (i == 0 or not lines[i - 1].strip()):
            underline = lines[i + 1].rstrip()
            title = line.strip()
            if (
                title
                and line == line.lstrip()
                and _UNDERLINE.fullmatch(underline)
                and not _UNDERLINE.fullmatch(title)
                and len(underline) >= len(title)
            ):
                adornment, heading = underline[0], title
        if heading:
            level = levels.setdefault(adornment, len(levels))
            found.append((offsets[i], level, heading))
    return found


def headings_at(headings: list[tuple[int, int, str]], offset: int) -> tuple[str, ...]:
    """The headings in force at ``offset`` (outermost first), from `section_headings`'s list.

    A heading whose line starts at ``offset`` is in force (a chunk that begins with a heading
    belongs to that section); one that starts after it is not yet.
    """
    stack: list[tuple[int, str]] = []
    for start, level, heading in headings:
        if start > offset:
            break
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, heading))
    return tuple(heading for _, heading in stack)


def _check_budget(size: int, overlap: int, unit: str) -> None:
    if unit not in UNITS:
        raise InvalidInputError(f"chunk_unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"chunk_size must be an integer >= 1, got {size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise InvalidInputError(f"chunk_overlap must be an integer >= 0, got {overlap!r}")
    if overlap >= size:
        raise InvalidInputError(f"chunk_overlap ({overlap}) must be smaller than chunk_size ({size}), both in {unit}")


class _Splitter:
    """Greedy splitting of one text; see the module docstring for the rules."""

    def __init__(self, text: str, size: int, overlap: int, tokens: bool) -> None:
        self.text = text
        self.size = size
        self.overlap = overlap
        self.tokens = tokens
        spans = [match.span() for match in _WORD.finditer(text)]
        self.starts = [start for start, _ in spans]
        self.ends = [end for _, end in spans]
        # levels[i]: the kind of boundary between word i and word i + 1.
        self.levels = [self._level(self.ends[i], self.starts[i + 1]) for i in range(len(spans) - 1)]

    def spans(self) -> list[tuple[int, int]]:
        if not self.starts:
            return []
        text_end = self.ends[-1]
        start = previous_end = self.starts[0]
        spans = []
        while True:
            limit = self._limit(start)
            if text_end <= limit:
                spans.append((start, text_end))
                return spans
            end = self._end(start, limit, previous_end)
            spans.append((start, end))
            start, previous_end = self._next_start(start, end), end

    def _level(self, end: int, next_start: int) -> int:
        if self.text.count("\n", end, next_start) >= 2:
            return _PARAGRAPH
        last = self.text[end - 1]
        if last in _SENTENCE_END or (last in _CLOSERS and end >= 2 and self.text[end - 2] in _SENTENCE_END):
            return _SENTENCE
        return _LINE if "\n" in self.text[end:next_start] else _SPACE

    def _units(self, start: int, end: int) -> int:
        if not self.tokens:
            return end - start
        return bisect.bisect_left(self.starts, end) - bisect.bisect_left(self.starts, start)

    def _limit(self, start: int) -> int:
        """The furthest end a chunk beginning at ``start`` may have."""
        if not self.tokens:
            return start + self.size
        first = bisect.bisect_left(self.starts, start)
        return self.ends[min(first + self.size, len(self.ends)) - 1]

    def _end(self, start: int, limit: int, previous_end: int) -> int:
        """Where the chunk beginning at ``start`` ends: past ``previous_end``, at most ``limit``."""
        low = bisect.bisect_right(self.ends, max(start, previous_end))
        high = bisect.bisect_right(self.ends, limit)
        for level in (_PARAGRAPH, _SENTENCE, _LINE):
            for i in range(high - 1, low - 1, -1):
                if 2 * self._units(start, self.ends[i]) < self.size:
                    break
                if self.levels[i] >= level:
                    return self.ends[i]
        if high > low:
            return self.ends[high - 1]
        return limit  # one word longer than the budget: cut inside it

    def _next_start(self, start: int, end: int) -> int:
        """Where the chunk after ``[start, end)`` begins, sharing at most ``overlap`` units with it."""
        text = self.text
        cut_inside_word = not text[end].isspace()
        following = end if cut_inside_word else self.starts[bisect.bisect_left(self.starts, end)]
        if not self.overlap:
            return following
        first = bisect.bisect_right(self.starts, start)
        stop = bisect.bisect_left(self.starts, end)
        if self.tokens:
            first = max(first, stop - self.overlap)
        else:
            first = max(first, bisect.bisect_left(self.starts, end - self.overlap))
            # Overlap only as far as still lets the next chunk hold the word after this one whole.
            while first < stop and not self._fits(self.starts[first], following, cut_inside_word):
                first += 1
        if first < stop:
            sentence_starts = (i for i in range(first, stop) if i > 0 and self.levels[i - 1] >= _SENTENCE)
            return self.starts[next(sentence_starts, first)]
        if cut_inside_word and not self.tokens:
            chosen = max(end - self.overlap, start + 1)
            while text[chosen].isspace():
                chosen += 1
            return chosen
        return following

    def _fits(self, candidate: int, following: int, cut_inside_word: bool) -> bool:
        """Whether a chunk of characters starting at ``candidate`` can reach past the word at ``following``."""
        if cut_inside_word:
            return True  # the rest of an over-long word: any start makes progress
        word_end = self.ends[bisect.bisect_left(self.starts, following)]
        if word_end - following > self.size:
            return following - candidate < self.size
        return word_end - candidate <= self.size
