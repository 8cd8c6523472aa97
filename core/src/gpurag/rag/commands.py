"""The RAG sub-commands of ``gpurag``: ``index build``, ``index info`` and ``ask``."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from gpurag.errors import GpuragError
from gpurag.hookspecs import hookimpl


@contextmanager
def _errors_as_click() -> Iterator[None]:
    """Turn gpurag's own errors into a one-line message and exit status 1."""
    try:
        yield
    except GpuragError as exc:
        raise click.ClickException(str(exc)) from exc


@contextmanager
def _progress_bar(total: int, description: str) -> Iterator[Any]:
    """A tqdm bar on standard error counting chunks."""
    from tqdm import tqdm

    with tqdm(total=total, desc=description, unit="chunk", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar


def _describe_skipped(item: Any) -> str:
    path, reason = getattr(item, "path", None), getattr(item, "reason", None)
    if path is None and isinstance(item, tuple) and len(item) == 2:
        path, reason = item
    return f"{path}: {reason}" if path is not None else str(item)


@click.group("index")
def index_group() -> None:
    """Build and inspect corpus indexes for `gpurag ask`."""


@index_group.command("build")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Directory to write the index to.")
@click.option("--embedder", default=None, help="Embedder name or model path [setting: embedder].")
@click.option("--retriever", default="exact", show_default=True, help="Registered retriever to index with.")
@click.option("--device", default=None, help="Device for the embedder: cpu, cuda, cuda:1 [default: CUDA if any].")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, help="Chunk budget [setting: chunk_size].")
@click.option("--chunk-overlap", type=click.IntRange(min=0), default=None, help="Overlap [setting: chunk_overlap].")
@click.option(
    "--chunk-unit",
    type=click.Choice(["chars", "tokens"]),
    default=None,
    help="Unit of the budget [setting: chunk_unit].",
)
def build_command(
    paths: tuple[Path, ...],
    out: Path,
    embedder: str | None,
    retriever: str,
    device: str | None,
    chunk_size: int | None,
    chunk_overlap: int | None,
    chunk_unit: str | None,
) -> None:
    """Index the .txt, .md, .html and .jsonl files under PATHS into the corpus directory --out."""
    from gpurag.rag.chunking import chunk_documents
    from gpurag.rag.corpus import CorpusIndex
    from gpurag.rag.embedders import get_embedder
    from gpurag.rag.ingest import read_documents
    from gpurag.settings import get_settings
    from gpurag.storage import check_index_target

    settings = get_settings()
    with _errors_as_click():
        check_index_target(out)  # before the embedding, not after it
        ingested = read_documents(list(paths))
        for item in ingested.skipped:
            click.echo(f"skipped {_describe_skipped(item)}", err=True)
        chunks = chunk_documents(ingested.documents, size=chunk_size, overlap=chunk_overlap, unit=chunk_unit)
        click.echo(
            f"read {len(ingested.documents)} documents ({len(ingested.skipped)} files skipped), {len(chunks)} chunks",
            err=True,
        )
        model = get_embedder(embedder, device=device)
        started = time.perf_counter()
        with _progress_bar(len(chunks), "embedding") as bar:
            corpus = CorpusIndex.build(
                chunks,
                model,
                retriever,
                progress=bar.update,
                metadata={
                    "inputs": [str(p) for p in paths],
                    "chunk_size": settings.chunk_size if chunk_size is None else chunk_size,
                    "chunk_overlap": settings.chunk_overlap if chunk_overlap is None else chunk_overlap,
                    "chunk_unit": chunk_unit or settings.chunk_unit,
                },
            )
        elapsed = time.perf_counter() - started
        corpus.save(out)
    rate = len(chunks) / elapsed if elapsed > 0 else float("inf")
    device = getattr(model, "device", None)
    click.echo(
        f"indexed {len(chunks)} chunks from {len(ingested.documents)} documents in {elapsed:.1f} s "
        f"({rate:.1f} chunks/s) with {model.name}{f' on {device}' if device else ''}; wrote {out}"
    )
    if ingested.skipped:
        click.echo(f"skipped {len(ingested.skipped)} files (listed above)")


@index_group.command("info")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info_command(directory: Path, as_json: bool) -> None:
    """Describe the corpus index in DIRECTORY (checking every file)."""
    from gpurag.rag.corpus import read_corpus_manifest

    with _errors_as_click():
        manifest = read_corpus_manifest(directory)
    if as_json:
        click.echo(json.dumps(manifest, indent=2, sort_keys=True))
        return
    size = sum(p.stat().st_size for p in Path(manifest["path"]).rglob("*") if p.is_file())
    embedder, retriever, chunks = manifest["embedder"], manifest["retriever"], manifest["chunks"]
    click.echo(f"corpus:    {manifest['path']}")
    click.echo(f"embedder:  {embedder['name']} (dim {embedder['dim']})")
    click.echo(f"retriever: {retriever['name']} ({retriever.get('metric', '?')})")
    click.echo(f"chunks:    {chunks['count']} from {chunks.get('sources', '?')} sources")
    lexical = manifest.get("lexical")
    click.echo(f"lexical:   BM25 in {lexical['path']}/" if lexical else "lexical:   none saved (built on use)")
    click.echo(f"size:      {size / 1e6:.2f} MB")
    for key, value in sorted((manifest.get("metadata") or {}).items()):
        if value is not None:
            click.echo(f"  {key}: {value}")


