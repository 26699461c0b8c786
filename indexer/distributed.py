"""`paperindex index --ray`: the indexing pipeline as a Ray Data pipeline, over a cluster's GPUs.

    input files ─ read (a task a file: parse, validate, claim each paper_id once, drop papers whose
                  commit marker matches) ─ prepare (CPU tasks: content hashes, chunks, token windows)
                ─ encode (an actor per GPU, or CPU actors: the library's encoders and batch plans)
                ─ write (tasks: the commit protocol, chunks first and the paper point last)

The commit protocol is the single-process indexer's (`pipeline`): point ids are deterministic and a
paper's point, its commit marker, is written only after its chunks, so a retried task, a restarted
actor or a rerun after the driver died never leaves a duplicate, an orphan or a half paper marked done.

Where it writes: a Qdrant server or cluster (`PAPERINDEX_QDRANT_URL`; every write task talks to it), or
on one host the embedded store: each of its shards is single-writer, so each is written by a Ray actor
of its own on the driver's node (the papers shard, and one per chunk shard, a paper's chunks routed to
its shard by `chunk_shard`), and the write tasks call them.

How much runs at once comes from `ray.cluster_resources()` (`plan_cluster`); Ray Data's streaming
executor holds the stages back when the object store budget is used up.
"""

from __future__ import annotations

import gc
import logging
import pickle
import queue
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .config import Settings
from .papers import BadRecord, PaperIn, _records, shard_of, validate
from .pipeline import (
    HEAD_FALLBACK_WORDS,
    SWITCH_INTERVAL_S,
    CommitGroup,
    Indexer,
    IndexStats,
    groups,
    retry,
    settings_fingerprint,
)
from .plan import group_papers
from .store import (
    ChunkText,
    EdgeStore,
    Layout,
    PaperChunks,
    PaperRef,
    Point,
    Store,
    chunk_points,
    chunk_shard,
    open_store,
    paper_point_id,
    store_options,
)
from .store.schema import VectorNames, paper_points, vector_names
from .store.shard import edge_points, load_shard, paper_filter
from .tokenizing import ChunkSpec, WindowSpec, _load, _prepare

log = logging.getLogger(__name__)

# `--ray` with no address: ray.init() (the cluster RAY_ADDRESS names, else a new one on this host).
LOCAL = "local"
# Attempts of a task lost with its worker or node (Ray's default is 3; a node lost twice mid-run is not rare
# on preemptible hosts).
TASK_RETRIES = 8
# How long a restarted shard actor waits for its dead predecessor's lock on the shard (see _load_shard).
SHARD_OPEN_WAIT_S = 120.0
# Share of the cluster's object store the pipeline's blocks in flight may take before stages are held back.
OBJECT_STORE_SHARE = 0.5


@dataclass(frozen=True)
class ClusterPlan:
    """What runs where, from the cluster's resources."""

    gpus: int  # GPUs in the cluster: one encode actor each (0: CPU encode actors)
    encoders: int  # encode actors
    encoder_threads: int  # encoder pairs (and calls in work) per actor: `encoders_per_gpu` on a GPU
    group_papers: int  # papers per group (a block of the pipeline)
    chunk_shards: int  # chunk shards of a new embedded index (an actor each)
    object_store_bytes: int  # the pipeline's budget of the object store

    def encoder_args(self) -> dict[str, Any]:
        return {"num_gpus": 1} if self.gpus else {"num_cpus": 1}


