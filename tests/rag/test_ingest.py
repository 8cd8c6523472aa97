"""Reading documents: each file type, folders, bad files reported, nothing readable an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpurag.errors import InvalidInputError
from gpurag.rag.ingest import html_to_text, read_documents


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_a_text_file_is_one_document(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.txt", "First line.\r\nSecond line.\n")
    result = read_documents(path)
    assert [(d.text, d.source) for d in result.documents] == [("First line.\nSecond line.\n", str(path))]
    assert result.skipped == []


def test_markdown_is_read_as_is(tmp_path: Path) -> None:
    path = write(tmp_path / "README.md", "# Title\n\nSome *text*.\n")
    (document,) = read_documents([path]).documents
    assert document.text == "# Title\n\nSome *text*.\n"
    assert document.source == str(path)


def test_html_keeps_visible_text_and_breaks_paragraphs(tmp_path: Path) -> None:
    html = """<!doctype html><html><head><title>The  with
    statement</title><style>p { color: red }</style><script>var x = "<p>hidden</p>";</script></head>
    <body><h1>With</h1><p>The <b>with</b> statement wraps
    a block.</p><p>It calls &quot;__enter__&quot; &amp; __exit__.<br>Always.</p>
    <ul><li>one</li><li>two</li></ul><pre>with a:\n    pass</pre><noscript>enable js</noscript></body></html>"""
    path = write(tmp_path / "page.html", html)
    (document,) = read_documents(path).documents
    assert document.text == (
        'With\n\nThe with statement wraps a block.\n\nIt calls "__enter__" & __exit__.\nAlways.'
        "\n\none\n\ntwo\n\nwith a:\n    pass"
    )
    assert document.metadata == {"title": "The with statement"}


def test_html_without_closing_tags(tmp_path: Path) -> None:
    text, title = html_to_text("<p>one<p>two<div>three")
    assert (text, title) == ("one\n\ntwo\n\nthree", None)


def test_jsonl_gives_one_document_per_line_with_metadata(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "alpha", "id": 7, "lang": "en"}),
        "",
        json.dumps({"text": "beta"}),
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"title": "no text"}),
        json.dumps({"text": 3}),
        json.dumps({"text": "   "}),
    ]
    path = write(tmp_path / "docs.jsonl", "\n".join(lines) + "\n")
    result = read_documents(path)
    assert [(d.text, d.source, d.metadata) for d in result.documents] == [
        ("alpha", f"{path}:1", {"id": 7, "lang": "en"}),
        ("beta", f"{path}:3", {}),
    ]
    reasons = dict(result.skipped)
    assert reasons[f"{path}:4"].startswith("malformed JSON")
    assert reasons[f"{path}:5"] == "expected a JSON object, got list"
    assert reasons[f"{path}:6"] == "no 'text' field"
    assert reasons[f"{path}:7"] == "'text' is int, not a string"
    assert reasons[f"{path}:8"] == "empty 'text'"


def test_a_nested_folder_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a" / "z.md", "zed")
    write(tmp_path / "a" / "deeper" / "c.htm", "<p>see</p>")
    write(tmp_path / ".hidden" / "secret.txt", "hidden")
    write(tmp_path / ".dotfile.txt", "hidden too")
    result = read_documents(tmp_path)
    assert [d.text for d in result.documents] == ["see", "zed", "bee"]
    assert [d.source for d in result.documents] == sorted(d.source for d in result.documents)
    assert result.skipped == []


def test_bad_files_are_reported_not_fatal(tmp_path: Path) -> None:
    good = write(tmp_path / "good.txt", "fine")
    binary = write(tmp_path / "image.txt", b"\x89PNG\x00\x00\x01")
    latin1 = write(tmp_path / "latin1.md", "caf\xe9".encode("latin-1"))
    empty = write(tmp_path / "empty.txt", "  \n\n")
    other = write(tmp_path / "data.csv", "a,b\n1,2\n")
    missing = tmp_path / "missing.txt"
    result = read_documents([tmp_path, missing])
    assert [d.source for d in result.documents] == [str(good)]
    reasons = dict(result.skipped)
    assert reasons[str(binary)] == "binary file (contains NUL bytes)"
    assert reasons[str(latin1)].startswith("not UTF-8 text")
    assert reasons[str(empty)] == "no text"
    assert reasons[str(other)].startswith("unsupported file type '.csv'")
    assert reasons[str(missing)] == "no such file or folder"


def test_a_utf8_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    path = write(tmp_path / "bom.txt", "\ufeffhello".encode())
    assert read_documents(path).documents[0].text == "hello"


def test_nothing_readable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"no readable documents.*no files found"):
        read_documents(tmp_path)
    write(tmp_path / "x.bin", b"\x00")
    with pytest.raises(InvalidInputError, match=r"no readable documents.*x\.bin: unsupported file type"):
        read_documents(tmp_path)
    with pytest.raises(InvalidInputError, match="no readable documents"):
        read_documents([])
