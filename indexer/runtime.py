"""Build the store, encoders, indexer and searcher from Settings (entrypoints only)."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .config import Settings
from .encode import PaperEncoder, PassageEncoder, Reranker
from .encode.kernels.graphs import WARM_UPS, GpuGate, gpu_gate
from .pipeline import Indexer
from .plan import Plan, make_plan
from .search import Searcher
from .store import Store, open_store

log = logging.getLogger(__name__)


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


@contextmanager
def frozen_heap() -> Iterator[None]:
    """For a long run once the models are loaded: the objects that exist now (models, compiled
    kernels, CUDA graphs: ~800,000 on a GPU host) are left out of the cyclic garbage collector's
    full passes until the block ends (gc.freeze). A full pass holds the interpreter lock while every
    GPU's threads wait, ~10× longer over them (docs/performance.md). Refcounting still frees what they drop."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def load_encoders(s: Settings, indexing: bool = True, plan: Plan | None = None) -> tuple[PaperEncoder, PassageEncoder]:
    """The paper and passage encoders; without `indexing` (queries only: `paperindex search`), no
    CUDA graphs and nothing compiled for them, and passages tokenized in this process."""
    plan = plan or make_plan(s, indexing=indexing)
    log.info("device plan: %s", plan.device.describe())
    # Both encoders (and their replicas) take one gate: a capture holds back the other's work too.
    gate = gpu_gate if plan.tuning.gate_per_device else GpuGate(per_device=False)
    return paper_encoder(s, plan, gate), passage_encoder(s, plan, gate)


def capture_warm_ups(plan: Plan) -> int:
    """Runs of a new batch shape before its CUDA graph capture (the plan's tuning, or WARM_UPS)."""
    return WARM_UPS if plan.tuning.capture_warm_ups is None else plan.tuning.capture_warm_ups


def paper_encoder(s: Settings, plan: Plan, gate: GpuGate = gpu_gate) -> PaperEncoder:
    return PaperEncoder(
        s.paper_model, s.paper_adapter, s.query_adapter, device=s.device, graphs=plan.indexing, plan=plan.device,
        capture_warm_ups=capture_warm_ups(plan), gate=gate,
    )


def passage_encoder(s: Settings, plan: Plan, gate: GpuGate = gpu_gate) -> PassageEncoder:
    return PassageEncoder(
        s.passage_model, device=s.device, long_chunk=s.long_chunk, window_tokens=s.window_tokens,
        window_overlap=s.window_overlap, compile=s.compile, tokenizer_workers=plan.tokenizer_workers,
        graphs=plan.indexing, tokenizer_lanes=plan.tokenizer_lanes, plan=plan.device,
        capture_warm_ups=capture_warm_ups(plan), gate=gate,
    )


def query_searcher(s: Settings, store: Store, passages: bool, papers: bool, reranker: bool) -> Searcher:
    """A Searcher with only the models a query command needs (`paperindex search`, `similar`): the
    passage encoder for passage search, the paper encoder for paper search, the reranker if asked for;
    `similar` needs none (it reads the stored vectors)."""
    plan = make_plan(s, indexing=False)
    return Searcher(
        store, passage_encoder(s, plan) if passages else None, paper_encoder(s, plan) if papers else None,
        Reranker(s.reranker_model, device=s.device, plan=plan.device) if reranker and s.reranker_model else None,
        s.search_mode, s.search_prefetch, s.search_fusion,
    )


def gpu_replicas(plan: Plan, paper: PaperEncoder, passage: PassageEncoder) -> list[tuple[PaperEncoder, PassageEncoder]]:
    """More encoder pairs beside (paper, passage): `plan.encoders_per_gpu` passage replicas on each of
    the plan's GPUs (cuda:0 first), each GPU's threads sharing one paper encoder; none off a GPU."""
    if passage.device.type != "cuda":
        return []
    return list(encoder_grid(plan.devices, plan.encoders_per_gpu, paper, passage, plan.tuning.share_graphs).values())


def encoder_grid(
    devices: Sequence[str], per_gpu: int, paper: PaperEncoder, passage: PassageEncoder, share_graphs: bool = True
) -> dict[tuple[int, int], tuple[PaperEncoder, PassageEncoder]]:
    """{(GPU index, thread index): (paper, passage) encoders} beside (paper, passage), which sit on
    devices[0] and are (0, 0): `per_gpu` passage replicas per device (one model per device, its CUDA
    graphs shared by the device's threads: PassageEncoder.replicate), each device's threads sharing
    one paper encoder (heads of a device's groups are encoded on that device). Without `share_graphs` each
    thread has a model and graphs of its own."""
    grid = {}
    for i, device in enumerate(devices):
        heads = paper if i == 0 else paper.replicate(device)
        first = passage if i == 0 else passage.replicate(device)  # the others on this GPU share its graphs
        threads = [j for j in range(per_gpu) if (i, j) != (0, 0)]
        grid.update({(i, j): (heads, first if j == 0 else first.replicate(device, share_graphs)) for j in threads})
    return grid


def build(
    s: Settings, reranker: bool = True, store: Store | None = None, indexing: bool = True, plan: Plan | None = None
) -> Runtime:
    """Everything a command needs; `indexing` False for one that only queries (see load_encoders): its
    Indexer, if used at all, runs on the one encoder pair, eagerly. `plan`: the run's sizes (default:
    make_plan's for these settings on this host)."""
    plan = plan or make_plan(s, indexing=indexing)
    paper, passage = load_encoders(s, indexing, plan)
    rr = Reranker(s.reranker_model, device=s.device, plan=plan.device) if reranker and s.reranker_model else None
    store = store or open_store(s)
    idx = Indexer(store, paper, passage, s.chunk_words, s.chunk_overlap, s.max_chunks_per_paper, plan.group_papers,
                  replicas=gpu_replicas(plan, paper, passage) if indexing else (), group_seconds=plan.group_seconds,
                  tuning=plan.tuning, head_passage=s.head_passage)
    searcher = Searcher(store, passage, paper, rr, s.search_mode, s.search_prefetch, s.search_fusion)
    return Runtime(s, store, paper, passage, rr, idx, searcher)