def plan_cluster(resources: dict[str, float], s: Settings) -> ClusterPlan:
    """One encode actor per GPU (as the single-process indexer has an encoder replica per GPU), or
    without GPUs one CPU actor per 8 CPUs (the rest prepare papers); groups and chunk shards as
    `plan.make_plan` sizes them for this many GPUs."""
    gpus = int(resources.get("GPU", 0))
    encoders = gpus or max(1, int(resources.get("CPU", 1)) // 8)
    budget = int(resources.get("object_store_memory", 2**30) * OBJECT_STORE_SHARE)
    return ClusterPlan(gpus, encoders, s.encoders_per_gpu if gpus else 1, group_papers(s, max(1, gpus)),
                       s.edge_chunk_shards or 2 * max(1, gpus), budget)


@dataclass(frozen=True)
class Recipe:
    """Everything a stage needs to turn papers into points, made once by the driver."""

    settings: Settings
    fingerprint: str
    chunking: ChunkSpec
    windows: WindowSpec
    tokenizer_json: str  # the passage model's fast tokenizer
    layout: Layout
    force: bool
    shard: tuple[int, int] | None


def make_recipe(s: Settings, force: bool = False, shard: tuple[int, int] | None = None) -> Recipe:
    """The models are loaded here once on the CPU, without CUDA graphs, for what shapes the points:
    the settings' fingerprint, the window spec and tokenizer, the vector sizes."""
    from .runtime import load_encoders

    paper, passage = load_encoders(s.model_copy(update={"device": "cpu"}), indexing=False)
    try:
        fp = settings_fingerprint(passage, paper, s.chunk_words, s.chunk_overlap, s.max_chunks_per_paper)
        return Recipe(s, fp, ChunkSpec(s.chunk_words, s.chunk_overlap, s.max_chunks_per_paper, fp), passage.windows.spec,
                      passage.tokenizer.backend_tokenizer.to_str(), Layout(paper.dim, passage.dim, passage.multivector), force, shard)
    finally:
        passage.close()


@dataclass
class Group:
    """A group of papers going through the pipeline (a row of the Ray dataset): the single-process
    indexer's CommitGroup, with what the driver is told of it."""

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


def _rows(item: Any) -> dict[str, np.ndarray]:
    """A batch of one row holding `item`, pickled by us: Ray Data stores bytes as they are (an object it
    would first try, and fail, to convert to Arrow, then pickle all the same)."""
    column = np.empty(1, dtype=object)
    column[0] = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return {"item": column}


def _item(batch: dict[str, np.ndarray]) -> Any:
    return pickle.loads(batch["item"][0])


# where the points go ------------------------------------------------------------------------------


class _ShardActor:
    """One Qdrant Edge shard, written only by this actor (the engine locks a shard to one writer)."""

    def __init__(self, path: str, names: VectorNames) -> None:
        import qdrant_edge as qe

        self.qe, self.names = qe, names
        self.shard = load_shard(qe, path, SHARD_OPEN_WAIT_S)

    def committed(self, paper_ids: Sequence[str]) -> dict[str, str]:
        recs = self.shard.retrieve([paper_point_id(p) for p in paper_ids], with_payload=True, with_vector=False)
        return {pid: p.payload.get("content_hash", "") for pid, p in paper_points(recs, False).items()}

    def delete_points(self, ids: Sequence[str]) -> None:
        self.shard.update(self.qe.UpdateOperation.delete_points(list(ids)))

    def delete_papers(self, paper_ids: Sequence[str]) -> None:
        """Every point of these papers (their chunks)."""
        self.shard.update(self.qe.UpdateOperation.delete_points_by_filter(paper_filter(self.qe, paper_ids)))

    def upsert(self, points: Sequence[Point]) -> None:
        self.shard.update(self.qe.UpdateOperation.upsert_points(edge_points(self.qe, self.names, points)))

    def upsert_chunks(self, entries: Sequence[PaperChunks]) -> None:
        self.upsert(chunk_points(entries))

    def flush(self) -> None:
        self.shard.flush()

    def close(self) -> None:
        self.shard.flush()
        self.shard.close()


class EdgeActors:
    """The embedded store's shards, each held by a `_ShardActor` on the driver's node (where its
    folder is), behind the part of the Store interface that indexing uses. Picklable: the write tasks
    each get a copy and call the actors; a call lost with a restarted actor is retried on the new one
    (every write here is idempotent)."""

    def __init__(self, papers: Any, chunks: Sequence[Any], papers_name: str = "papers", chunks_name: str = "chunks") -> None:
        self.papers_actor, self.chunk_actors = papers, list(chunks)
        self.papers, self.chunks = papers_name, chunks_name

    @classmethod
    def start(cls, path: Path, layout: Layout, s: Settings, chunk_shards: int) -> EdgeActors:
        """Create the collections that do not exist (a new chunks collection with `chunk_shards`
        shards), as `paperindex index` does, then hand each shard to an actor."""
        store = EdgeStore(path, s.papers_collection, s.chunks_collection, replace(store_options(s), chunk_shards=chunk_shards))
        try:
            store.create(layout)
            shards = store.chunk_shards
            paper_names, chunk_names = vector_names(store.layout())
        finally:
            store.close()
        actor = ray.remote(_ShardActor).options(num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=_this_node())
        names = [s.chunks_collection if i == 0 else f"{s.chunks_collection}.{i}" for i in range(shards)]
        return cls(actor.remote(str(path / s.papers_collection), paper_names),
                   [actor.remote(str(path / n), chunk_names) for n in names], s.papers_collection, s.chunks_collection)

    def _by_shard(self, items: Sequence, paper_id: Callable[[Any], str]) -> dict[int, list]:
        out: dict[int, list] = {}
        for item in items:
            out.setdefault(chunk_shard(paper_id(item), len(self.chunk_actors)), []).append(item)
        return out

    def committed(self, paper_ids: Sequence[str]) -> dict[str, str]:
        return ray.get(self.papers_actor.committed.remote(list(paper_ids)))

    def delete_papers(self, paper_ids: Sequence[str]) -> None:
        """The commit markers first, then the chunks (as EdgeStore.delete_papers)."""
        ray.get(self.papers_actor.delete_points.remote([paper_point_id(p) for p in paper_ids]))
        self.delete_chunks(paper_ids)

    def delete_chunks(self, paper_ids: Sequence[str]) -> None:
        ray.get([self.chunk_actors[i].delete_papers.remote(ids) for i, ids in self._by_shard(paper_ids, lambda p: p).items()])

    def upsert_chunks(self, entries: Sequence[PaperChunks]) -> None:
        ray.get([self.chunk_actors[i].upsert_chunks.remote(part) for i, part in self._by_shard(entries, lambda e: e.paper.paper_id).items()])

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if collection != self.papers:
            raise ValueError(f"chunks are written with upsert_chunks, not upsert({collection!r})")
        ray.get(self.papers_actor.upsert.remote(list(points)))

    def flush(self) -> None:
        """The chunk shards, then the papers shard: a marker is never on disk before its chunks."""
        ray.get([a.flush.remote() for a in self.chunk_actors])
        ray.get(self.papers_actor.flush.remote())

    def close(self) -> None:
        for a in [*self.chunk_actors, self.papers_actor]:
            try:
                ray.get(a.close.remote())
            finally:
                ray.kill(a, no_restart=True)


# The server store of each worker process, by settings (a write task reuses its process's client).
_SERVER_STORES: dict[str, Store] = {}


class ServerStore:
    """A Qdrant server or cluster: each process opens its own client (picklable: carries the settings)."""

    def __init__(self, s: Settings) -> None:
        self.settings = s

    @property
    def store(self) -> Store:
        key = self.settings.model_dump_json()
        if key not in _SERVER_STORES:
            _SERVER_STORES[key] = open_store(self.settings)
        return _SERVER_STORES[key]

    @property
    def papers(self) -> str:
        return self.settings.papers_collection

    def committed(self, paper_ids: Sequence[str]) -> dict[str, str]:
        return self.store.committed(paper_ids)

    def delete_papers(self, paper_ids: Sequence[str]) -> None:
        self.store.delete_papers(paper_ids)

    def delete_chunks(self, paper_ids: Sequence[str]) -> None:
        self.store.delete_chunks(paper_ids)

    def upsert_chunks(self, entries: Sequence[PaperChunks]) -> None:
        self.store.upsert_chunks(entries)

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        self.store.upsert(collection, points)

    def flush(self) -> None:
        self.store.flush()

    def close(self) -> None:
        pass


Sink = EdgeActors | ServerStore


class Claims:
    """Each paper_id once in a run: the first record to claim it (a file and line) keeps it, any other
    is a bad record, as `read_papers` reports a repeated id. A record claiming again (its read task
    retried) gets its claim back."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[int, int]] = {}

    def claim(self, file_no: int, records: Sequence[tuple[str, int]]) -> list[bool]:
        return [self._first.setdefault(pid, (file_no, line)) == (file_no, line) for pid, line in records]


# stages ---------------------------------------------------------------------------------------------


def read_stage(batch: dict[str, np.ndarray], recipe: Recipe, sink: Sink, claims: Any, gpus: int, most: int) -> Iterator[dict]:
    """A file's papers in groups (a ramp of small ones first, see `pipeline.groups`), with the
    file's bad records; papers whose commit marker matches are counted and dropped here."""
    for path, file_no in zip(batch["path"].tolist(), batch["file"].tolist()):
        bad: list[BadRecord] = []
        for group in groups(_papers(path, recipe.shard, bad), most, gpus):
            yield _rows(_plan([p for p, _ in group], [n for _, n in group], file_no, path, bad, recipe, sink, claims))
            bad.clear()
        if bad:
            yield _rows(Group(CommitGroup([], [], []), bad, 0))


def _papers(path: str, shard: tuple[int, int] | None, bad: list[BadRecord]) -> Iterator[tuple[PaperIn, int]]:
    """A file's valid papers (of `shard`) and their lines; its bad records go to `bad` as they come."""
    for line, obj, err in _records(Path(path)):
        rec = BadRecord(path, line, None, err) if err is not None else validate(obj, path, line)
        if isinstance(rec, BadRecord):
            bad.append(rec)
        elif shard is None or shard_of(rec.paper_id, shard[1]) == shard[0]:
            yield rec, line


def _plan(papers: list[PaperIn], lines: list[int], file_no: int, path: str, bad: list[BadRecord], recipe: Recipe, sink: Sink,
          claims: Any) -> Group:
    own = ray.get(claims.claim.remote(file_no, [(p.paper_id, n) for p, n in zip(papers, lines)]))
    bad = bad + [BadRecord(path, n, p.paper_id, "duplicate paper_id in this run") for p, n, ok in zip(papers, lines, own) if not ok]
    papers = [p for p, ok in zip(papers, own) if ok]
    done = retry(sink.committed, [p.paper_id for p in papers]) if papers else {}
    # As Indexer.select: only a paper indexed before needs its content hash here; prepare hashes the others.
    fp = recipe.fingerprint
    todo = [p for p in papers if recipe.force or p.paper_id not in done or done[p.paper_id] != p.content_hash(fp)]
    return Group(CommitGroup(todo, [p.paper_id for p in todo if p.paper_id in done], []), bad, len(papers))


def prepare_stage(batch: dict[str, np.ndarray], recipe: Recipe) -> dict:
    """Content hashes, chunks and token windows (what Indexer.prepare has the tokenizer's worker
    processes do, here in the task)."""
    g: Group = _item(batch)
    c = g.commit
    if c.papers:
        pr = _prepare(_tokenizer(recipe.tokenizer_json), [p.model_dump() for p in c.papers], recipe.chunking, recipe.windows)
        c.hashes, c.chunks, c.capped, c.windows = pr.hashes, pr.chunks, pr.capped, pr.windows
    return _rows(g)


_TOKENIZERS: dict[int, Any] = {}


def _tokenizer(tokenizer_json: str):
    """The fast tokenizer, loaded once per worker process."""
    key = hash(tokenizer_json)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load(tokenizer_json)
    return _TOKENIZERS[key]


def head_text(p: PaperIn) -> tuple[str, str]:
    """A paper head's title and abstract, the first words of the body without one (as Indexer._plan)."""
    return p.title, p.abstract or " ".join((p.text or "").split(maxsplit=HEAD_FALLBACK_WORDS)[:HEAD_FALLBACK_WORDS])


class EncodeStage:
    """An encode actor: the library's encoders on this actor's GPU (or the CPU), `encoders_per_gpu`
    pairs of them taking groups at once on a GPU (sharing the model and its CUDA graphs, as for the
    single-process indexer: `runtime.gpu_replicas`)."""

    def __init__(self, settings: Settings) -> None:
        from .plan import make_plan
        from .runtime import gpu_replicas, load_encoders

        # The GPU Ray gave this actor (the only one it sees); its papers were prepared by the prepare stage.
        plan = replace(make_plan(settings.model_copy(update={"gpus": 1})), tokenizer_workers=0, tokenizer_lanes=1)
        paper, passage = load_encoders(settings, plan=plan)
        pairs = [(paper, passage), *gpu_replicas(plan, paper, passage)]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for pair in pairs:
            self._free.put(pair)
        # As `paperindex index` (runtime.frozen_heap, pipeline.SWITCH_INTERVAL_S): no full collections over
        # the models' objects, and short interpreter lock turns for the threads feeding the GPU.
        gc.freeze()
        sys.setswitchinterval(SWITCH_INTERVAL_S)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        g: Group = _item(batch)
        c = g.commit
        if not c.papers:
            return _rows(g)
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
        return _rows(g)


def write_group(store: Any, g: CommitGroup) -> None:
    """Indexer.write without its lock (each group is written by one task): what a previous version
    left goes (its marker first), then the chunks, then the paper points, the commit markers; every
    store call is idempotent and retried."""
    if g.replace:
        retry(store.delete_papers, g.replace)
    retry(store.delete_chunks, [p.paper_id for p in g.papers if p.paper_id not in set(g.replace)])
    entries, at = [], 0
    for p, cs in zip(g.papers, g.chunks):
        if cs:
            entries.append(PaperChunks(PaperRef(p.paper_id, p.title, p.year, p.metadata()),
                                       [ChunkText(c.chunk_index, c.word_start, c.word_end, c.text) for c in cs],
                                       g.chunk_vecs[at : at + len(cs)]))
            at += len(cs)
    retry(store.upsert_chunks, entries)
    points = [Point(paper_point_id(p.paper_id), g.paper_vecs[i], Indexer.paper_payload(p, h, len(cs)))
              for i, (p, h, cs) in enumerate(zip(g.papers, g.hashes, g.chunks))]
    retry(store.upsert, store.papers, points)
    retry(store.flush)


def write_stage(batch: dict[str, np.ndarray], sink: Sink) -> dict:
    g: Group = _item(batch)
    c = g.commit
    if c.papers:
        write_group(sink, c)
    return _rows(Done(g.seen, len(c.papers), c.capped, sum(map(len, c.chunks)), g.windows, g.tokens, g.head_tokens, g.bad))


# driver -----------------------------------------------------------------------------------------------


def connect(address: str) -> None:
    """Join the Ray cluster at `address` (`auto`: the one this process runs in; LOCAL: ray.init()'s own
    choice), unless this process is connected already."""
    if not ray.is_initialized():
        ray.init(address=None if address == LOCAL else address, log_to_driver=False, logging_level=logging.WARNING)


def index_cluster(s: Settings, files: Sequence[Path], address: str, force: bool = False, shard: tuple[int, int] | None = None,
                  on_batch: Callable[[IndexStats], None] | None = None) -> IndexStats:
    """`paperindex index --ray ADDRESS`: connect, index, then build what the writes deferred (as
    `paperindex index` does: `Store.finish_bulk`)."""
    connect(address)
    stats = index_on_ray(s, files, force, shard, on_batch)
    store = open_store(s)
    try:
        store.finish_bulk()
    finally:
        store.close()
    return stats


def index_on_ray(
    s: Settings,
    files: Sequence[Path],
    force: bool = False,
    shard: tuple[int, int] | None = None,
    on_batch: Callable[[IndexStats], None] | None = None,
) -> IndexStats:
    """Index `files` on the connected Ray cluster (see `connect`) into the store the settings name.
    Returns the run's statistics, as `Indexer.index` does."""
    t0 = time.perf_counter()
    plan = plan_cluster(ray.cluster_resources(), s)
    recipe = make_recipe(s, force, shard)
    if s.qdrant_url:
        probe = open_store(s)
        try:
            retry(probe.create, recipe.layout)
        finally:
            probe.close()
        sink: Sink = ServerStore(s)
    else:
        sink = EdgeActors.start(Path(s.qdrant_path), recipe.layout, s, plan.chunk_shards)
    claims = ray.remote(Claims).options(num_cpus=0, scheduling_strategy=_this_node()).remote()
    stats = IndexStats()
    try:
        for done in _results(_dataset(files, recipe, sink, claims, plan)):
            stats.bad += done.bad
            stats.papers_seen += done.seen
            stats.papers_indexed += done.indexed
            stats.papers_unchanged += done.seen - done.indexed
            stats.papers_capped += done.capped
            stats.chunks += done.chunks
            stats.windows += done.windows
            stats.tokens += done.tokens
            stats.head_tokens += done.head_tokens
            stats.seconds = time.perf_counter() - t0
            if on_batch:
                on_batch(stats)
    finally:
        sink.close()
        ray.kill(claims)
    for rec in stats.bad:
        log.warning("bad record %s", rec)
    stats.seconds = time.perf_counter() - t0
    return stats


def _this_node() -> NodeAffinitySchedulingStrategy:
    """The driver's node: where the embedded store's folder is, and where what a run cannot lose lives."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _task_args() -> dict[str, Any]:
    """Every CPU stage's tasks: retried where a worker or node is lost (a `ray_remote_args_fn` also keeps
    Ray Data from fusing the stages into one task: a file is read by one task, its groups are prepared by
    as many as there are CPUs)."""
    return {"max_retries": TASK_RETRIES}


def _dataset(files: Sequence[Path], recipe: Recipe, sink: Sink, claims: Any, plan: ClusterPlan):
    from ray.data import ActorPoolStrategy, DataContext, ExecutionResources

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows the run's own progress
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = False
    ctx.execution_options.resource_limits = ExecutionResources(object_store_memory=plan.object_store_bytes)
    # Each group a block of its own: Ray Data gathers a task's output rows into blocks of up to 128 MiB,
    # so a file's groups would go on only once the whole file was read, and a block's groups one by one.
    ctx.target_max_block_size = 1
    items = [{"path": str(f), "file": i} for i, f in enumerate(files)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(read_stage, batch_size=1, num_cpus=1, ray_remote_args_fn=_task_args,
                        fn_kwargs=dict(recipe=recipe, sink=sink, claims=claims, gpus=plan.encoders, most=plan.group_papers))
    ds = ds.map_batches(prepare_stage, batch_size=1, num_cpus=1, ray_remote_args_fn=_task_args, fn_kwargs=dict(recipe=recipe))
    pool = ActorPoolStrategy(size=plan.encoders, max_tasks_in_flight_per_actor=plan.encoder_threads + 1,
                             max_concurrent_calls_per_actor=plan.encoder_threads, enable_true_multi_threading=True)
    settings = recipe.settings.model_copy(update={"device": "auto" if plan.gpus else "cpu"})
    ds = ds.map_batches(EncodeStage, batch_size=1, compute=pool, fn_constructor_kwargs=dict(settings=settings), **plan.encoder_args())
    return ds.map_batches(write_stage, batch_size=1, num_cpus=0.25, ray_remote_args_fn=_task_args, fn_kwargs=dict(sink=sink))


def _results(ds) -> Iterator[Done]:
    for row in ds.iter_rows():
        yield pickle.loads(row["item"])
