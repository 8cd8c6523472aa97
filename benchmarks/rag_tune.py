"""How the hybrid weights were chosen: a grid searched on one half of the pydoc questions, scored on the other.

The pydoc questions are split by line: the tuning half is lines 1, 3, 5... and the held-out half
lines 2, 4, 6... Every grid point (dense share of the chunk fusion, weight of the document's
first-chunk similarity, weight of the whole-document BM25) is run through `RAGPipeline` on the
tuning half; the best by hit@1 (then MRR@10) is scored on the held-out half and on the stdlib
corpus. The reverse split is run too, so the held-out figures cover every question once
(two-fold cross-validation)::

    python benchmarks/rag_tune.py --out benchmarks/results/rag_tune.md

Question vectors are computed once per corpus (a memo around the embedder), so a grid point
costs only the searches and the fusion.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

HERE = Path(__file__).resolve().parent
GRID = {
    "GPURAG_FUSION_WEIGHT": ("1.0", "0.9", "0.8", "0.7"),
    "GPURAG_DOCUMENT_DENSE_WEIGHT": ("0", "0.2", "0.4", "0.6", "0.8"),
    "GPURAG_DOCUMENT_LEXICAL_WEIGHT": ("0", "0.2", "0.4", "0.6", "0.8"),
}


def memo_embedder(embedder: Any) -> Any:
    """``embedder`` with its vectors remembered per text (same name and dim, so corpora accept it)."""
    from gpurag.rag.types import Embedder

    class Memo(Embedder):
        name, dim = embedder.name, embedder.dim

        def __init__(self) -> None:
            self.seen: dict[str, npt.NDArray[np.float32]] = {}

        def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
            missing = [t for t in dict.fromkeys(texts) if t not in self.seen]
            if missing:
                self.seen.update(zip(missing, np.asarray(embedder.embed_batch(missing), dtype=np.float32), strict=True))
            return np.stack([self.seen[t] for t in texts])

    return Memo()


def run(corpus: Any, embedder: Any, records: list[dict[str, Any]], overrides: dict[str, str]) -> list[Any]:
    """Each question's rank of its first right source (None beyond 10) under ``overrides``."""
    from gpurag.rag.generators import get_generator
    from gpurag.rag.pipeline import RAGPipeline
    from rag_eval import DEPTH, score, with_settings

    def retrieve() -> Any:
        pipeline = RAGPipeline(corpus, embedder, get_generator("extractive"), retrieval="hybrid", reranker="none")
        return pipeline.retrieve_batch([r["question"] for r in records], DEPTH)[0]

    return [row["rank"] for row in score(records, with_settings(overrides, retrieve))["rows"]]


def metrics(ranks: Sequence[Any]) -> dict[str, float]:
    count = len(ranks)
    return {
        "hit@1": sum(1 for r in ranks if r == 1) / count,
        "hit@5": sum(1 for r in ranks if r is not None and r <= 5) / count,
        "mrr@10": sum(1 / r for r in ranks if r) / count,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)

    from gpurag.rag.default_corpus import load_default_corpus
    from gpurag.rag.embedders import get_embedder
    from rag_eval import QUESTIONS, STDLIB_QUESTIONS, read_questions, stdlib_corpus
    from rag_speed import machine_description

    embedder = memo_embedder(get_embedder())
    pydoc, stdlib = read_questions(QUESTIONS), read_questions(STDLIB_QUESTIONS)
    corpora = {"pydoc": load_default_corpus(embedder), "stdlib": stdlib_corpus(embedder, True)}
    points = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    ranks = {}
    for i, point in enumerate(points):
        ranks[i] = {"pydoc": run(corpora["pydoc"], embedder, pydoc, point)}
        print(f"{i + 1}/{len(points)} {point} {metrics(ranks[i]['pydoc'])}", file=sys.stderr)
    dense = {"GPURAG_FUSION_WEIGHT": "1.0", "GPURAG_DOCUMENT_DENSE_WEIGHT": "0", "GPURAG_DOCUMENT_LEXICAL_WEIGHT": "0"}
    stdlib_dense = metrics(run(corpora["stdlib"], embedder, stdlib, dense))
    grid = ", ".join(f"{key} in {{{', '.join(values)}}}" for key, values in GRID.items())
    lines = [
        "# How the hybrid weights were chosen (`python benchmarks/rag_tune.py`)",
        "",
        *(f"- {key}: {value}" for key, value in machine_description("cpu").items()),
        f"- grid: {grid} ({len(points)} points)",
        "- pick: the best hit@1 (then MRR@10) on the tuning half; scored on the other half and on the stdlib corpus",
        f"- stdlib, chunk dense scores alone (weights 1.0, 0, 0): hit@1 {stdlib_dense['hit@1']:.3f}, "
        f"hit@5 {stdlib_dense['hit@5']:.3f}, MRR@10 {stdlib_dense['mrr@10']:.3f}",
        "",
        "| tuned on | picked (fusion, document dense, document lexical) | tuning hit@1 | held-out questions "
        "| held-out hit@1 | held-out hit@5 | held-out MRR@10 | stdlib hit@1 | stdlib hit@5 | stdlib MRR@10 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    held_out: list[Any] = []
    for name, start in (("lines 1, 3, 5...", 0), ("lines 2, 4, 6...", 1)):
        best = max(
            range(len(points)),
            key=lambda i: (
                metrics(ranks[i]["pydoc"][start::2])["hit@1"],
                metrics(ranks[i]["pydoc"][start::2])["mrr@10"],
            ),
        )
        tuned = metrics(ranks[best]["pydoc"][start::2])
        other = ranks[best]["pydoc"][1 - start :: 2]
        held_out += other
        held, side = metrics(other), metrics(run(corpora["stdlib"], embedder, stdlib, points[best]))
        lines.append(
            f"| {name} | {', '.join(points[best].values())} | {tuned['hit@1']:.3f} | {len(other)} "
            f"| {held['hit@1']:.3f} | {held['hit@5']:.3f} | {held['mrr@10']:.3f} "
            f"| {side['hit@1']:.3f} | {side['hit@5']:.3f} | {side['mrr@10']:.3f} |"
        )
    both = metrics(held_out)
    lines += [
        "",
        f"Both held-out halves together ({len(held_out)} questions, each scored by weights tuned without it): "
        f"hit@1 {both['hit@1']:.3f}, hit@5 {both['hit@5']:.3f}, MRR@10 {both['mrr@10']:.3f}.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
