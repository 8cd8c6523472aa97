"""`LexicalIndex`: BM25 over chunk texts (through ``bm25s``), saved in gpurag's checked format.

On disk it is a directory written atomically and checked on load (see `gpurag.storage`)::

    manifest.json          kind "lexical": the BM25 parameters, document and term counts, checksums
    vocab.json             the terms, line by line in term-id order (a JSON list)
    data.npy, indices.npy, indptr.npy   bm25s's precomputed score matrix (CSC: terms x documents)

Text is split into lower-cased words (runs of letters, digits and ``_``) with English stop
words removed, except those that are Python keywords (``with``, ``for``, ``if``, ``not``...: in
a question about code they are the subject, not filler); documents and queries alike.
"""

from __future__ import annotations

import json
import keyword
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from gpurag import storage
from gpurag.errors import IndexFormatError, InvalidInputError

#: The manifest's ``kind`` for a lexical index.
KIND = "lexical"
VOCAB_FILE = "vocab.json"
_ARRAYS = ("data", "indices", "indptr")
#: BM25 parameters (Lucene's variant, as bm25s implements it).
K1, B, METHOD = 1.5, 0.75, "lucene"
#: The tokenizer's description, recorded in the manifest and checked on load.
TOKENIZER = "words; English stop words but Python keywords"
_TOKEN_PATTERN = r"(?u)\b\w+\b"
# Appended to every document so that a corpus of texts without words still indexes; no query has it.
_SENTINEL = "\x00"


def _bm25s() -> ModuleType:
    """The ``bm25s`` module, imported with JAX hidden from it.

    Where JAX is installed, importing bm25s runs a JAX operation, which starts JAX's GPU backend
    (taking most of a GPU's memory) or fails the import where that backend cannot start.
    gpurag scores with bm25s's NumPy backend only, so bm25s is imported as if JAX were absent.
    """
    if "bm25s" in sys.modules:
        loaded: ModuleType = sys.modules["bm25s"]
        return loaded
    hidden = {name: sys.modules.get(name) for name in ("jax", "jax.lax")}
    blocked: dict[str, Any] = dict.fromkeys(hidden)  # a None entry makes ``import jax`` raise ImportError
    sys.modules.update(blocked)
    try:
        import bm25s
    finally:
        for name, module in hidden.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module
    imported: ModuleType = bm25s
    return imported


def _stopwords() -> list[str]:
    english: list[str] = _bm25s().stopwords.STOPWORDS_EN
    kept = {word.lower() for word in (*keyword.kwlist, *keyword.softkwlist)}
    return [word for word in english if word not in kept]


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    bm25s = _bm25s()
    tokens: list[list[str]] = bm25s.tokenize(
        list(texts),
        token_pattern=_TOKEN_PATTERN,
        stopwords=_stopwords(),
        return_ids=False,
        show_progress=False,
        allow_empty=True,
    )
    return [[token for token in row if token] for row in tokens]


class LexicalIndex:
    """BM25 scores of documents 0..N-1 (chunk ids) for a batch of query texts.

    Make one with `build` or `load`; `search` gives each query's best documents.
    """

    def __init__(self, bm25: Any, count: int) -> None:
        self._bm25 = bm25
        self.count = int(count)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"LexicalIndex(documents={self.count}, terms={len(self._bm25.vocab_dict)})"

    @classmethod
    def build(cls, texts: Sequence[str]) -> LexicalIndex:
        """Index ``texts`` (document i is ``texts[i]``)."""
        bm25s = _bm25s()
        items = list(texts)
        if not items:
            raise InvalidInputError("texts is empty: there is nothing to index")
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise InvalidInputError(f"texts[{i}] must be a str; got {type(text).__name__}")
        bm25 = bm25s.BM25(k1=K1, b=B, method=METHOD, backend="numpy")
        bm25.index([[*row, _SENTINEL] for row in _tokenize(items)], show_progress=False)
        return cls(bm25, len(items))

    def search(self, queries: Sequence[str], k: int) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """Each query's documents with a positive BM25 score, best first, at most ``k``: (ids, scores).

        A query that shares no term with the index gets empty arrays. Ties go to the lower id.
        """
        rows = []
        for tokens in _tokenize(queries):
            ids = self._bm25.get_tokens_ids(tokens)
            if not ids:
                rows.append((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)))
                continue
            scores = np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float32)
            positive = np.flatnonzero(scores > 0)
            best = positive[np.lexsort((positive, -scores[positive]))][:k]
            rows.append((best.astype(np.int64), scores[best]))
        return rows

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to directory ``path`` atomically; an existing index there is replaced."""
        terms = len(self._bm25.scores["indptr"]) - 1
        # bm25s adds an empty token past the matrix's rows; the tokenizer never makes one.
        vocab = sorted((t for t, i in self._bm25.vocab_dict.items() if i < terms), key=self._bm25.vocab_dict.get)
        with storage.atomic_directory(path) as tmp:
            (tmp / VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            names = [VOCAB_FILE]
            for name in _ARRAYS:
                storage.write_array(tmp, f"{name}.npy", np.asarray(self._bm25.scores[name]))
                names.append(f"{name}.npy")
            manifest = {
                "kind": KIND,
                "bm25": {"k1": K1, "b": B, "method": METHOD, "tokenizer": TOKENIZER},
                "documents": self.count,
                "terms": len(vocab),
            }
            storage.write_manifest(tmp, manifest, files=names)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LexicalIndex:
        """Read an index that `save` wrote, checking every file."""
        bm25s = _bm25s()
        manifest = storage.read_manifest(path, kind=KIND)
        where = Path(manifest["path"])
        try:
            params, count = manifest["bm25"], int(manifest["documents"])
            bm25 = bm25s.BM25(k1=params["k1"], b=params["b"], method=params["method"], backend="numpy")
            vocab = json.loads((where / VOCAB_FILE).read_text(encoding="utf-8"))
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"{where / storage.MANIFEST} is damaged: {exc}") from exc
        if params.get("tokenizer") != TOKENIZER or not isinstance(vocab, list):
            raise IndexFormatError(f"{where} was written with other tokenizer settings; rebuild the index")
        arrays = {name: storage.read_array(manifest, f"{name}.npy") for name in _ARRAYS}
        if len(arrays["indptr"]) != len(vocab) + 1:
            raise IndexFormatError(f"{where} is inconsistent: {len(vocab)} terms, {len(arrays['indptr'])} pointers")
        bm25.scores = {**arrays, "num_docs": count}
        bm25.vocab_dict = {term: i for i, term in enumerate(vocab)}
        bm25.unique_token_ids_set = set(bm25.vocab_dict.values())
        bm25.nonoccurrence_array = None
        return cls(bm25, count)
