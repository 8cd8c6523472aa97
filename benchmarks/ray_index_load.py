"""How long a Ray node actor takes to get the corpus index: from a shared path or from the object store.

Two indexes: the default corpus (all-MiniLM-L6-v2, as cached by ``make serve``) and a synthetic
1M-vector one (1M x 384 float32, 1M one-line chunks). For each: ``path`` is `CorpusIndex.load` inside
an actor (every actor reads and checks the files); ``object_store`` is the head's one-time load +
``ray.put`` of a `CorpusPayload`, then, inside an actor, fetching it and building the searchable
index (what each new actor pays). Medians of 3 actors each. Writes ``results/ray_index_load.md``.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


class Loader:
    """An actor that times getting the index both ways (and checks it by searching)."""

    def from_path(self, path: str) -> tuple[float, int]:
        from gpurag.rag.corpus import CorpusIndex

        started = time.perf_counter()
        corpus = CorpusIndex.load(path)
        return time.perf_counter() - started, len(corpus)

    def from_object_store(self, boxed: list[Any]) -> tuple[float, int]:
        import ray

        started = time.perf_counter()
        payload = ray.get(boxed[0])
        corpus = payload.corpus(None)
        return time.perf_counter() - started, len(corpus)


def synthetic_corpus(path: Path, count: int, dim: int) -> None:
    from gpurag.plugins import get_retriever
    from gpurag.rag.corpus import CorpusIndex
    from gpurag.rag.types import Chunk

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    retriever = get_retriever("exact", metric="cosine", backend="numpy")
    retriever.add(vectors, np.arange(count, dtype=np.int64))
    chunks = [
        Chunk(text=f"chunk {i}", source=f"synthetic:{i // 1000}", position=i % 1000, start=0) for i in range(count)
    ]
    CorpusIndex(retriever, chunks, "synthetic", dim).save(path)


def measure(name: str, path: Path, repeats: int) -> dict[str, Any]:
    import ray

    from gpurag.rag.corpus import CorpusIndex
    from gpurag_server.nodes.ray_actor import CorpusPayload

    loader = ray.remote(num_cpus=0.5)(Loader)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    started = time.perf_counter()
    corpus = CorpusIndex.load(path)
    head_load = time.perf_counter() - started
    started = time.perf_counter()
    ref = ray.put(CorpusPayload.of(corpus))
    head_put = time.perf_counter() - started
    del corpus
    path_s, store_s = [], []
    for _ in range(repeats):  # interleaved, a fresh actor each time
        actor = loader.remote()
        seconds, count = ray.get(actor.from_path.remote(str(path)))
        path_s.append(seconds)
        ray.kill(actor)
        actor = loader.remote()
        seconds, count_store = ray.get(actor.from_object_store.remote([ref]))
        store_s.append(seconds)
        ray.kill(actor)
        assert count == count_store, (count, count_store)
    del ref
    return {
        "index": name,
        "vectors": count,
        "bytes": size,
        "path_s": statistics.median(path_s),
        "head_load_s": head_load,
        "head_put_s": head_put,
        "object_store_s": statistics.median(store_s),
    }


def main() -> None:
    import ray

    sys.path.insert(0, str(HERE))
    from gpurag.rag.default_corpus import cache_path, load_default_corpus
    from gpurag.rag.embedders import get_embedder
    from machine import cpu_model

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    embedder = get_embedder()
    load_default_corpus(embedder)  # built once if absent
    work = Path(tempfile.mkdtemp(prefix="gpurag-load-"))
    ray_dir = tempfile.mkdtemp(prefix="gpurag-ray-")
    try:
        started = time.perf_counter()
        synthetic_corpus(work / "big", count, 384)
        print(f"synthetic index of {count} built and saved in {time.perf_counter() - started:.1f} s", flush=True)
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_dir, object_store_memory=4 << 30
        )
        rows = [measure("default corpus", cache_path(embedder), 3), measure(f"{count:,} x 384", work / "big", 3)]
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_dir, ignore_errors=True)
    lines = [
        f"# Getting the corpus index into a Ray node actor (Ray {ray.__version__}, {cpu_model()}, 2 cores)",
        "",
        "| index | vectors | on disk | path: load in each actor | object store: head load + put (once) "
        "| object store: each actor |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['index']} | {r['vectors']:,} | {r['bytes'] / 2**20:.0f} MiB | {r['path_s']:.2f} s | "
            f"{r['head_load_s']:.2f} + {r['head_put_s']:.2f} s | {r['object_store_s']:.2f} s |"
        )
    text = "\n".join(lines) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ray_index_load.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
