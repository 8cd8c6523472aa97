"""Citations like ``[2]`` in a generated answer: those to passages that were not given are removed.

`CitationFilter` works on text as it streams in, holding back only what may still become a
citation, so that a streamed answer and the finished one read the same. Brackets inside code
(between backticks) or right after a name or a closing bracket (``items[7]``, ``f(x)[0]``) are
subscripts, not citations: they are left as written.
"""

from __future__ import annotations

import re

#: A citation: one or more passage numbers in square brackets, ``[2]`` or ``[1, 3]``.
CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_MAY_BECOME_CITATION = re.compile(r"\[[\d\s,]*")
_LONGEST_CITATION = 24
_CLOSING_PUNCTUATION = frozenset(".,;:!?)")
_SUBSCRIPTED = frozenset(")]_")  # a "[" right after one of these (or a letter or digit) is a subscript


class CitationFilter:
    """Passes text through, keeping only citations to passages 1 to ``passage_count``.

    ``[7]`` with three passages is removed with the space before it; ``[2, 7]`` becomes ``[2]``.
    Feed text in any pieces with `feed`, then call `finish`; the pieces returned, joined, are
    `check_citations` of the whole text.
    """

    def __init__(self, passage_count: int) -> None:
        self.passage_count = passage_count
        self.cited: list[int] = []  # valid passage numbers, in the order first cited
        self.removed: list[int] = []  # invalid numbers removed
        self._pending = ""  # a "[..." that may still become a citation
        self._space = ""  # whitespace not yet passed on: dropped if a removed citation follows
        self._after_removal = False
        self._started = False  # any text passed on yet
        self._in_code = False  # inside backticks (an odd number of them so far)
        self._last = ""  # the last character taken outside a "[..." held back

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was fed before) that can be passed on now."""
        out: list[str] = []
        for char in text:
            self._take(char, out)
        return "".join(out)

    def finish(self) -> str:
        """What was held back: an unclosed ``[`` and what follows it."""
        out = ["" if self._after_removal and not self._pending else self._space, self._pending]
        self._pending = self._space = ""
        return "".join(out)

    def _take(self, char: str, out: list[str]) -> None:
        if self._pending:
            self._pending += char
            if char == "]":
                self._close(out)
            elif not _MAY_BECOME_CITATION.fullmatch(self._pending) or len(self._pending) > _LONGEST_CITATION:
                text, self._pending = self._pending, ""
                out.append(self._space + text[0])
                self._started = True
                self._space = ""
                self._after_removal = False
                for rest in text[1:]:
                    self._take(rest, out)
            return
        subscript = self._in_code or self._last.isalnum() or self._last in _SUBSCRIPTED
        self._last = char
        if char == "`":
            self._in_code = not self._in_code
        if char == "[" and not subscript:
            self._pending = char
        elif char.isspace():
            if not (self._after_removal and (self._space or not self._started)):  # one space where one was removed
                self._space += char
        else:
            if not (self._after_removal and char in _CLOSING_PUNCTUATION):
                out.append(self._space)
            self._space = ""
            self._after_removal = False
            out.append(char)
            self._started = True

    def _close(self, out: list[str]) -> None:
        text, self._pending = self._pending, ""
        match = CITATION.fullmatch(text)
        if match is None:  # "[]", "[,]": not a citation
            out.append(self._space + text)
            self._started = True
            self._space = ""
            self._after_removal = False
            return
        numbers = [int(n) for n in re.split(r"\s*,\s*", match.group(1))]
        valid = list(dict.fromkeys(n for n in numbers if 1 <= n <= self.passage_count))
        self.removed.extend(n for n in numbers if not 1 <= n <= self.passage_count)
        if not valid:
            self._after_removal = True  # the space before stays pending: dropped before punctuation
            return
        self.cited.extend(n for n in valid if n not in self.cited)
        out.append(self._space + "[" + ", ".join(str(n) for n in valid) + "]")
        self._started = True
        self._space = ""
        self._after_removal = False


def check_citations(text: str, passage_count: int) -> str:
    """``text`` with its citations to passages outside 1..``passage_count`` removed."""
    citations = CitationFilter(passage_count)
    return citations.feed(text) + citations.finish()
