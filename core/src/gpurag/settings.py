"""Every default gpurag uses, in one place; each can be set by a ``GPURAG_``-prefixed environment variable."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpurag.errors import InvalidInputError

DEFAULT_PROMPT_TEMPLATE = (
    "Answer the question using only the numbered passages below. "
    "Cite the passages you use by their number.\n\n"
    "{passages}\n\n"
    "Question: {question}\n"
    "Answer:"
)
LOCAL_PROMPT_TEMPLATE = (
    "Answer the question using only the numbered passages below. After each sentence, cite the "
    "passage it comes from by its number in square brackets, like [2].\n\n"
    "{passages}\n\n"
    "Question: {question}"
)


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "gpurag"


class Settings(BaseSettings):
    """gpurag's defaults. ``GPURAG_MEMORY_BUDGET_BYTES=1e9`` and the like override them."""

    model_config = SettingsConfigDict(env_prefix="GPURAG_", extra="ignore")

    # --- plugins -------------------------------------------------------------------------------
    plugins: str | None = Field(
        default=None,
        description="Comma-separated allow-list of entry-point plugins to load; empty loads only the "
        "built-ins; unset loads every installed one.",
    )
    trace_plugins: bool = Field(default=False, description="Print every hook call to standard error.")

    # --- search --------------------------------------------------------------------------------
    backend: str = Field(default="auto", description="Distance backend used when none is named.")
    backend_preference: tuple[str, ...] = Field(
        default=("cuda", "triton", "cupy", "torch", "numpy"),
        description="Order in which `get_backend('auto')` tries the available backends.",
    )
    backend_table: Path | None = Field(
        default=None,
        description="JSON table of measured backend speeds that `get_backend('auto')` follows on a GPU "
        "(benchmarks/gpu_report.py --write-table writes it); None: the table shipped with gpurag.",
    )
    auto_queries: int = Field(
        default=64,
        gt=0,
        description="Queries per search `get_backend('auto')` assumes when it is not told (a retriever picks "
        "its backend before it sees a query): chooses the table's bucket (1, <=64, >64).",
    )
    cpu_backend_preference: tuple[str, ...] = Field(
        default=("numpy",),
        description="Backends `get_backend('auto')` tries first on device kind cpu (named or defaulted to), "
        "before `backend_preference`: numpy is the tuned CPU backend.",
    )
    memory_budget_bytes: int = Field(
        default=256 * 1024 * 1024,
        gt=0,
        description="Most bytes one chunk of a search may hold in scores (queries x rows x 4).",
    )
    max_query_chunk: int = Field(default=4096, gt=0, description="Most queries searched in one chunk.")
    max_k: int = Field(
        default=65536, gt=0, description="Largest k a search accepts; raise it (up to the index size) for more."
    )
    numpy_block_rows: int = Field(
        default=1024, gt=0, description="Database rows the NumPy backend scores in one BLAS call."
    )
    lsh_n_bits: int = Field(default=256, gt=0, description="Bits of an LSH retriever's sign codes.")
    lsh_n_candidates: int = Field(
        default=500, gt=0, description="Rows an LSH retriever's Hamming prefilter keeps per query for exact re-ranking."
    )
    lsh_seed: int = Field(default=0, ge=0, description="Seed of an LSH retriever's random hyperplanes.")
    numpy_threads: int = Field(
        default=0, ge=0, description="Threads the NumPy backend splits queries over; 0 means one per core."
    )
    cuda_kernel_cache_dir: Path = Field(
        default_factory=lambda: _default_cache_dir() / "cuda-kernels",
        description="Where the cuda backend keeps its compiled kernels (cubins keyed by source hash and architecture).",
    )
    cuda_fast_kernels: bool = Field(
        default=True,
        description="Whether the cuda backend scans with its wide tensor-core tile and few-query l1 stream "
        "(off: the earlier kernels).",
    )

    # --- RAG -----------------------------------------------------------------------------------
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Where the default corpus is cached.")
    embedder: str = Field(default="all-MiniLM-L6-v2", description="Embedder name or model path.")
    embed_batch_size: int = Field(default=64, gt=0, description="Texts per embedding batch.")
    device: str | None = Field(default=None, description="Device for models: None picks CUDA when available.")
    chunk_size: int = Field(default=1000, gt=0, description="Chunk budget, in units of `chunk_unit`.")
    chunk_overlap: int = Field(default=150, ge=0, description="Overlap between neighbouring chunks.")
    chunk_unit: str = Field(default="chars", description="'chars' or 'tokens' (whitespace-separated words).")
    generator: str = Field(default="extractive", description="Generator used when none is named.")
    top_k: int = Field(default=3, gt=0, description="Passages retrieved per question.")
    retrieval: str = Field(default="hybrid", description="'dense', 'lexical' (BM25) or 'hybrid' (both, fused).")
    fusion: str = Field(default="weighted", description="How hybrid retrieval fuses: 'rrf' or 'weighted'.")
    rrf_k: float = Field(default=60.0, gt=0, description="The constant of reciprocal-rank fusion.")
    fusion_weight: float = Field(default=1.0, ge=0, le=1, description="Dense share of a 'weighted' fusion.")
    retrieval_depth: int = Field(default=50, gt=0, description="Candidates each retriever gives a fusion.")
    document_dense_weight: float = Field(
        default=0.4, ge=0, description="Hybrid: weight of a chunk's document's first-chunk similarity."
    )
    document_lexical_weight: float = Field(
        default=0.4, ge=0, description="Hybrid: weight of a chunk's whole document's BM25 score."
    )
    passages_per_source: int = Field(
        default=1, ge=0, description="Most passages of one source among a question's results (0: no limit)."
    )
    reranker: str = Field(default="none", description="Re-ranker of the first candidates: 'none' or 'sentence'.")
    rerank_depth: int = Field(default=10, gt=0, description="Candidates a re-ranker looks at per question.")
    prompt_template: str = Field(default=DEFAULT_PROMPT_TEMPLATE, description="Prompt given to LM generators.")
    max_new_tokens: int = Field(default=256, gt=0, description="Tokens an LM generator may produce.")
    extractive_max_sentences: int = Field(default=3, gt=0, description="Sentences an extractive answer holds.")
    extractive_min_relative_score: float = Field(
        default=0.4, ge=0, le=1, description="Least score, relative to the best sentence's, of a sentence kept."
    )
    generate_batch_size: int = Field(default=8, gt=0, description="Prompts a transformers generator runs at once.")
    local_model: str = Field(
        default="smollm2-135m", description="Packaged model of the `local` generator: smollm2-135m or gemma3-270m."
    )
    local_max_new_tokens: int = Field(default=160, gt=0, description="Tokens the `local` generator may produce.")
    local_model_path: Path | None = Field(
        default=None,
        description="A de-quantised model directory (a `local` cache copied from another machine) that the `local` "
        "generator loads instead of the packaged model; None: the packaged model.",
    )
    local_prompt_template: str = Field(
        default=LOCAL_PROMPT_TEMPLATE, description="Prompt of the `local` generator (inside the chat template)."
    )
    openai_backoff_s: float = Field(default=0.5, ge=0, description="First wait before a retry; doubles each time.")
    openai_base_url: str = Field(default="http://127.0.0.1:8080/v1", description="OpenAI-compatible endpoint.")
    openai_model: str = Field(default="default", description="Model name sent to the endpoint.")
    openai_api_key: str | None = Field(default=None, description="Bearer key for the endpoint, if it needs one.")
    openai_timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one request to the endpoint.")
    openai_max_retries: int = Field(default=3, ge=0, description="Retries after a failed request.")


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once; `get_settings.cache_clear()` re-reads.

    A ``GPURAG_*`` variable that does not parse is an `InvalidInputError` naming it, its value and
    what it expects, in one line.
    """
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error.get("loc", ())) or "?"
            variable = f"GPURAG_{field.upper()}"
            value = os.environ.get(variable, error.get("input"))
            problems.append(f"{variable}={value!r}: {error.get('msg', 'invalid')}")
        raise InvalidInputError("bad setting: " + "; ".join(problems)) from None
