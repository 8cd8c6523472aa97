"""Retrieval quality per retrieval mode on two corpora: hit@1, hit@5 and MRR@10.

Corpora and their question sets:

- ``pydoc``: the default corpus (Python's language reference, `pydoc_data.topics`) with
  `rag_eval_questions.jsonl`; each question lists the pydoc topics whose text answers it.
- ``stdlib``: the docstrings of some standard-library modules (`stdlib_corpus.py`) with
  `rag_eval_stdlib_questions.jsonl`; each question lists the ``module.name`` documents that answer it.

A question is a hit at k when one of its k best passages comes from one of its expected sources;
MRR@10 averages 1/rank of the first such passage within the first 10 (0 when none). Every
configuration retrieves the whole question set in one `RAGPipeline.retrieve_batch`::

    python benchmarks/rag_eval.py                                   # both corpora, every mode
    python benchmarks/rag_eval.py --rerank                          # and with the sentence re-ranker
    python benchmarks/rag_eval.py --out benchmarks/results/rag_eval.md

Indexes are built on first use and cached (the default corpus under the ``cache_dir`` setting,
as `gpurag ask` does; the stdlib corpus beside it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
QUESTIONS = HERE / "rag_eval_questions.jsonl"
STDLIB_QUESTIONS = HERE / "rag_eval_stdlib_questions.jsonl"
TARGET_HIT_AT_1 = 0.92
TARGET_HIT_AT_5 = 0.98
DEPTH = 10


def read_questions(path: Path = QUESTIONS) -> list[dict[str, Any]]:
    """The evaluation set: ``{"question": str, "sources": [str, ...]}`` per line.

    A pydoc line lists ``topics`` instead; they become the sources ``pydoc:<topic>``.
    """
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, record in enumerate(records, start=1):
        if "topics" in record:
            record["sources"] = [f"pydoc:{topic}" for topic in record["topics"]]
        elif record.get("sources"):
            record["sources"] = [f"py:{source}" for source in record["sources"]]
        if not isinstance(record.get("question"), str) or not record.get("sources"):
            raise ValueError(f"{path}:{number}: expected a question and a non-empty list of topics or sources")
    return records


def score(records: list[dict[str, Any]], passages: list[list[Any]]) -> dict[str, Any]:
    """hit@1, hit@5, MRR@10 and each question's rank (None beyond 10) and sources."""
    rows = []
    for record, found in zip(records, passages, strict=True):
        expected = set(record["sources"])
        sources = [passage.source for passage in found]
        rank = next((i + 1 for i, source in enumerate(sources[:DEPTH]) if source in expected), None)
        rows.append({"question": record["question"], "expected": sorted(expected), "sources": sources, "rank": rank})
    count = len(rows)
    return {
        "hit@1": sum(1 for row in rows if row["rank"] == 1) / count,
        "hit@5": sum(1 for row in rows if row["rank"] is not None and row["rank"] <= 5) / count,
        "mrr@10": sum(1 / row["rank"] for row in rows if row["rank"]) / count,
        "rows": rows,
    }


def stdlib_corpus(embedder: Any, titles: bool, rebuild: bool = False) -> Any:
    """The stdlib corpus indexed with ``embedder``, cached beside the default corpus."""
    from gpurag.errors import IndexFormatError
    from gpurag.rag.chunking import chunk_documents
    from gpurag.rag.corpus import CorpusIndex
    from gpurag.settings import get_settings
    from stdlib_corpus import MODULES, python_version, stdlib_documents

    documents = stdlib_documents()
    digest = hashlib.sha256()
    for document in documents:
        digest.update(f"{document.source}\0{document.text}\0".encode())
    settings = get_settings()
    key = f"{embedder.name}|{settings.chunk_size}{settings.chunk_unit}{settings.chunk_overlap}|{titles}|v3"
    digest.update(key.encode())
    path = Path(settings.cache_dir) / "eval-stdlib" / f"py{python_version()}-{digest.hexdigest()[:12]}"
    if path.exists() and not rebuild:
        try:
            return CorpusIndex.load(path, embedder)
        except IndexFormatError:
            pass
    corpus = CorpusIndex.build(
        chunk_documents(documents), embedder, metadata={"corpus": "stdlib", "modules": list(MODULES)}, titles=titles
    )
    corpus.save(path)
    return corpus


def with_settings(overrides: dict[str, str], action: Callable[[], Any]) -> Any:
    """Run ``action`` with ``GPURAG_*`` settings overridden, then restore them."""
    from gpurag.settings import get_settings

    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    get_settings.cache_clear()
    try:
        return action()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


#: Setting overrides: no per-source limit; chunk scores alone (no document scores).
ANY_PER_SOURCE = {"GPURAG_PASSAGES_PER_SOURCE": "0"}
CHUNKS_ONLY = {"GPURAG_DOCUMENT_DENSE_WEIGHT": "0", "GPURAG_DOCUMENT_LEXICAL_WEIGHT": "0"}
DENSE = {"retrieval": "dense", "reranker": "none"}
HYBRID = {"retrieval": "hybrid", "reranker": "none", "fusion": "weighted"}

