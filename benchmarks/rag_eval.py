"""Retrieval quality on the default corpus: hit@1 and hit@5 over `rag_eval_questions.jsonl`.

Each question lists the pydoc topics whose text answers it; a question is a hit at k when one of
its k best chunks comes from one of those topics (source ``pydoc:<topic>``)::

    python benchmarks/rag_eval.py                         # default embedder, exact retriever
    python benchmarks/rag_eval.py --out benchmarks/results/rag_eval.md

The default corpus is built on first use and cached (see `gpurag.rag.default_corpus`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
QUESTIONS = HERE / "rag_eval_questions.jsonl"
TARGET_HIT_AT_5 = 0.85


def read_questions(path: Path = QUESTIONS) -> list[dict[str, Any]]:
    """The evaluation set: one ``{"question": str, "topics": [str, ...]}`` per line."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, record in enumerate(records, start=1):
        if not isinstance(record.get("question"), str) or not record.get("topics"):
            raise ValueError(f"{path}:{number}: expected a question and a non-empty list of topics")
    return records


def evaluate(corpus: Any, embedder: Any, records: list[dict[str, Any]], k: int = 5) -> dict[str, Any]:
    """Hit rates at 1 and ``k`` (also strict: the first topic only), MRR, and each question's sources."""
    questions = [record["question"] for record in records]
    started = time.perf_counter()
    vectors = embedder.embed_batch(questions)
    passages = corpus.search(vectors, k)
    elapsed = time.perf_counter() - started
    rows = []
    for record, found in zip(records, passages, strict=True):
        expected = {f"pydoc:{topic}" for topic in record["topics"]}
        sources = [passage.source for passage in found]
        rank = next((i + 1 for i, source in enumerate(sources) if source in expected), None)
        primary = f"pydoc:{record['topics'][0]}"
        strict = next((i + 1 for i, source in enumerate(sources) if source == primary), None)
        rows.append(
            {
                "question": record["question"],
                "expected": sorted(expected),
                "sources": sources,
                "rank": rank,
                "strict_rank": strict,
            }
        )
    count = len(rows)
    return {
        "questions": count,
        "k": k,
        "hit@1": sum(1 for row in rows if row["rank"] == 1) / count,
        f"hit@{k}": sum(1 for row in rows if row["rank"] is not None) / count,
        "mrr": sum(1 / row["rank"] for row in rows if row["rank"]) / count,
        "strict hit@1": sum(1 for row in rows if row["strict_rank"] == 1) / count,
        f"strict hit@{k}": sum(1 for row in rows if row["strict_rank"] is not None) / count,
        "seconds": elapsed,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedder", default=None, help="embedder name (default: the setting)")
    parser.add_argument("--device", default=None, help="cpu, cuda...; default: CUDA when available")
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached default corpus")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)

    from gpurag.rag.default_corpus import load_default_corpus
    from gpurag.rag.embedders import get_embedder
    from gpurag.settings import get_settings
    from rag_speed import machine_description

    embedder = get_embedder(args.embedder, device=args.device)
    started = time.perf_counter()
    corpus = load_default_corpus(embedder, rebuild=args.rebuild)
    ready_s = time.perf_counter() - started
    records = read_questions(args.questions)
    result = evaluate(corpus, embedder, records, args.k)
    settings = get_settings()
    info = machine_description(getattr(embedder, "device", "cpu"))

    lines = [
        "## RAG retrieval quality: default corpus (pydoc topics)",
        "",
        f"- questions: {result['questions']} ({args.questions.name})",
        f"- embedder: {embedder.name} (dim {embedder.dim}); retriever: exact, cosine",
        f"- chunks: {len(corpus)} ({settings.chunk_size} {settings.chunk_unit}, overlap {settings.chunk_overlap})",
        f"- corpus ready in {ready_s:.1f} s (embedding {corpus.metadata.get('build_s', '?')} s when built)",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
        f"| hit@1 | hit@{args.k} | MRR@{args.k} | target hit@5 | strict hit@1 | strict hit@{args.k} |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {result['hit@1']:.3f} | {result[f'hit@{args.k}']:.3f} | {result['mrr']:.3f} | {TARGET_HIT_AT_5} "
        f"| {result['strict hit@1']:.3f} | {result[f'strict hit@{args.k}']:.3f} |",
        "",
        "A hit: a retrieved chunk comes from one of the question's topics. Strict: only from its first",
        "(most specific) topic, not from the topics that repeat that text (`compound` holds every",
        "compound statement's section, `specialnames` every special method's).",
        "",
    ]
    misses = [row for row in result["rows"] if row["rank"] is None]
    late = [row for row in result["rows"] if row["rank"] not in (None, 1)]
    if misses:
        lines += [f"Misses at {args.k} (expected topics; sources retrieved):", ""]
        lines += [
            f"- {row['question']} — {', '.join(row['expected'])}; got {', '.join(row['sources'])}" for row in misses
        ]
        lines.append("")
    if late:
        lines += ["Hits below rank 1 (rank: question; first source retrieved):", ""]
        lines += [f"- {row['rank']}: {row['question']} ({row['sources'][0]})" for row in late]
        lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0 if result[f"hit@{args.k}"] >= TARGET_HIT_AT_5 or args.k != 5 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
