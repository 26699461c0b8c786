"""The Ray pipeline's stages, each a Ray Data `map_batches` function over one group of papers a row:
read (and select), prepare, encode (an actor), write. A row holds a `Group` pickled by us."""

from __future__ import annotations

import gc
import pickle
import queue
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray

from ..config import Settings
from ..grouping import groups
from ..papers import BadRecord, PaperIn, _records, shard_of, validate
from ..pipeline import HEAD_FALLBACK_WORDS, SWITCH_INTERVAL_S, CommitGroup, commit_group, retry
from ..store import Layout
from ..tokenizing import ChunkSpec, WindowSpec, _load, _prepare
from .stores import Sink


@dataclass(frozen=True)
class Recipe:
    """Everything a stage needs to turn papers into points, made once by the driver (`driver.make_recipe`)."""

    settings: Settings
    fingerprint: str
    chunking: ChunkSpec
    windows: WindowSpec
    tokenizer_json: str  # the passage model's fast tokenizer
    layout: Layout
    force: bool
    shard: tuple[int, int] | None


@dataclass
class Group:
    """A group of papers going through the pipeline: the single-process indexer's CommitGroup, with
    what the driver is told of it."""

    commit: CommitGroup
    bad: list[BadRecord]
    seen: int  # good records read, those already indexed included
    head_tokens: int = 0
    windows: int = 0
    tokens: int = 0


@dataclass
class Done:
    """What the driver hears of a written group."""

    seen: int
    indexed: int
    capped: int
    chunks: int
    windows: int
    tokens: int
    head_tokens: int
    bad: list[BadRecord]


def rows(item: Any) -> dict[str, np.ndarray]:
    """A batch of one row holding `item`, pickled by us: Ray Data stores bytes as they are (an object it
    would first try, and fail, to convert to Arrow, then pickle all the same)."""
    column = np.empty(1, dtype=object)
    column[0] = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return {"item": column}


def item(batch: dict[str, np.ndarray]) -> Any:
    return pickle.loads(batch["item"][0])


# read + select (CPU tasks, a file each) ----------------------------------------------------------------


def read_stage(
    batch: dict[str, np.ndarray], recipe: Recipe, sink: Sink, claims: Any, gpus: int, most: int
) -> Iterator[dict]:
    """A file's papers in groups (a ramp of small ones first, see `grouping.groups`), with the file's
    bad records; papers whose commit marker matches are counted and dropped here."""
    for path, file_no in zip(batch["path"].tolist(), batch["file"].tolist()):
        bad: list[BadRecord] = []
        for group in groups(_papers(path, recipe.shard, bad), most, gpus):
            yield rows(_select([p for p, _ in group], [n for _, n in group], file_no, path, bad, recipe, sink, claims))
            bad.clear()
        if bad:
            yield rows(Group(CommitGroup([], [], []), bad, 0))


def _papers(path: str, shard: tuple[int, int] | None, bad: list[BadRecord]) -> Iterator[tuple[PaperIn, int]]:
    """A file's valid papers (of `shard`) and their lines; its bad records go to `bad` as they come."""
    for line, obj, err in _records(Path(path)):
        rec = BadRecord(path, line, None, err) if err is not None else validate(obj, path, line)
        if isinstance(rec, BadRecord):
            bad.append(rec)
        elif shard is None or shard_of(rec.paper_id, shard[1]) == shard[0]:
            yield rec, line


def _select(
    papers: list[PaperIn],
    lines: list[int],
    file_no: int,
    path: str,
    bad: list[BadRecord],
    recipe: Recipe,
    sink: Sink,
    claims: Any,
) -> Group:
    own = ray.get(claims.claim.remote(file_no, [(p.paper_id, n) for p, n in zip(papers, lines)]))
    bad = bad + [
        BadRecord(path, n, p.paper_id, "duplicate paper_id in this run")
        for p, n, ok in zip(papers, lines, own)
        if not ok
    ]
    papers = [p for p, ok in zip(papers, own) if ok]
    done = retry(sink.committed, [p.paper_id for p in papers]) if papers else {}
    # As Indexer.select: only a paper indexed before needs its content hash here; prepare hashes the others.
    fp = recipe.fingerprint
    todo = [p for p in papers if recipe.force or p.paper_id not in done or done[p.paper_id] != p.content_hash(fp)]
    return Group(CommitGroup(todo, [p.paper_id for p in todo if p.paper_id in done], []), bad, len(papers))


