"""The BM25 lexical index: scores, tokenisation, and its atomic, checksummed save."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from gpurag import storage
from gpurag.errors import IndexFormatError, InvalidInputError
from gpurag.rag.lexical import LexicalIndex

TEXTS = [
    "the with statement calls enter and exit",
    "a for loop over a list; the else clause runs after the loop",
    "exceptions propagate until a try statement handles them",
    "loop loop loop",
    "",
]


def bm25(query: list[str], documents: list[list[str]], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Lucene's BM25 as bm25s computes it; every document also holds the index's one sentinel token."""
    lengths = [len(document) + 1 for document in documents]
    average = sum(lengths) / len(lengths)
    scores = []
    for document, length in zip(documents, lengths, strict=True):
        total = 0.0
        for term in set(query):
            df = sum(1 for d in documents if term in d)
            if not df:
                continue
            idf = math.log(1 + (len(documents) - df + 0.5) / (df + 0.5))
            tf = document.count(term)
            total += idf * tf / (tf + k1 * (1 - b + b * length / average))
        scores.append(total)
    return scores


def test_an_installed_jax_is_neither_started_nor_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    """bm25s runs a JAX operation at import where JAX is installed (starting its GPU backend); gpurag does not."""
    started: list[str] = []

    def top_k(*_: object, **__: object) -> None:
        started.append("top_k")
        raise RuntimeError("Unable to initialize backend 'cuda': no supported devices found")

    jax, lax = types.ModuleType("jax"), types.ModuleType("jax.lax")
    lax.top_k = top_k  # type: ignore[attr-defined]
    jax.lax = lax  # type: ignore[attr-defined]
    for name in [name for name in sys.modules if name == "bm25s" or name.startswith("bm25s.")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, as in a new process
    monkeypatch.setitem(sys.modules, "jax", jax)
    monkeypatch.setitem(sys.modules, "jax.lax", lax)
    index = LexicalIndex.build(TEXTS)
    ((ids, _),) = index.search(["exceptions propagate"], k=2)
    assert ids.tolist() == [2]
    assert started == []
    assert sys.modules["jax"] is jax  # the caller's modules are put back
    assert sys.modules["jax.lax"] is lax


def test_scores_are_bm25() -> None:
    index = LexicalIndex.build(TEXTS)
    # What the tokenizer keeps of each text: words, no English stop words but Python keywords.
    documents = [
        ["with", "statement", "calls", "enter", "and", "exit"],  # "and" is a keyword
        ["for", "loop", "over", "list", "else", "clause", "runs", "after", "loop"],
        ["exceptions", "propagate", "until", "try", "statement", "handles", "them"],
        ["loop", "loop", "loop"],
        [],
    ]
    query = ["loop", "statement"]
    expected = bm25(query, documents)
    ((ids, scores),) = index.search(["loop statement"], 10)
    assert dict(zip(ids.tolist(), scores.tolist(), strict=True)) == pytest.approx(
        {i: s for i, s in enumerate(expected) if s > 0}, rel=1e-5
    )
    assert ids.tolist() == sorted(ids.tolist(), key=lambda i: -expected[i])


def test_python_keywords_are_words_but_stop_words_are_not() -> None:
    index = LexicalIndex.build(TEXTS)
    (with_ids, _), (the_ids, _), (for_ids, _) = index.search(["with", "the", "for"], 5)
    assert with_ids.tolist() == [0]
    assert the_ids.tolist() == []  # "the" is a stop word: no document matches it
    assert for_ids.tolist() == [1]


def test_only_matching_documents_at_most_k() -> None:
    index = LexicalIndex.build(TEXTS)
    (ids, scores), (none, nothing) = index.search(["loop", "zebra"], 1)
    assert ids.tolist() == [3]
    assert scores.dtype == np.float32
    assert scores[0] > 0
    assert none.tolist() == []
    assert nothing.tolist() == []


def test_texts_without_words_still_index() -> None:
    index = LexicalIndex.build(["!", "x"])
    assert len(index) == 2
    assert [ids.tolist() for ids, _ in index.search(["x", "!"], 3)] == [[1], []]


def test_bad_input_is_named() -> None:
    with pytest.raises(InvalidInputError, match="texts is empty"):
        LexicalIndex.build([])
    with pytest.raises(InvalidInputError, match=r"texts\[1\] must be a str; got int"):
        LexicalIndex.build(["a", 3])  # type: ignore[list-item]


def test_save_load_round_trip(tmp_path: Path) -> None:
    index = LexicalIndex.build(TEXTS)
    index.save(tmp_path / "lexical")
    manifest = storage.read_manifest(tmp_path / "lexical", kind="lexical")
    assert set(manifest["files"]) == {"vocab.json", "data.npy", "indices.npy", "indptr.npy"}
    loaded = LexicalIndex.load(tmp_path / "lexical")
    queries = ["loop statement", "try", "else clause", "nothing here"]
    for (a_ids, a_scores), (b_ids, b_scores) in zip(index.search(queries, 5), loaded.search(queries, 5), strict=True):
        assert a_ids.tolist() == b_ids.tolist()
        assert a_scores.tolist() == b_scores.tolist()


@pytest.mark.parametrize("damaged", ["vocab.json", "data.npy", "indptr.npy"])
def test_a_damaged_file_is_named(tmp_path: Path, damaged: str) -> None:
    LexicalIndex.build(TEXTS).save(tmp_path / "lexical")
    target = tmp_path / "lexical" / damaged
    data = bytearray(target.read_bytes())
    data[-2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=damaged):
        LexicalIndex.load(tmp_path / "lexical")


def test_other_tokenizer_settings_are_refused(tmp_path: Path) -> None:
    LexicalIndex.build(TEXTS).save(tmp_path / "lexical")
    path = tmp_path / "lexical" / storage.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["bm25"]["tokenizer"] = "something else"
    path.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="tokenizer"):
        LexicalIndex.load(tmp_path / "lexical")
