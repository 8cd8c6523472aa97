"""The text processing of extractive answers: stemmed terms, a question's terms, a passage's prose sentences."""

from __future__ import annotations

import keyword
import re

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


def stem(word: str) -> str:
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


def content_terms(text: str) -> list[str]:
    """The stemmed terms of ``text``, stopwords left out."""
    words = (word.lower() for word in _TERM.findall(text))
    return [stem(word) for word in words if word not in _STOPWORDS]


def question_terms(question: str) -> list[str]:
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
        kept.append(stem(word))
    return sorted(set(kept))


def prose_sentences(text: str) -> list[str]:
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
