"""`ServerSettings`: every server default, each settable by a ``GPURAG_`` variable or a `gpurag serve` flag."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """The head node's settings; `gpurag serve --max-batch-size 8` sets ``max_batch_size``."""

    model_config = SettingsConfigDict(env_prefix="GPURAG_", extra="ignore")

    # --- network and security ------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address to bind; 127.0.0.1 unless told otherwise.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    api_keys: tuple[str, ...] = Field(
        default=(), description="Bearer keys accepted on every route but health; empty: no auth."
    )
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="Largest request body accepted.")
    max_query_chars: int = Field(default=2000, gt=0, description="Longest query accepted.")
    max_k: int = Field(default=50, gt=0, description="Largest k accepted.")
    max_texts: int = Field(default=64, gt=0, description="Most texts or vectors in one search/embeddings request.")

    # --- queue and batcher ---------------------------------------------------------------------
    max_queue_length: int = Field(default=1024, gt=0, description="Requests the queue holds; beyond: 503.")
    max_batch_size: int = Field(default=8, gt=0, description="A batch is sent when it holds this many.")
    max_wait_s: float = Field(default=0.1, ge=0, description="...or when its oldest request has waited this long.")
    dispatch_when_idle: bool = Field(
        default=True, description="Send what is queued at once when a node is idle instead of waiting."
    )
    request_timeout_s: float = Field(default=30.0, gt=0, description="Deadline of a request; past it: 504.")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After of a 503 for a full queue.")

    # --- nodes ---------------------------------------------------------------------------------
    dispatcher: str = Field(default="round_robin", description="Registered dispatcher: round_robin, least_loaded.")
    node_provider: str = Field(default="local", description="Registered node provider: local, process.")
    nodes: int = Field(default=1, ge=0, description="Nodes started with the server.")
    node_start_timeout_s: float = Field(default=600.0, gt=0, description="Longest a node may take to start.")
    heartbeat_interval_s: float = Field(default=0.5, gt=0, description="Process nodes beat this often.")
    heartbeat_timeout_s: float = Field(default=5.0, gt=0, description="A node silent this long is dead.")

    # --- autoscaler ----------------------------------------------------------------------------
    autoscale: bool = Field(default=False, description="Run the autoscaler.")
    autoscale_interval_s: float = Field(default=15.0, gt=0, description="Seconds between scaling decisions.")
    min_nodes: int = Field(default=1, ge=0, description="Fewest nodes the autoscaler keeps.")
    max_nodes: int = Field(default=4, gt=0, description="Most nodes the autoscaler starts.")
    scaling_policy: str = Field(default="queue_length", description="queue_length, target_utilisation or a plugin's.")
    decision_log_size: int = Field(default=200, gt=0, description="Scaling decisions kept for /v1/status.")

    # --- what the nodes run --------------------------------------------------------------------
    workload: Literal["rag", "zero", "sleep"] = Field(
        default="rag", description="rag: the pipeline; zero and sleep: benchmark-only nodes that do no work."
    )
    sleep_per_batch_s: float = Field(default=0.02, ge=0, description="Cost of a batch for workload=sleep.")
    corpus: Path | None = Field(default=None, description="Corpus index directory; None: the default corpus.")
    embedder: str | None = Field(default=None, description="Embedder; None: the core's embedder setting.")
    generator: str | None = Field(default=None, description="Generator; None: the core's generator setting.")
    search_backend: str | None = Field(default=None, description="Distance backend for a loaded corpus index.")
    node_threads: int = Field(
        default=0,
        ge=0,
        description="Threads a node's models and BLAS use (torch intra-op, OpenBLAS); 0: one fewer than the cores, "
        "at least 1, so the head node's event loop keeps a core of its own.",
    )
