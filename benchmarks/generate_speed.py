"""Speed of the ``local`` generator: start-up (first, then from the cache), tokens/s and latency by batch size.

The prompts are real RAG prompts: the first 32 questions of `rag_eval_questions.jsonl` with their
3 passages from the default corpus, stored in `generate_speed_prompts.jsonl` (``--write-prompts``
rebuilds it), so that a machine without the corpus or the embedder measures the same work. Every
answer is forced to ``--new-tokens`` tokens (``min_new_tokens``), so each batch does the same
work; batch sizes are measured interleaved, ``--repeats`` times, and medians are reported::

    python benchmarks/generate_speed.py --out benchmarks/results/generate_speed_cpu.md
    # both packaged models, interleaved in one run (model by model within each repeat)
    python benchmarks/generate_speed.py --model smollm2-135m,gemma3-270m --skip-start
    # where the packaged wheel cannot be installed (the GPU machine): the GGUF file, or its chunks
    python benchmarks/generate_speed.py --split-gguf .gguf          # here: .gguf/smollm2-135m.gguf.part0...
    python benchmarks/generate_speed.py --device cuda --gguf .gguf/smollm2-135m.gguf.part*
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "generate_speed_prompts.jsonl"


def write_prompts(path: Path, count: int = 32, k: int = 3) -> None:
    """Retrieve ``k`` passages for each of the first ``count`` evaluation questions; save them as JSONL."""
    from gpurag.rag.default_corpus import load_default_corpus
    from gpurag.rag.embedders import get_embedder
    from rag_eval import read_questions

    questions = [record["question"] for record in read_questions()][:count]
    embedder = get_embedder()
    corpus = load_default_corpus(embedder)
    with path.open("w", encoding="utf-8") as out:
        for question, found in zip(questions, corpus.search(embedder.embed_batch(questions), k), strict=True):
            passages = [{"source": p.source, "text": p.text} for p in found]
            out.write(json.dumps({"question": question, "passages": passages}) + "\n")


def read_prompts(path: Path) -> tuple[list[str], list[list[Any]]]:
    from gpurag.rag.types import Passage

    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    questions = [record["question"] for record in records]
    passages = [
        [Passage(id=i, score=0.0, text=p["text"], source=p["source"]) for i, p in enumerate(record["passages"])]
        for record in records
    ]
    return questions, passages


def model_dir_from_gguf(parts: list[Path], scratch: Path) -> Path:
    """De-quantise a GGUF file (given whole or as chunks to concatenate) into a model directory."""
    from gpurag.rag.generators import packaged

    gguf = parts[0]
    if len(parts) > 1:
        gguf = scratch / "model.gguf"
        with gguf.open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out)
    model = packaged.PackagedModel("given", "gguf", "a GGUF file given on the command line", lambda _: gguf)
    out = scratch / "model"
    packaged._dequantise(model, scratch, out)
    return out


def split_gguf(model: str, out: Path, chunk_bytes: int) -> list[Path]:
    """Write packaged ``model``'s GGUF file into ``out`` as chunks of at most ``chunk_bytes``."""
    from gpurag.rag.generators import packaged

    out.mkdir(parents=True, exist_ok=True)
    parts = []
    with tempfile.TemporaryDirectory() as scratch:
        gguf = packaged.packaged_model(model).gguf_file(Path(scratch))
        with gguf.open("rb") as f:
            while block := f.read(chunk_bytes):
                parts.append(out / f"{model}.gguf.part{len(parts)}")
                parts[-1].write_bytes(block)
    return parts


def start_times(model: str, device: str | None) -> dict[str, float]:
    """Seconds to build a `LocalGenerator` with an empty cache, then with the cache it left."""
    from gpurag.rag.generators import LocalGenerator

    times = {}
    with tempfile.TemporaryDirectory() as cache:
        for label in ("first start (GGUF, de-quantise, save)", "second start (safetensors cache)"):
            started = time.perf_counter()
            generator = LocalGenerator(model, cache_dir=cache, device=device)
            times[label] = time.perf_counter() - started
            del generator
    return times