#: (label, titled index?, pipeline options, setting overrides); the first is gpurag before #17.
CONFIGURATIONS: list[tuple[str, bool, dict[str, Any], dict[str, str]]] = [
    ("dense, untitled chunks, any number per source (before #17)", False, DENSE, ANY_PER_SOURCE),
    ("lexical, untitled chunks", False, {"retrieval": "lexical", "reranker": "none"}, {}),
    ("dense, any number per source", True, DENSE, ANY_PER_SOURCE),
    ("dense", True, DENSE, {}),
    ("lexical", True, {"retrieval": "lexical", "reranker": "none"}, {}),
    (
        "hybrid weighted 0.8, chunk scores only, any number per source (the previous default)",
        True,
        HYBRID,
        {"GPURAG_FUSION_WEIGHT": "0.8", **CHUNKS_ONLY, **ANY_PER_SOURCE},
    ),
    ("hybrid weighted 0.8, chunk scores only", True, HYBRID, {"GPURAG_FUSION_WEIGHT": "0.8", **CHUNKS_ONLY}),
    ("hybrid rrf k=60, document scores", True, {**HYBRID, "fusion": "rrf"}, {"GPURAG_RRF_K": "60"}),
    ("hybrid weighted, document scores, any number per source", True, HYBRID, ANY_PER_SOURCE),
    ("hybrid weighted, document dense score only", True, HYBRID, {"GPURAG_DOCUMENT_LEXICAL_WEIGHT": "0"}),
    ("hybrid weighted, document lexical score only", True, HYBRID, {"GPURAG_DOCUMENT_DENSE_WEIGHT": "0"}),
    ("default + sentence re-ranker", True, {"reranker": "sentence"}, {}),
    ("default settings", True, {}, {}),
]