# prepare (CPU tasks, a group each) ---------------------------------------------------------------------


def prepare_stage(batch: dict[str, np.ndarray], recipe: Recipe) -> dict:
    """Content hashes, chunks and token windows: what Indexer.prepare has the tokenizer's worker
    processes do, here in the task."""
    g: Group = item(batch)
    c = g.commit
    if c.papers:
        pr = _prepare(
            _tokenizer(recipe.tokenizer_json), [p.model_dump() for p in c.papers], recipe.chunking, recipe.windows
        )
        c.hashes, c.chunks, c.capped, c.windows = pr.hashes, pr.chunks, pr.capped, pr.windows
    return rows(g)


_TOKENIZERS: dict[int, Any] = {}


def _tokenizer(tokenizer_json: str):
    """The fast tokenizer, loaded once per worker process."""
    key = hash(tokenizer_json)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load(tokenizer_json)
    return _TOKENIZERS[key]


# encode (an actor per GPU) ------------------------------------------------------------------------------


def head_text(p: PaperIn) -> tuple[str, str]:
    """A paper head's title and abstract, the first words of the body without one (as Indexer.select)."""
    return p.title, p.abstract or " ".join((p.text or "").split(maxsplit=HEAD_FALLBACK_WORDS)[:HEAD_FALLBACK_WORDS])


class EncodeStage:
    """An encode actor: the library's encoders on this actor's GPU (or the CPU), `encoders_per_gpu`
    pairs of them taking groups at once on a GPU (sharing the model and its CUDA graphs, as for the
    single-process indexer: `runtime.gpu_replicas`)."""

    def __init__(self, settings: Settings) -> None:
        from ..plan import make_plan
        from ..runtime import gpu_replicas, load_encoders

        # The GPU Ray gave this actor (the only one it sees); its papers were prepared by the prepare stage.
        plan = replace(make_plan(settings.model_copy(update={"gpus": 1})), tokenizer_workers=0, tokenizer_lanes=1)
        paper, passage = load_encoders(settings, plan=plan)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for pair in [(paper, passage), *gpu_replicas(plan, paper, passage)]:
            self._free.put(pair)
        # As `paperindex index` (runtime.frozen_heap, pipeline.SWITCH_INTERVAL_S): no full collections over
        # the models' objects, and short interpreter lock turns for the threads feeding the GPU.
        gc.freeze()
        sys.setswitchinterval(SWITCH_INTERVAL_S)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        g: Group = item(batch)
        c = g.commit
        if not c.papers:
            return rows(g)
        paper, passage = pair = self._free.get()
        try:
            heads = [head_text(p) for p in c.papers]
            c.head_ids = paper.tokenize_heads([t for t, _ in heads], [a for _, a in heads])
            c.paper_vecs = paper.encode_ids(c.head_ids)
            c.chunk_vecs = passage.encode_windows(c.windows) if c.windows is not None else []
        finally:
            self._free.put(pair)
        g.head_tokens = sum(map(len, c.head_ids))
        if c.windows is not None:
            g.windows, g.tokens = c.windows.n_windows, c.windows.tokens
        c.head_ids, c.windows = [], None  # not shipped on to the write stage
        return rows(g)


# write (CPU tasks, a group each) -----------------------------------------------------------------------


def write_group(store: Sink, g: CommitGroup) -> None:
    """Indexer.write without its lock (each group is written by one task): the commit protocol
    (pipeline.commit_group), then a flush."""
    commit_group(store, g)  # type: ignore[arg-type]
    retry(store.flush)


def write_stage(batch: dict[str, np.ndarray], sink: Sink) -> dict:
    g: Group = item(batch)
    c = g.commit
    if c.papers:
        write_group(sink, c)
    return rows(
        Done(g.seen, len(c.papers), c.capped, sum(map(len, c.chunks)), g.windows, g.tokens, g.head_tokens, g.bad)
    )
