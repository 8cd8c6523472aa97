"""RAG speed: embedding throughput by batch size, and `answer_batch` latency per stage.

Prints a markdown table naming the machine (CPU model or GPU card, torch version, device), and
writes it to ``--out`` when given::

    python benchmarks/rag_speed.py                        # this machine, default device
    python benchmarks/rag_speed.py --device cuda --out rag_speed_gpu.md

Embedding: passages of 100 model tokens cut from the default corpus, throughput in texts/s at
batch 1, 8 and 64 (each timed run embeds ``--texts`` passages in batches of that size; the
median and the best of ``--repeats`` runs after a warm-up). End to end: `RAGPipeline.answer_batch`
over the default corpus (extractive generator), median seconds per stage for batches of 1 and 8
questions from the evaluation set, for each pipeline of `PIPELINES` side by side: the runs
interleave (one batch of each pipeline in turn, the same questions), so that a disturbance of the
shared machine hits them alike. ``before`` is gpurag before hybrid retrieval (dense search over
untitled chunks), ``default`` today's default settings. On a shared machine the best run is the
least disturbed one; report both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from machine import cpu_model

HERE = Path(__file__).resolve().parent
QUESTIONS = HERE / "rag_eval_questions.jsonl"


def machine_description(device: str) -> dict[str, str]:
    """CPU model and cores, GPU card (on CUDA), torch and Python versions, and the device used."""
    import torch

    info = {
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = str(torch.version.cuda)
    try:
        import sentence_transformers

        info["sentence-transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def passages_of_tokens(embedder: Any, count: int, tokens: int = 100) -> list[str]:
    """``count`` passages of ``tokens`` model tokens each, cut from the pydoc topics' text."""
    from gpurag.rag.default_corpus import default_documents

    tokenizer = embedder.model.tokenizer
    passages: list[str] = []
    while len(passages) < count:
        for document in default_documents():
            ids = tokenizer(document.text, add_special_tokens=False, verbose=False)["input_ids"]
            for start in range(0, len(ids) - tokens + 1, tokens):
                passages.append(tokenizer.decode(ids[start : start + tokens]))
                if len(passages) == count:
                    return passages
    return passages


def embedding_throughput(
    embedder: Any, texts: list[str], batch: int, repeats: int, device: str
) -> tuple[float, list[float]]:
    """Median texts/s embedding ``texts`` in batches of ``batch``, and each run's seconds."""
    embedder.batch_size = batch
    embedder.embed_batch(texts[: max(batch, 8)])  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            embedder.embed_batch(texts[i : i + batch])
        _sync(device)
        times.append(time.perf_counter() - started)
    return len(texts) / statistics.median(times), times


#: The pipelines compared: name -> (titled corpus?, pipeline options).
PIPELINES: dict[str, tuple[bool, dict[str, Any]]] = {
    "before": (False, {"retrieval": "dense", "reranker": "none", "passages_per_source": 0}),
    "default": (True, {}),
}
#: Added with ``--reranker``: the opt-in re-ranker costs seconds a batch on a CPU.
RERANKED = ("default + sentence re-ranker", (True, {"reranker": "sentence"}))