def measure(generator: Any, questions: list[str], passages: list[list[Any]], device: str) -> dict[str, float]:
    """One run over a batch: seconds to the first token of any answer, and to the last."""
    sync(device)
    started = time.perf_counter()
    first = None
    for piece in generator.stream(questions, passages):
        if first is None and piece.text:
            first = time.perf_counter() - started
    sync(device)
    return {"first_token_s": first or 0.0, "total_s": time.perf_counter() - started}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="packaged model(s), comma-separated (default: the local_model setting)"
    )
    parser.add_argument("--gguf", type=Path, nargs="+", default=None, help="a GGUF file, or its chunks in order")
    parser.add_argument("--model-path", type=Path, default=None, help="a de-quantised model directory")
    parser.add_argument("--device", default=None, help="cpu, cuda...; default: CUDA when available")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-batch-repeats", type=int, default=None, help="repeats of batches over 8")
    parser.add_argument("--prompts", type=Path, default=PROMPTS)
    parser.add_argument("--write-prompts", action="store_true", help="rebuild --prompts from the default corpus")
    parser.add_argument("--split-gguf", type=Path, default=None, help="only write the model's GGUF here in chunks")
    parser.add_argument("--chunk-mb", type=int, default=30, help="chunk size for --split-gguf (MiB)")
    parser.add_argument("--skip-start", action="store_true", help="do not measure the start-up times")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here (after each run)")
    parser.add_argument("--keep-model", type=Path, default=None, help="with --gguf: keep the de-quantised model here")
    parser.add_argument("--only-dequantise", action="store_true", help="with --gguf and --keep-model: stop there")
    parser.add_argument("--dtype", default=None, help="float16 or bfloat16: cast the model (default: the generator's)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    from gpurag.settings import get_settings

    if args.split_gguf:
        for part in split_gguf(args.model or get_settings().local_model, args.split_gguf, args.chunk_mb << 20):
            print(part)
        return 0
    if args.write_prompts:
        write_prompts(args.prompts, count=max(batches))
    questions, passages = read_prompts(args.prompts)
    if len(questions) < max(batches):
        raise SystemExit(f"--prompts holds {len(questions)} prompts; batch {max(batches)} needs more")
    models = (args.model or get_settings().local_model).split(",")
    if len(models) > 1 and (args.gguf or args.model_path):
        raise SystemExit("--gguf and --model-path give one model; name one --model with them")
    scratch = Path(tempfile.mkdtemp(prefix="generate-speed-"))
    measured: dict[str, Measured] = {}
    try:
        for model in models:
            measured[model] = load(model, args, scratch, questions, passages)
        for repeat in range(args.repeats):
            for b in batches:
                if b > 8 and repeat >= (args.big_batch_repeats or args.repeats):
                    continue
                for m in measured.values():
                    m.runs[b].append(measure(m.generator, questions[:b], passages[:b], m.device))
                    print(f"{m.model} batch {b}: {m.runs[b][-1]}", file=sys.stderr, flush=True)
                    if args.out:  # a run cut short (a GPU slot) still leaves what it measured
                        args.out.write_text(report(args, list(measured.values())))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = report(args, list(measured.values()))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


@dataclasses.dataclass
class Measured:
    """One model's generator, how it started, the check before timing, and its runs by batch size."""

    model: str
    generator: Any
    device: str
    starts: dict[str, float]
    same: bool
    runs: dict[int, list[dict[str, float]]]


def load(
    model: str, args: argparse.Namespace, scratch: Path, questions: list[str], passages: list[list[Any]]
) -> Measured:
    """Start ``model``'s generator as the arguments say, and check it before timing."""
    from gpurag.rag.generators import LocalGenerator

    batches = [int(b) for b in args.batches.split(",")]
    starts: dict[str, float] = {}
    model_path = args.model_path
    if args.gguf:
        started = time.perf_counter()
        model_path = model_dir_from_gguf(args.gguf, scratch)
        starts["de-quantise the given GGUF and save"] = time.perf_counter() - started
        print(f"de-quantised in {starts['de-quantise the given GGUF and save']:.1f} s", file=sys.stderr, flush=True)
        if args.keep_model:  # whole or not at all: another process may be waiting for it
            partial = args.keep_model.with_name(args.keep_model.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(model_path, partial)
            shutil.rmtree(args.keep_model, ignore_errors=True)
            partial.rename(args.keep_model)
        if args.only_dequantise:
            raise SystemExit(0)
        model = f"{args.gguf[0].name} (given)"
    elif model_path is None and not args.skip_start:
        starts = start_times(model, args.device)
    started = time.perf_counter()
    generator = LocalGenerator(
        model if model_path is None else None,
        device=args.device,
        model_path=model_path,
        max_new_tokens=args.new_tokens,
        batch_size=max(batches),
    )
    starts["start used for the runs"] = time.perf_counter() - started
    if args.dtype:
        import torch

        generator.model.to(getattr(torch, args.dtype))
    generator.model.generation_config.min_new_tokens = args.new_tokens
    device = generator.device
    print(f"{model} loaded on {device} in {starts['start used for the runs']:.1f} s", file=sys.stderr, flush=True)

    # Check before timing: a prompt's answer is the same alone and within a batch of 8.
    alone = generator.generate(questions[:1], passages[:1])[0]
    batched = generator.generate(questions[:8], passages[:8])[0]
    same = alone == batched
    print(f"{model}: batched answer equals the answer alone: {same}\n{alone[:300]!r}", file=sys.stderr)
    return Measured(model, generator, device, starts, same, {b: [] for b in batches})


def report(args: argparse.Namespace, measured: list[Measured]) -> str:
    """The markdown report of the runs so far, one table per model (batch sizes not yet run are left out)."""
    import transformers

    from rag_speed import machine_description

    if not measured:
        return ""
    info = machine_description(measured[0].device)
    info["transformers"] = transformers.__version__
    names = ", ".join(f"{m.model} ({m.generator.model.dtype})" for m in measured)
    lines = [
        f"### `local` generator speed: {names}, {measured[0].device}",
        "",
        f"- prompts: {args.prompts.name} (question + 3 passages, chat template); {args.new_tokens} new tokens each",
        f"- medians of {args.repeats} interleaved runs (batches over 8: {args.big_batch_repeats or args.repeats})"
        + (", the models in turn within each run" if len(measured) > 1 else ""),
        *(f"- {key}: {value}" for key, value in info.items()),
    ]
    for m in measured:
        lines += [
            "",
            f"#### {m.model}",
            "",
            f"- batched answer (batch 8) equals the answer alone: {m.same}",
            *(f"- {label}: {seconds:.1f} s" for label, seconds in m.starts.items()),
            "",
            "| batch | tokens/s | vs batch 1 | answer latency s | first token s | runs |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        base = None
        for b, runs in m.runs.items():
            if not runs:
                continue
            total = statistics.median(run["total_s"] for run in runs)
            first = statistics.median(run["first_token_s"] for run in runs)
            rate = b * args.new_tokens / total
            base = base or rate
            lines.append(f"| {b} | {rate:.1f} | {rate / base:.2f}x | {total:.2f} | {first:.2f} | {len(runs)} |")
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
