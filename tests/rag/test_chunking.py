"""Chunking: the guarantees (property-tested) and the boundary preferences (by example)."""

from __future__ import annotations

import bisect
import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpurag.errors import InvalidInputError
from gpurag.rag.chunking import chunk_documents, chunk_text
from gpurag.rag.types import Chunk, Document
from gpurag.settings import get_settings

WORDS = st.text(alphabet="abcxyz", min_size=1, max_size=14)
SEPARATORS = st.sampled_from([" ", " ", " ", "  ", "\n", "\n\n", ". ", "! ", "? ", ".\n\n", '." ', "\t", " \n \n "])
STRUCTURED = st.lists(st.tuples(WORDS, SEPARATORS), max_size=60).map(lambda parts: "".join(a + b for a, b in parts))
RANDOM = st.text(alphabet="ab .!?\n\t\u00a0é", max_size=200)
TEXTS = st.one_of(STRUCTURED, RANDOM)


@st.composite
def budgets(draw: st.DrawFn) -> tuple[int, int, str]:
    unit = draw(st.sampled_from(["chars", "tokens"]))
    size = draw(st.integers(1, 40 if unit == "chars" else 12))
    overlap = draw(st.integers(0, size - 1))
    return size, overlap, unit


def units(text: str, unit: str) -> int:
    return len(text) if unit == "chars" else len(text.split())


@given(TEXTS, budgets())
def test_chunks_are_within_budget_cover_all_text_and_overlap_at_most_as_asked(
    text: str, budget: tuple[int, int, str]
) -> None:
    size, overlap, unit = budget
    spans = chunk_text(text, size, overlap, unit)

    # Within budget, trimmed, in order.
    for start, end in spans:
        piece = text[start:end]
        assert piece
        assert piece == piece.strip()
        assert units(piece, unit) <= size
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in itertools.pairwise(spans))

    # No text lost: every non-whitespace character lies in a chunk.
    covered = [False] * len(text)
    for start, end in spans:
        covered[start:end] = [True] * (end - start)
    assert all(covered[i] for i, char in enumerate(text) if not char.isspace())
    if not text.strip():
        assert spans == []

    # Neighbours share at most `overlap` units.
    for (_, previous_end), (start, _) in itertools.pairwise(spans):
        shared = text[start:previous_end] if start < previous_end else ""
        assert units(shared, unit) <= overlap

    # Only a word longer than a whole chars budget is ever cut.
    words = [m.span() for m in re.finditer(r"\S+", text)]
    for start, end in spans:
        for cut in (start, end):
            word_start, word_end = words[bisect.bisect_right([w[0] for w in words], cut) - 1]
            if word_start < cut < word_end:
                assert unit == "chars"
                assert word_end - word_start > size


@given(st.lists(TEXTS, max_size=4), budgets())
def test_chunks_keep_source_position_start_and_metadata(texts: list[str], budget: tuple[int, int, str]) -> None:
    size, overlap, unit = budget
    documents = [Document(text, f"doc{i}", {"n": i}) for i, text in enumerate(texts)]
    chunks = chunk_documents(documents, size, overlap, unit)
    for document in documents:
        mine = [c for c in chunks if c.source == document.source]
        assert [c.position for c in mine] == list(range(len(mine)))
        assert [(c.start, c.start + len(c.text)) for c in mine] == chunk_text(document.text, size, overlap, unit)
        for chunk in mine:
            assert document.text[chunk.start : chunk.start + len(chunk.text)] == chunk.text
            assert chunk.metadata == document.metadata
            assert chunk.metadata is not document.metadata


def pieces(text: str, size: int, overlap: int = 0, unit: str = "chars") -> list[str]:
    return [text[s:e] for s, e in chunk_text(text, size, overlap, unit)]


def test_a_paragraph_break_is_preferred_over_a_later_sentence_end() -> None:
    text = "One two three. Four five six.\n\nSeven eight. Nine ten eleven. Twelve."
    assert pieces(text, 50) == ["One two three. Four five six.", "Seven eight. Nine ten eleven. Twelve."]


def test_a_sentence_end_is_preferred_over_a_later_space() -> None:
    text = "Alpha beta gamma delta. Epsilon zeta eta theta iota kappa mu."
    assert pieces(text, 40) == ["Alpha beta gamma delta.", "Epsilon zeta eta theta iota kappa mu."]


def test_an_early_paragraph_break_does_not_make_a_tiny_chunk() -> None:
    text = "Hi.\n\nAlpha beta gamma delta epsilon. Zeta eta theta iota kappa lambda mu."
    assert pieces(text, 40)[0] == "Hi.\n\nAlpha beta gamma delta epsilon."