def halves(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """hit@1 and hit@5 on the tuning half (questions 1, 3, 5... of the file) and the held-out half (2, 4, 6...)."""
    out = {}
    for name, start in (("tuning", 0), ("held-out", 1)):
        ranks = [row["rank"] for row in result["rows"][start::2]]
        out[name] = {
            "questions": len(ranks),
            "hit@1": sum(1 for r in ranks if r == 1) / len(ranks),
            "hit@5": sum(1 for r in ranks if r is not None and r <= 5) / len(ranks),
        }
    return out


def evaluate_corpus(
    name: str,
    corpora: dict[bool, Any],
    embedder: Any,
    records: list[dict[str, Any]],
    skip_rerank: bool,
    only_rerank: bool = False,
) -> list[dict[str, Any]]:
    """One result per configuration: metrics, the batch's retrieval seconds, the options."""
    from gpurag.rag.generators import get_generator
    from gpurag.rag.pipeline import RAGPipeline

    questions = [record["question"] for record in records]
    results = []
    for label, titled, options, overrides in CONFIGURATIONS:
        if (skip_rerank and options.get("reranker") == "sentence") or (only_rerank and "sentence" not in label):
            continue

        def run(titled: bool = titled, options: dict[str, Any] = options) -> tuple[Any, float]:
            pipeline = RAGPipeline(corpora[titled], embedder, get_generator("extractive"), **options)
            started = time.perf_counter()
            passages, _ = pipeline.retrieve_batch(questions, DEPTH)
            return (pipeline, passages), time.perf_counter() - started

        (pipeline, passages), seconds = with_settings(overrides, run)
        result = score(records, passages)
        reranker = pipeline.reranker.name if pipeline.reranker is not None else "none"
        result.update(label=label, seconds=seconds, retrieval=pipeline.retrieval, reranker=reranker)
        results.append(result)
        print(
            f"{name:7} {label:34} hit@1 {result['hit@1']:.3f} hit@5 {result['hit@5']:.3f} "
            f"mrr@10 {result['mrr@10']:.3f} ({seconds:.2f} s)",
            file=sys.stderr,
        )
    return results


def table(results: list[dict[str, Any]], count: int) -> list[str]:
    lines = [
        f"| configuration ({count} questions) | hit@1 | hit@5 | MRR@10 | retrieval s (all questions) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['label']} | {r['hit@1']:.3f} | {r['hit@5']:.3f} | {r['mrr@10']:.3f} | {r['seconds']:.2f} |"
        for r in results
    ]
    return lines


def misses(result: dict[str, Any]) -> list[str]:
    late = [(i, row) for i, row in enumerate(result["rows"]) if row["rank"] != 1]
    if not late:
        return ["Every question's first source is right.", ""]
    lines = [
        f"Questions whose first source is wrong under {result['label']} (rank of the first right one; "
        "line number in the question file, held-out ones marked):",
        "",
    ]
    lines += [
        f"- {row['rank'] or '>10'}: line {i + 1}{' (held-out)' if i % 2 else ''}: {row['question']} — expected "
        f"{', '.join(row['expected'][:3])}{'…' if len(row['expected']) > 3 else ''}; "
        f"first {row['sources'][0] if row['sources'] else 'nothing'}"
        for i, row in late
    ]
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedder", default=None, help="embedder name (default: the setting)")
    parser.add_argument("--device", default=None, help="cpu, cuda...; default: CUDA when available")
    parser.add_argument("--corpora", default="pydoc,stdlib", help="which corpora: pydoc, stdlib")
    parser.add_argument(
        "--rerank", action="store_true", help="also the re-ranker configurations (minutes to hours on a CPU)"
    )
    parser.add_argument("--skip-rerank", action="store_true", help="leave out the re-ranker configurations (default)")
    parser.add_argument("--only-rerank", action="store_true", help="only the re-ranker configurations")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached corpora")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)

    from gpurag.rag.default_corpus import load_default_corpus
    from gpurag.rag.embedders import get_embedder
    from gpurag.settings import get_settings
    from rag_speed import machine_description

    embedder = get_embedder(args.embedder, device=args.device)
    settings = get_settings()
    info = machine_description(getattr(embedder, "device", "cpu"))
    lines = [
        "## RAG retrieval quality per retrieval mode",
        "",
        f"- embedder: {embedder.name} (dim {embedder.dim}); dense retriever: exact, cosine; lexical: BM25 (bm25s)",
        f"- chunks: {settings.chunk_size} {settings.chunk_unit}, overlap {settings.chunk_overlap}; "
        f"default settings: retrieval {settings.retrieval}, fusion {settings.fusion} (k={settings.rrf_k:g}), "
        f"depth {settings.retrieval_depth} per retriever, dense weight {settings.fusion_weight:g}, document weights "
        f"{settings.document_dense_weight:g} (dense) and {settings.document_lexical_weight:g} (lexical), "
        f"{settings.passages_per_source} passage(s) per source, reranker {settings.reranker}",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
    ]
    everything: dict[str, Any] = {"machine": info}
    status = 0
    for name in args.corpora.split(","):
        if name == "pydoc":
            records = read_questions(QUESTIONS)

            def load(titled: bool) -> Any:
                return load_default_corpus(embedder, rebuild=args.rebuild, titles=titled)

            heading = "default corpus: Python's language reference (pydoc topics)"
        elif name == "stdlib":
            records = read_questions(STDLIB_QUESTIONS)

            def load(titled: bool) -> Any:
                return stdlib_corpus(embedder, titled, args.rebuild)

            heading = "second corpus: standard-library docstrings (pydoc.render_doc)"
        else:
            raise SystemExit(f"unknown corpus {name!r}; expected pydoc or stdlib")
        started = time.perf_counter()
        corpora = {titled: load(titled) for titled in (True, False)}
        ready_s = time.perf_counter() - started
        known = set(corpora[True].sources)
        unknown = sorted({source for record in records for source in record["sources"]} - known)
        if unknown:
            raise SystemExit(f"{name}: expected sources not in the corpus: {', '.join(unknown)}")
        skip_rerank = args.skip_rerank or not (args.rerank or args.only_rerank)
        results = evaluate_corpus(name, corpora, embedder, records, skip_rerank, args.only_rerank)
        if args.only_rerank:
            lines += [f"### {heading}", "", *table(results, len(records)), ""]
            everything[name] = [{k: v for k, v in r.items() if k != "rows"} for r in results]
            continue
        lines += [
            f"### {heading}",
            "",
            f"{len(corpora[True])} chunks from {len(known)} documents; indexes ready in {ready_s:.1f} s.",
            "",
            *table(results, len(records)),
            "",
        ]
        default = next(r for r in results if r["label"] == "default settings")
        if name == "pydoc":
            met = default["hit@1"] >= TARGET_HIT_AT_1 and default["hit@5"] >= TARGET_HIT_AT_5
            split = halves(default)
            everything["pydoc_default_halves"] = split
            lines += [
                f"Target with the default settings: hit@1 ≥ {TARGET_HIT_AT_1}, hit@5 ≥ {TARGET_HIT_AT_5}: "
                f"{'met' if met else 'missed'} ({default['hit@1']:.3f}, {default['hit@5']:.3f}).",
                "",
                "The default weights were picked on the tuning half (`benchmarks/rag_tune.py`); on each half:",
                "",
                "| half | questions | hit@1 | hit@5 |",
                "|---|---:|---:|---:|",
                *(f"| {half} | {v['questions']} | {v['hit@1']:.3f} | {v['hit@5']:.3f} |" for half, v in split.items()),
                "",
            ]
            status |= 0 if met else 1
        else:
            dense = next(r for r in results if r["label"] == "dense")
            met = all(default[m] >= dense[m] for m in ("hit@1", "hit@5", "mrr@10"))
            lines += [f"Target: the default (hybrid) ≥ dense on every metric: {'met' if met else 'missed'}.", ""]
            status |= 0 if met else 1
        lines += misses(default)
        everything[name] = [{k: v for k, v in r.items() if k != "rows"} for r in results]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2))
    return status


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
