"""The RAG sub-commands: ``gpurag index build``, ``gpurag index info`` and ``gpurag ask``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from gpurag.cli import add_plugin_commands, cli
from gpurag.rag.corpus import CorpusIndex
from gpurag.rag.pipeline import TIMING_KEYS
from gpurag.settings import get_settings


@pytest.fixture
def gpurag_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[click.Group]:
    """The ``gpurag`` group with the plugins' commands, settings read with a temporary cache."""
    monkeypatch.setenv("GPURAG_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    add_plugin_commands()
    yield cli
    monkeypatch.undo()
    get_settings.cache_clear()


def run(group: click.Group, *args: str) -> Result:
    return CliRunner().invoke(group, list(args), catch_exceptions=False)


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "with.md").write_text(
        "# The with statement\n\nThe with statement wraps a block with the methods of a context manager. "
        "The __enter__ method runs before the block and __exit__ runs after it, even on an exception.\n"
    )
    (folder / "sub" / "loops.txt").write_text(
        "A for loop iterates over an iterable. A while loop repeats while its condition is true.\n\n"
        "The break statement ends the innermost loop; continue skips to its next iteration.\n"
    )
    (folder / "notes.jsonl").write_text(
        json.dumps({"text": "The try statement handles exceptions with except clauses.", "topic": "try"}) + "\n"
    )
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return folder


@pytest.fixture
def built(gpurag_cli: click.Group, docs: Path, tmp_path: Path) -> Path:
    out = tmp_path / "index"
    result = run(gpurag_cli, "index", "build", str(docs), "--out", str(out), "--embedder", "hashing")
    assert result.exit_code == 0, result.output
    return out


def test_commands_are_registered(gpurag_cli: click.Group) -> None:
    result = run(gpurag_cli, "--help")
    assert "ask" in result.output
    assert "index" in result.output
    assert "build" in run(gpurag_cli, "index", "--help").output


def test_index_build(gpurag_cli: click.Group, docs: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    result = run(gpurag_cli, "index", "build", str(docs), "--out", str(out), "--embedder", "hashing")
    assert result.exit_code == 0, result.output
    assert "chunks/s" in result.output
    assert "image.png" in result.output  # reported as skipped
    assert "skipped 1 files" in result.output
    corpus = CorpusIndex.load(out)
    assert corpus.embedder_name == "hashing"
    assert any(source.endswith("with.md") for source in corpus.sources)
    assert any(source.endswith("loops.txt") for source in corpus.sources)
    assert corpus._lexical is not None  # the BM25 index was built and saved with the rest
    assert "lexical/manifest.json" in json.loads((out / "manifest.json").read_text())["files"]
    assert corpus.lexical_rankings(["innermost loop"], 3)[0][0].size > 0


def test_ask_retrieval_options(gpurag_cli: click.Group, built: Path) -> None:
    for mode in ("dense", "lexical", "hybrid"):
        result = run(gpurag_cli, "ask", "what does break do?", "--index", str(built), "--retrieval", mode, "--json")
        assert result.exit_code == 0, result.output
        timings = json.loads(result.output)["timings"]
        assert (timings["lexical_s"] > 0) == (mode != "dense"), mode
        assert (timings["search_s"] > 0) == (mode != "lexical"), mode
    result = CliRunner().invoke(gpurag_cli, ["ask", "q", "--index", str(built), "--retrieval", "sparse"])
    assert result.exit_code == 2
    assert "sparse" in result.output


def test_index_build_with_chunk_options(gpurag_cli: click.Group, docs: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    result = run(
        gpurag_cli,
        *("index", "build", str(docs / "sub" / "loops.txt"), "--out", str(out), "--embedder", "hashing"),
        *("--chunk-size", "60", "--chunk-overlap", "10", "--chunk-unit", "chars"),
    )
    assert result.exit_code == 0, result.output
    corpus = CorpusIndex.load(out)
    assert len(corpus) > 1
    assert all(len(chunk.text) <= 60 for chunk in corpus.chunks)


def test_index_build_errors(gpurag_cli: click.Group, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(gpurag_cli, ["index", "build", str(empty), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "no readable documents" in result.output
    result = CliRunner().invoke(gpurag_cli, ["index", "build", str(tmp_path / "missing"), "--out", "x"])
    assert result.exit_code == 2  # click's own usage error


def test_index_info(gpurag_cli: click.Group, built: Path) -> None:
    result = run(gpurag_cli, "index", "info", str(built))
    assert result.exit_code == 0, result.output
    assert "hashing (dim 256)" in result.output
    assert "lexical:   BM25 in lexical/" in result.output
    assert "exact" in result.output
    manifest = json.loads(run(gpurag_cli, "index", "info", str(built), "--json").output)
    assert manifest["kind"] == "corpus"
    assert manifest["chunks"]["count"] == len(CorpusIndex.load(built))


def test_index_info_on_a_folder_that_is_not_an_index(gpurag_cli: click.Group, tmp_path: Path) -> None:
    result = CliRunner().invoke(gpurag_cli, ["index", "info", str(tmp_path)])
    assert result.exit_code == 1
    assert "not a gpurag index" in result.output


def test_ask_an_index(gpurag_cli: click.Group, built: Path) -> None:
    result = run(gpurag_cli, "ask", "what does the with statement do?", "--index", str(built), "-k", "2")
    assert result.exit_code == 0, result.output
    assert "context manager" in result.output
    assert "[1]" in result.output
    assert "[2]" in result.output
    assert "with.md" in result.output


def test_ask_as_json(gpurag_cli: click.Group, built: Path) -> None:
    result = run(
        gpurag_cli, "ask", "what does break do to the innermost loop?", "--index", str(built), "--json", "-k", "1"
    )
    record = json.loads(result.output)
    assert record["question"] == "what does break do to the innermost loop?"
    assert len(record["sources"]) == 1
    assert record["sources"][0]["source"].endswith("loops.txt")
    assert tuple(record["timings"]) == TIMING_KEYS


def test_ask_errors(gpurag_cli: click.Group, built: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(gpurag_cli, ["ask", "question", "--index", str(built), "-k", "0"])
    assert result.exit_code == 1
    assert "k must be >= 1" in result.output
    result = CliRunner().invoke(gpurag_cli, ["ask", "   ", "--index", str(built)])
    assert result.exit_code == 1
    assert "empty" in result.output
    result = CliRunner().invoke(gpurag_cli, ["ask", "question", "--index", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_ask_the_default_corpus(gpurag_cli: click.Group, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPURAG_EMBEDDER", "hashing")
    get_settings.cache_clear()
    result = run(gpurag_cli, "ask", "how does the with statement work?")
    assert result.exit_code == 0, result.output
    assert "pydoc:with" in result.output
    assert "indexing Python's language reference" in result.output
    again = run(gpurag_cli, "ask", "how does the with statement work?")
    assert "indexing" not in again.output  # cached now