def test_whitespace_is_preferred_over_a_hard_cut_and_long_words_are_cut() -> None:
    assert pieces("aaaa bbbb cccc", 7) == ["aaaa", "bbbb", "cccc"]
    assert pieces("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


def test_token_budget_counts_words() -> None:
    text = "one two three four five six seven"
    assert pieces(text, 3, unit="tokens") == ["one two three", "four five six", "seven"]
    assert pieces(text, 3, 1, unit="tokens") == ["one two three", "three four five", "five six seven"]
    assert pieces("a-very-long-word-counts-as-one token", 1, unit="tokens") == [
        "a-very-long-word-counts-as-one",
        "token",
    ]


def test_overlap_starts_at_a_sentence_when_one_is_in_reach() -> None:
    text = "Aaa bbb ccc. Ddd eee. Fff ggg hhh iii jjj kkk lll."
    first, second, *_ = pieces(text, 24, 12)
    assert first == "Aaa bbb ccc. Ddd eee."
    assert second.startswith("Ddd eee.")


def test_empty_and_whitespace_only_documents_give_no_chunks() -> None:
    assert chunk_text("", 10) == []
    assert chunk_documents([Document(" \n\t ", "blank"), Document("", "empty")], 10, 0) == []


@pytest.mark.parametrize(
    ("size", "overlap", "unit", "message"),
    [
        (10, 10, "chars", r"chunk_overlap \(10\) must be smaller than chunk_size \(10\)"),
        (10, 12, "tokens", r"chunk_overlap \(12\) must be smaller than chunk_size \(10\), both in tokens"),
        (0, 0, "chars", "chunk_size must be an integer >= 1, got 0"),
        (10, -1, "chars", "chunk_overlap must be an integer >= 0, got -1"),
        (10, 0, "words", "chunk_unit must be one of chars, tokens, got 'words'"),
    ],
)
def test_bad_budgets_are_clear_errors(size: int, overlap: int, unit: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        chunk_text("some text", size, overlap, unit)
    with pytest.raises(InvalidInputError, match=message):
        chunk_documents([], size, overlap, unit)


def test_defaults_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPURAG_CHUNK_SIZE", "2")
    monkeypatch.setenv("GPURAG_CHUNK_OVERLAP", "0")
    monkeypatch.setenv("GPURAG_CHUNK_UNIT", "tokens")
    get_settings.cache_clear()
    try:
        chunks = chunk_documents([Document("one two three four five", "d", {"k": "v"})])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert [(c.text, c.position, c.start, c.source) for c in chunks] == [
        ("one two", 0, 0, "d"),
        ("three four", 1, 8, "d"),
        ("five", 2, 19, "d"),
    ]


# --- titles and section headings ---------------------------------------------------------------

REST = """Top heading
***********

Intro text.

First section
=============

Body of the first section.

Sub section
-----------

Body of the sub section.

Second section
==============

Body of the second section.
a line
======
not a heading: no blank line before it."""


def test_section_headings_of_restructured_text() -> None:
    from gpurag.rag.chunking import section_headings

    found = section_headings(REST)
    assert [(level, heading) for _, level, heading in found] == [
        (0, "Top heading"),
        (1, "First section"),
        (2, "Sub section"),
        (1, "Second section"),
    ]
    assert [REST[offset:].split("\n")[0] for offset, _, _ in found] == [h for _, _, h in found]


def test_section_headings_of_markdown() -> None:
    from gpurag.rag.chunking import section_headings

    text = "# Guide\n\nintro\n\n## Install ##\n\npip\n\n### From source\n\nmake\n\n## Use\n\nrun\n    # a comment"
    assert [(level, h) for _, level, h in section_headings(text)] == [
        (0, "Guide"),
        (1, "Install"),
        (2, "From source"),
        (1, "Use"),
    ]


def test_headings_in_force_at_an_offset() -> None:
    from gpurag.rag.chunking import headings_at, section_headings

    found = section_headings(REST)
    assert headings_at(found, 0) == ("Top heading",)
    assert headings_at([(5, 0, "Late")], 0) == ()
    assert headings_at(found, REST.index("Intro")) == ("Top heading",)
    assert headings_at(found, REST.index("Body of the sub")) == ("Top heading", "First section", "Sub section")
    assert headings_at(found, REST.index("Body of the second")) == ("Top heading", "Second section")
    # A chunk that starts at a heading's line belongs to that section.
    assert headings_at(found, REST.index("Second section")) == ("Top heading", "Second section")
    assert headings_at(found, REST.index("Second section") - 1) == ("Top heading", "First section", "Sub section")


def test_chunks_carry_title_and_headings_outside_their_text() -> None:
    document = Document(REST, "doc.rst", {"title": "The guide"})
    chunks = chunk_documents([document], size=60, overlap=0, unit="chars")
    assert all(chunk.title == "The guide" for chunk in chunks)
    sub = next(chunk for chunk in chunks if chunk.text.startswith("Sub section"))
    assert sub.headings == ("Top heading", "First section", "Sub section")
    assert sub.context() == "The guide > Top heading > First section > Sub section"
    assert sub.indexed_text() == f"{sub.context()}\n\n{sub.text}"
    assert "The guide" not in sub.text
    # Text between the chunks is what the document holds, nothing added.
    assert all(document.text[c.start : c.start + len(c.text)] == c.text for c in chunks)


def test_a_title_repeated_as_the_first_heading_is_given_once() -> None:
    chunk = Chunk(text="t", source="s", position=0, start=0, title="with", headings=("with", "with", "Details"))
    assert chunk.context() == "with > Details"
    assert Chunk(text="t", source="s", position=0, start=0).indexed_text() == "t"