def pipeline_latency(
    pipelines: dict[str, Any], questions: list[str], batch: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Per pipeline, median seconds per stage of `answer_batch` over ``repeats`` batches of ``batch`` questions.

    The pipelines take turns on the same batch. ``best_total_s`` is the fastest batch's total: on a
    shared machine, the least disturbed one.
    """
    for pipeline in pipelines.values():
        pipeline.answer_batch(questions[:batch])  # warm-up
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in pipelines}
    for r in range(repeats):
        offset = (r * batch) % max(1, len(questions) - batch)
        for name, pipeline in pipelines.items():
            answers = pipeline.answer_batch(questions[offset : offset + batch])
            for key, value in answers[0].timings.items():
                runs[name].setdefault(key, []).append(value)
    result = {}
    for name, stages in runs.items():
        medians = {key: statistics.median(values) for key, values in stages.items()}
        medians["best_total_s"] = min(stages["total_s"])
        result[name] = medians
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1; default: CUDA when available")
    parser.add_argument("--model", default=None, help="embedder name or model path (default: the setting)")
    parser.add_argument("--texts", type=int, default=128, help="passages embedded per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--batches", default="1,8,64", help='embedding batch sizes ("" skips that part)')
    parser.add_argument("--pipeline-batches", default="1,8", help="answer_batch sizes")
    parser.add_argument("--reranker", action="store_true", help="also time the default + sentence re-ranker")
    parser.add_argument("--label", default="", help="a name for the machine, printed in the heading")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here as JSON")
    args = parser.parse_args(argv)

    from gpurag.rag.embedders import SentenceTransformerEmbedder, pick_device
    from gpurag.rag.generators import get_generator
    from gpurag.rag.pipeline import RAGPipeline

    device = pick_device(args.device)
    started = time.perf_counter()
    embedder = SentenceTransformerEmbedder(args.model, device=device)
    load_s = time.perf_counter() - started
    info = machine_description(device)
    print(f"loaded {embedder.name} on {device} in {load_s:.1f} s", file=sys.stderr)

    texts = passages_of_tokens(embedder, args.texts)
    tokenizer = embedder.model.tokenizer
    mean_tokens = statistics.mean(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    throughput: dict[int, float] = {}
    best: dict[int, float] = {}
    for batch in (int(b) for b in args.batches.split(",") if b):
        rate, times = embedding_throughput(embedder, texts, batch, args.repeats, device)
        throughput[batch] = rate
        best[batch] = len(texts) / min(times)
        print(f"batch {batch}: {rate:.1f} texts/s (runs: {', '.join(f'{t:.2f}' for t in times)} s)", file=sys.stderr)

    from gpurag.rag.default_corpus import is_cached, load_default_corpus

    embedder.batch_size = 64
    cached = is_cached(embedder)
    started = time.perf_counter()
    corpora = {titled: load_default_corpus(embedder, titles=titled) for titled in (True, False)}
    corpus = corpora[True]
    corpus_s = time.perf_counter() - started
    print(f"default corpus ready ({len(corpus)} chunks, titled and not) in {corpus_s:.1f} s", file=sys.stderr)
    pipelines = {
        name: RAGPipeline(corpora[titled], embedder, get_generator("extractive"), **options)
        for name, (titled, options) in ([*PIPELINES.items(), RERANKED] if args.reranker else PIPELINES.items())
    }
    questions = [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines() if line.strip()]
    latency = {
        batch: pipeline_latency(pipelines, questions, batch, args.repeats)
        for batch in (int(b) for b in args.pipeline_batches.split(","))
    }

    heading = f"## RAG speed: {args.label or info.get('gpu') or cpu_model()}"
    lines = [heading, ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [
        f"- model: {embedder.name} (dim {embedder.dim}), fp32; passages of {mean_tokens:.0f} tokens on average",
        f"- default corpus: {len(corpus)} chunks, {'loaded from the cache' if cached else 'built'} "
        f"in {corpus_s:.1f} s; dense search with the exact retriever on backend {corpus.retriever.backend.name}",
        f"- pipelines: {'; '.join(f'{name}: {pipelines[name]!r}' for name in pipelines)}",
        f"- medians of {args.repeats} timed runs after a warm-up; {args.texts} passages per embedding run",
        "",
        "| embedding batch | texts/s (median run) | texts/s (best run) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {batch} | {rate:,.1f} | {best[batch]:,.1f} |" for batch, rate in throughput.items()]
    lines += [
        "",
        "| pipeline | `answer_batch` size | embed ms | dense ms | lexical ms | fuse ms | rerank ms | generate ms "
        "| total ms | best total ms | total / before (median) | (best) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, per_pipeline in latency.items():
        before = per_pipeline["before"]
        for name, stages in per_pipeline.items():
            ms = {key: value * 1e3 for key, value in stages.items()}
            lines.append(
                f"| {name} | {batch} | {ms['embed_s']:.1f} | {ms['search_s']:.2f} | {ms['lexical_s']:.2f} | "
                f"{ms['fuse_s']:.2f} | {ms['rerank_s']:.1f} | {ms['generate_s']:.1f} | {ms['total_s']:.1f} | "
                f"{ms['best_total_s']:.1f} | {stages['total_s'] / before['total_s']:.2f}× | "
                f"{stages['best_total_s'] / before['best_total_s']:.2f}× |"
            )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    if args.json:
        record = {
            "machine": info,
            "throughput": throughput,
            "best_throughput": best,
            "latency": latency,
            "mean_tokens": mean_tokens,
        }
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
