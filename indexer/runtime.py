"""Build the store, encoders, indexer and searcher from Settings (entrypoints only)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Settings
from .encoders import PaperEncoder, PassageEncoder, Reranker
from .pipeline import Indexer
from .search import Searcher
from .store import Store, open_store


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


def load_encoders(s: Settings) -> tuple[PaperEncoder, PassageEncoder]:
    paper = PaperEncoder(s.paper_model, s.paper_adapter, s.query_adapter, device=s.device, token_budget=s.token_budget)
    passage = PassageEncoder(
        s.passage_model, device=s.device, long_chunk=s.long_chunk, window_tokens=s.window_tokens,
        window_overlap=s.window_overlap, token_budget=s.token_budget, compile=s.compile,
        tokenizer_workers=s.tokenizer_workers,
    )
    return paper, passage


def gpu_replicas(s: Settings, paper: PaperEncoder, passage: PassageEncoder) -> list[tuple[PaperEncoder, PassageEncoder]]:
    """More encoder pairs beside (paper, passage): `s.encoders_per_gpu` passage replicas per GPU, on
    `s.gpus` GPUs (0: all visible) from cuda:0, each GPU's threads sharing one paper encoder.

    More than one GPU only when the encoders sit on the first GPU by default (`device` auto or
    cuda): a device named explicitly (cuda:N) means that one GPU.
    """
    import torch

    if passage.device.type != "cuda":
        return []
    if s.device in ("auto", "cuda"):
        visible = torch.cuda.device_count()
        devices = [f"cuda:{i}" for i in range(visible if s.gpus == 0 else min(s.gpus, visible))]
    else:
        devices = [str(passage.device)]
    pairs = []
    for i, device in enumerate(devices):
        heads = paper if i == 0 else paper.replicate(device)
        pairs += [(heads, passage.replicate(device)) for j in range(s.encoders_per_gpu) if (i, j) != (0, 0)]
    return pairs


def build(s: Settings, reranker: bool = True, store: Store | None = None) -> Runtime:
    paper, passage = load_encoders(s)
    rr = Reranker(s.reranker_model, device=s.device) if reranker and s.reranker_model else None
    store = store or open_store(s)
    idx = Indexer(store, paper, passage, s.chunk_words, s.chunk_overlap, s.max_chunks_per_paper, s.papers_per_batch,
                  replicas=gpu_replicas(s, paper, passage))
    return Runtime(s, store, paper, passage, rr, idx, Searcher(store, passage, paper, rr))
