"""Reading documents from files and folders: plain text, Markdown, HTML and JSON Lines.

Files that cannot be read (missing, binary, not UTF-8, malformed) are reported, not fatal:
`read_documents` returns them in `IngestResult.skipped` with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from gpurag.errors import InvalidInputError
from gpurag.rag.types import Document

#: The file types `read_documents` understands, by lower-case suffix.
SUPPORTED_SUFFIXES = (".txt", ".md", ".html", ".htm", ".jsonl")

PathLike = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class IngestResult:
    """The documents read, in path order, and the ``(path, reason)`` of everything left out."""

    documents: list[Document]
    skipped: list[tuple[str, str]]


class _UnreadableError(Exception):
    """A file that is left out; the message is the reason."""


def read_documents(paths: PathLike | Iterable[PathLike]) -> IngestResult:
    """Read every supported file under ``paths`` (files, or folders searched recursively).

    ``.txt`` and ``.md`` files are one document each; ``.html``/``.htm`` files one document of
    their visible text (title in the metadata); ``.jsonl`` files one document per line, from the
    line's ``text`` field, its other fields becoming metadata and its source ``path:line``.
    Files are read in sorted path order; hidden files and folders inside a folder are ignored.
    Raises `InvalidInputError` when nothing readable was found.
    """
    roots = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    skipped: list[tuple[str, str]] = []
    files: dict[str, Path] = {}
    for root in roots:
        path = Path(root)
        if path.is_dir():
            for found in path.rglob("*"):
                relative = found.relative_to(path)
                if found.is_file() and not any(part.startswith(".") for part in relative.parts):
                    files.setdefault(str(found), found)
        elif path.is_file():
            files.setdefault(str(path), path)
        elif path.exists():
            skipped.append((str(path), "not a regular file or folder"))
        else:
            skipped.append((str(path), "no such file or folder"))

    documents: list[Document] = []
    for name in sorted(files):
        path = files[name]
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            skipped.append(
                (name, f"unsupported file type {suffix or '(none)'!r}; supported: " + ", ".join(SUPPORTED_SUFFIXES))
            )
            continue
        try:
            text = _read_text(path)
            if suffix == ".jsonl":
                documents.extend(_read_jsonl(name, text, skipped))
            else:
                document = _html_document(name, text) if suffix in (".html", ".htm") else Document(text, name)
                if not document.text.strip():
                    raise _UnreadableError("no text")
                documents.append(document)
        except _UnreadableError as error:
            skipped.append((name, str(error)))

    if not documents:
        what = ", ".join(str(root) for root in roots) or "(no paths given)"
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise InvalidInputError(
            f"no readable documents in {what}" + (f" (skipped {reasons}{more})" if reasons else " (no files found)")
        )
    return IngestResult(documents, skipped)


def _read_text(path: Path) -> str:
    """The file's text, with line endings made ``\\n``; `_UnreadableError` when it is not UTF-8 text."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _UnreadableError(f"cannot read: {error.strerror or error}") from error
    if b"\x00" in data:
        raise _UnreadableError("binary file (contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _UnreadableError(f"not UTF-8 text (invalid byte at offset {error.start})") from error
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_jsonl(name: str, text: str, skipped: list[tuple[str, str]]) -> list[Document]:
    """One document per non-blank line; bad lines go to ``skipped`` as ``path:line``."""
    documents = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        source = f"{name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            skipped.append((source, f"malformed JSON: {error.msg} at column {error.colno}"))
            continue
        if not isinstance(record, dict):
            skipped.append((source, f"expected a JSON object, got {type(record).__name__}"))
            continue
        body = record.pop("text", None)
        if not isinstance(body, str):
            reason = "no 'text' field" if body is None else f"'text' is {type(body).__name__}, not a string"
            skipped.append((source, reason))
            continue
        if not body.strip():
            skipped.append((source, "empty 'text'"))
            continue
        documents.append(Document(body, source, record))
    if not documents and not any(skip[0].startswith(f"{name}:") for skip in skipped):
        raise _UnreadableError("no text")
    return documents


def html_to_text(html: str) -> tuple[str, str | None]:
    """The visible text of an HTML page, paragraphs separated by blank lines, and its title."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return "\n\n".join(parser.paragraphs), parser.title


def _html_document(name: str, html: str) -> Document:
    text, title = html_to_text(html)
    metadata: dict[str, Any] = {"title": title} if title else {}
    return Document(text, name, metadata)


_BLOCK_TAGS = frozenset(
    "address article aside blockquote body caption dd details dialog div dl dt fieldset figcaption "  # noqa: SIM905
    "figure footer form h1 h2 h3 h4 h5 h6 header hr html li main nav ol p pre section summary "
    "table tbody thead tfoot tr ul".split()
)
_HIDDEN_TAGS = frozenset({"script", "style", "noscript", "template"})
_CELL_TAGS = frozenset({"td", "th"})
_SPACES = re.compile(r"[^\S\n]+")


class _TextExtractor(HTMLParser):
    """Collects visible text: block elements end paragraphs, ``<br>`` ends a line, ``<pre>`` is kept."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.title: str | None = None
        self._buffer: list[str] = []
        self._hidden = 0
        self._pre = 0
        self._in_title = False
        self._title_parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _HIDDEN_TAGS:
            self._hidden += 1
        elif tag == "br":
            self._buffer.append("\n")
        elif tag in _CELL_TAGS:
            self._buffer.append(" ")
        elif tag in _BLOCK_TAGS:
            self._flush()
            if tag == "pre":
                self._pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
            self.title = " ".join("".join(self._title_parts).split()) or None
        elif tag in _HIDDEN_TAGS:
            self._hidden = max(0, self._hidden - 1)
        elif tag in _CELL_TAGS:
            self._buffer.append(" ")
        elif tag in _BLOCK_TAGS:
            self._flush()
            if tag == "pre":
                self._pre = max(0, self._pre - 1)

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._title_parts.append(data)
        elif not self._hidden:
            self._buffer.append(data if self._pre else data.replace("\n", " "))

    def close(self) -> None:
        super().close()
        self._flush()

    def _flush(self) -> None:
        text = "".join(self._buffer)
        self._buffer.clear()
        if self._pre:
            text = text.strip("\n").rstrip()
        else:
            lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
            text = "\n".join(line for line in lines if line)
        if text.strip():
            self.paragraphs.append(text)
