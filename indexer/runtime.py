"""Build the store, encoders, indexer and searcher from Settings (entrypoints only)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .config import Settings
from .encoders import PaperEncoder, PassageEncoder, Reranker, resolve_device
from .pipeline import Indexer
from .search import Searcher
from .store import Store, open_store


WORKERS_PER_GPU = 12


@dataclass
class Runtime:
    settings: Settings
    store: Store
    paper_encoder: PaperEncoder
    passage_encoder: PassageEncoder
    reranker: Reranker | None
    indexer: Indexer
    searcher: Searcher

    def close(self) -> None:
        self.store.close()


def tokenizer_workers(s: Settings) -> int:
    """PAPERINDEX_TOKENIZER_WORKERS, or by default: on a GPU host all cores but 4, up to 12 per GPU
    that indexes (one GPU embeds ~2.4 M model tokens/s and one worker process chunks and tokenizes
    ~0.5 M; the indexing process and the chunk shards' writers need the other cores), else 2 (a CPU
    encoder is far slower than them)."""
    if s.tokenizer_workers is not None:
        return s.tokenizer_workers
    if resolve_device(s.device).type == "cuda":
        return max(2, min(len(os.sched_getaffinity(0)) - 4, WORKERS_PER_GPU * s.indexing_gpus()))
    return 2


@contextmanager
def frozen_heap() -> Iterator[None]:
    """For a long run once the models are loaded: the objects that exist now (models, compiled
    kernels, CUDA graphs: ~800,000 on a GPU host) are left out of the cyclic garbage collector's
    full passes until the block ends (gc.freeze). A full pass holds the interpreter lock, and every
    GPU's threads wait: over them it took ~0.38 s, twice in 20 s of indexing on four GPUs; without
    them ~0.02-0.05 s. Refcounting still frees what they drop."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# A lane of tokenizer workers has at least this many processes.
MIN_WORKERS_PER_LANE = 4


def tokenizer_lanes(s: Settings) -> int:
    """Groups of papers the tokenizer workers prepare at once: one per GPU that indexes (each
    GPU's share of the workers, see WindowTokenizer), each lane of at least MIN_WORKERS_PER_LANE."""
    return max(1, min(s.indexing_gpus(), tokenizer_workers(s) // MIN_WORKERS_PER_LANE))


def load_encoders(s: Settings, indexing: bool = True) -> tuple[PaperEncoder, PassageEncoder]:
    """The paper and passage encoders; without `indexing` (queries only: `paperindex search`), no
    CUDA graphs and nothing compiled for them, and passages tokenized in this process."""
    paper = PaperEncoder(s.paper_model, s.paper_adapter, s.query_adapter, device=s.device, token_budget=s.token_budget, graphs=indexing)
    passage = PassageEncoder(
        s.passage_model, device=s.device, long_chunk=s.long_chunk, window_tokens=s.window_tokens,
        window_overlap=s.window_overlap, token_budget=s.token_budget, compile=s.compile,
        tokenizer_workers=tokenizer_workers(s) if indexing else 0, graphs=indexing,
        tokenizer_lanes=tokenizer_lanes(s) if indexing else 1,
    )
    return paper, passage


def gpu_replicas(s: Settings, paper: PaperEncoder, passage: PassageEncoder) -> list[tuple[PaperEncoder, PassageEncoder]]:
    """More encoder pairs beside (paper, passage): `s.encoders_per_gpu` passage replicas per GPU, on
    `s.gpus` GPUs (0: all visible) from cuda:0, each GPU's threads sharing one paper encoder.

    More than one GPU only when the encoders sit on the first GPU by default (`device` auto or
    cuda): a device named explicitly (cuda:N) means that one GPU.
    """
    if passage.device.type != "cuda":
        return []
    if s.device in ("auto", "cuda"):
        devices = [f"cuda:{i}" for i in range(s.indexing_gpus())]
    else:
        devices = [str(passage.device)]
    return list(encoder_grid(devices, s.encoders_per_gpu, paper, passage).values())


def encoder_grid(devices: Sequence[str], per_gpu: int, paper: PaperEncoder, passage: PassageEncoder) -> dict[tuple[int, int], tuple[PaperEncoder, PassageEncoder]]:
    """{(GPU index, thread index): (paper, passage) encoders} beside (paper, passage), which sit on
    devices[0] and are (0, 0): `per_gpu` passage replicas per device (one model per device, its CUDA
    graphs shared by the device's threads: PassageEncoder.replicate), each device's threads sharing
    one paper encoder (heads of a device's groups are encoded on that device)."""
    grid = {}
    for i, device in enumerate(devices):
        heads = paper if i == 0 else paper.replicate(device)
        first = passage if i == 0 else passage.replicate(device)  # the others on this GPU share its graphs
        grid.update({(i, j): (heads, first if j == 0 else first.replicate(device)) for j in range(per_gpu) if (i, j) != (0, 0)})
    return grid


def build(s: Settings, reranker: bool = True, store: Store | None = None, indexing: bool = True) -> Runtime:
    """Everything a command needs; `indexing` False for one that only queries (see load_encoders): its
    Indexer, if used at all, runs on the one encoder pair, eagerly."""
    paper, passage = load_encoders(s, indexing)
    rr = Reranker(s.reranker_model, device=s.device) if reranker and s.reranker_model else None
    store = store or open_store(s)
    idx = Indexer(store, paper, passage, s.chunk_words, s.chunk_overlap, s.max_chunks_per_paper, s.group_papers(),
                  replicas=gpu_replicas(s, paper, passage) if indexing else ())
    return Runtime(s, store, paper, passage, rr, idx, Searcher(store, passage, paper, rr))