@click.command("ask")
@click.argument("question")
@click.option(
    "--index",
    "index",
    type=click.Path(path_type=Path),
    default=None,
    help="Corpus directory [default corpus].",
)
@click.option("-k", "k", type=int, default=None, help="Passages to retrieve [setting: top_k].")
@click.option("--generator", default=None, help="Generator name [setting: generator].")
@click.option("--embedder", default=None, help="Embedder [the index's; for the default corpus: setting embedder].")
@click.option(
    "--retrieval",
    type=click.Choice(["dense", "lexical", "hybrid"]),
    default=None,
    help="Dense, lexical (BM25) or both fused [setting: retrieval].",
)
@click.option(
    "--reranker",
    type=click.Choice(["none", "sentence"]),
    default=None,
    help="Re-rank the first candidates [setting: reranker].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the answer, sources and timings as JSON.")
@click.option(
    "--stream/--no-stream",
    default=True,
    show_default=True,
    help="Print the answer's tokens as they come, with a generator that streams (local, transformers).",
)
@click.option(
    "--server",
    default=None,
    metavar="URL",
    help="Ask a running `gpurag serve` at URL (e.g. http://127.0.0.1:8000) instead of a local pipeline.",
)
@click.option("--api-key", envvar="GPURAG_API_KEY", default=None, help="Bearer key for --server [env GPURAG_API_KEY].")
def ask_command(
    question: str,
    index: Path | None,
    k: int | None,
    generator: str | None,
    embedder: str | None,
    retrieval: str | None,
    reranker: str | None,
    as_json: bool,
    stream: bool,
    server: str | None,
    api_key: str | None,
) -> None:
    """Answer QUESTION from a corpus index, or from Python's language reference when no --index is given."""
    from gpurag.arrays import check_k
    from gpurag.rag.pipeline import RAGPipeline
    from gpurag.settings import get_settings

    options = {"retrieval": retrieval, "reranker": reranker}
    if server is not None:
        local = {"--index": index, "--generator": generator, "--embedder": embedder, **options}
        given = [f"--{name}" if not name.startswith("-") else name for name, value in local.items() if value]
        if given:
            raise click.UsageError(f"--server asks the server's pipeline; {', '.join(given)} cannot be given with it")
        with _errors_as_click():
            _ask_server(server, question, k, stream=stream and not as_json, api_key=api_key, as_json=as_json)
        return
    with _errors_as_click():
        if k is not None:
            check_k(k, get_settings().max_k)  # before any model is loaded
        if index is not None:
            pipeline = RAGPipeline.from_index(index, embedder=embedder, generator=generator, **options)
        else:
            pipeline = _default_pipeline(embedder, generator, **options)
        if stream and not as_json and hasattr(pipeline.generator, "stream"):
            _stream_answer(pipeline, question, k)
            return
        answer = pipeline.answer(question, k)
    if as_json:
        record = {
            "question": answer.question,
            "answer": answer.answer,
            "sources": [vars(p) for p in answer.sources],
            "timings": answer.timings,
        }
        click.echo(json.dumps(record, indent=2))
        return
    click.echo(answer.answer)
    _echo_passages(answer.sources)


def _echo_passages(passages: list[Any]) -> None:
    click.echo("")
    click.echo("Passages retrieved (score, source):")
    for number, passage in enumerate(passages, start=1):
        click.echo(f"  [{number}] {passage.score:.3f}  {passage.source}")


def _stream_answer(pipeline: Any, question: str, k: int | None) -> None:
    """Retrieve ``question``'s passages, then print the answer's text as the generator streams it."""
    from gpurag.arrays import check_k
    from gpurag.settings import get_settings

    if not question.strip():
        raise click.BadParameter("expected a question", param_hint="QUESTION")
    k = get_settings().top_k if k is None else check_k(k)
    (passages,), _ = pipeline.retrieve_batch([question], k)
    for piece in pipeline.generator.stream([question], [passages]):
        click.echo(piece.text, nl=False)
        sys.stdout.flush()
    click.echo("")
    _echo_passages(list(passages))


def _ask_server(url: str, question: str, k: int | None, *, stream: bool, api_key: str | None, as_json: bool) -> None:
    """Ask the server at ``url``; print its answer (as it streams) and passages, or its JSON response."""
    from types import SimpleNamespace

    from gpurag.rag.remote import ask_server

    def show(text: str, reset: bool) -> None:
        if reset:  # the server retried the batch and its text changed: start the answer again
            click.echo("\n[the answer restarts]")
        click.echo(text, nl=False)
        sys.stdout.flush()

    response = ask_server(url, question, k, stream=stream, api_key=api_key, on_text=show if stream else None)
    if as_json:
        click.echo(json.dumps(response, indent=2))
        return
    click.echo("" if stream else response["answer"])
    _echo_passages([SimpleNamespace(**source) for source in response["sources"]])


def _default_pipeline(embedder_name: str | None, generator: str | None, **options: Any) -> Any:
    """The default pipeline; a first build of the default corpus shows a progress bar."""
    from gpurag.rag import default_corpus
    from gpurag.rag.embedders import get_embedder
    from gpurag.rag.pipeline import RAGPipeline

    embedder = get_embedder(embedder_name)
    if default_corpus.is_cached(embedder):
        return RAGPipeline.default(embedder=embedder, generator=generator, **options)
    where = default_corpus.cache_path(embedder)
    click.echo(f"indexing Python's language reference once, into {where}", err=True)
    with _progress_bar(len(default_corpus.default_chunks()), "embedding") as bar:
        return RAGPipeline.default(embedder=embedder, generator=generator, progress=bar.update, **options)


@hookimpl
def register_commands(cli: Any) -> None:
    """Add ``index build``, ``index info`` and ``ask`` to the ``gpurag`` command."""
    cli.add_command(index_group)
    cli.add_command(ask_command)
