"""Settings: one class, read from the environment (prefix PAPERINDEX_), built only at entrypoints."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LongChunk = Literal["multivector", "mean", "truncate"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAPERINDEX_", env_file=".env", extra="ignore")

    # Qdrant: embedded Qdrant Edge under qdrant_path unless qdrant_url is set.
    qdrant_url: str | None = None
    qdrant_path: Path = Path("paperindex_data")
    qdrant_api_key: str | None = None
    qdrant_prefer_grpc: bool = False
    qdrant_timeout: float = 60.0
    papers_collection: str = "papers"
    chunks_collection: str = "chunks"

    # Models: a hub id or a local directory each.
    paper_model: str = "allenai/specter2_base"
    paper_adapter: str = "allenai/specter2"
    query_adapter: str | None = "allenai/specter2_adhoc_query"
    passage_model: str = "sentence-transformers/multi-qa-mpnet-base-dot-v1"
    reranker_model: str | None = "cross-encoder/ms-marco-MiniLM-L6-v2"
    device: str = "auto"

    # Chunking and long-chunk handling.
    chunk_words: int = Field(512, ge=8)
    chunk_overlap: int = Field(50, ge=0)
    max_chunks_per_paper: int | None = Field(None, ge=1)
    # multivector over windows of 254 tokens (+ <s> and </s>: 256 positions, two tiles of the attention
    # kernel; 258 would take three): measured with `paperindex coverage` and `eval` (docs/retrieval-quality.md)
    long_chunk: LongChunk = "multivector"
    window_tokens: int = Field(254, ge=16, le=510)
    window_overlap: int = Field(16, ge=0)

    # Batching.
    token_budget: int | None = Field(
        None, ge=512, description="tokens per forward batch; None: the device plan's (by free GPU memory; CPU 16384)"
    )
    papers_per_batch: int | None = Field(
        None,
        ge=1,
        description=(
            "papers per commit group; None: on a GPU 256 (128 where more than two GPUs index), without one as many "
            "as take a few seconds to encode, by measured speed (indexer/plan.py)"
        ),
    )
    compile: bool = False
    tokenizer_workers: int | None = Field(
        None,
        ge=1,
        description="processes that tokenize chunks; None: on a GPU host all cores but 4, at most 12 per GPU that "
        "indexes, else 2",
    )
    gpus: int = Field(1, ge=0, description="GPUs that encode while indexing (one model replica each); 0: all visible")
    # While one encoder thread collects a group's vectors and starts the next, another keeps the GPU busy.
    encoders_per_gpu: int | None = Field(
        None, ge=1, description="encoder threads (passage model replicas) per GPU; None: the device plan's (1 or 2)"
    )
    # The device plan's choices by hand (None: chosen from the GPU; indexer/encode/device.py).
    attention: Literal["flash", "sdpa", "eager"] | None = Field(
        None, description="flash: packed heads (sm_80+); sdpa: padded, SDPA without flash; eager: SDPA's math kernel"
    )
    dtype: Literal["float16", "float32"] | None = Field(
        None, description="the models' dtype; None: float16 on a GPU, else float32"
    )
    cuda_graphs: bool | None = Field(None, description="replay batches from CUDA graphs; None: on sm_80 and newer")
    ray_address: str | None = Field(
        None,
        description="`paperindex index` runs on this Ray cluster (`auto`: the one this host is in; `local`: a new "
        "one here)",
    )

    # Search: dense (the models' vectors), lexical (BM25 in the engine) or hybrid (both, fused). Dense and
    # DBSF: the best nDCG@10 of `paperindex eval` on both sets (docs/retrieval-quality.md, "Search modes").
    search_mode: Literal["hybrid", "dense", "lexical"] = "dense"
    search_prefetch: int = Field(
        200, ge=1, le=10000, description="chunks the pooled vector finds for MaxSim to rescore"
    )
    search_fusion: Literal["rrf", "dbsf"] = "dbsf"
    # On by default: grouped search then finds a paper by its abstract too, and a paper without a body at all
    # (nDCG@10 0.903 against 0.890 for the body's windows alone, dense; #28).
    head_passage: bool = Field(
        True, description="index each paper's title + abstract as a passage too (chunk_index -1)"
    )

    # Store layout (defaults fit 1M+ chunks on one machine).
    hnsw_m: int = 16
    hnsw_ef_construct: int = 100
    bulk_load: bool = False
    quantization: Literal["none", "int8"] = "none"
    vectors_on_disk: bool = False
    shard_number: int = Field(1, ge=1)
    replication_factor: int = Field(1, ge=1)
    upload_parallel: int = Field(2, ge=1)
    # Embedded store: chunk shards of a new index (an existing one keeps its own); `paperindex index`
    # writes each from a process of its own (Qdrant Edge inserts under the interpreter lock).
    edge_chunk_shards: int | None = Field(
        None, ge=1, le=64, description="None: 2 for each GPU that indexes (`gpus`), at least 2"
    )

    # Service.
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    index_queue_size: int = Field(16, ge=1)
    max_concurrent_searches: int = Field(32, ge=1, description="searches in flight before new ones get 429")
    keep_alive_s: int = Field(
        75,
        ge=1,
        description="idle keep-alive connections are closed after this; keep it above clients' and proxies' own",
    )
    max_query_chars: int = 2000
    max_k: int = 100
    max_candidates: int = 200
    cors_origins: list[str] = []
    ui: bool = Field(True, description="serve the search page at / (it only reads, through the service's own API)")
    # Loopback unless asked: the Docker image sets PAPERINDEX_HOST=0.0.0.0 for its published port.
    host: str = "127.0.0.1"
    port: int = 8000

    @model_validator(mode="after")
    def _overlaps_below_sizes(self) -> Settings:
        for overlap, size in (("chunk_overlap", "chunk_words"), ("window_overlap", "window_tokens")):
            if getattr(self, overlap) >= getattr(self, size):
                raise ValueError(
                    f"{overlap} ({getattr(self, overlap)}) must be smaller than {size} ({getattr(self, size)})"
                )
        return self
