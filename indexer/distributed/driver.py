"""The driver of a Ray run: what the cluster's resources allow (`plan_cluster`), the recipe, the
dataset of stages, and the run's statistics as the progress bar shows them."""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from ..config import Settings
from ..pipeline import IndexStats, retry
from ..plan import group_papers
from ..store import ClientStore, open_store
from .stages import Done, EncodeStage, Recipe, prepare_stage, read_stage, write_stage
from .stores import Claims, EdgeActors, ServerStore, Sink, this_node

log = logging.getLogger(__name__)

# `--ray` with no address: ray.init() (the cluster RAY_ADDRESS names, else a new one on this host).
LOCAL = "local"
# Attempts of a task lost with its worker or node (Ray's default is 3; a node lost twice mid-run is not
# rare on preemptible hosts).
TASK_RETRIES = 8
# Share of the cluster's object store the pipeline's blocks in flight may take before stages are held back.
OBJECT_STORE_SHARE = 0.5
# Write tasks at once per encode actor, into a server: a group's write (~1-2 s for 256 papers) overlaps
# the next groups' encoding (~1.5 s on a GPU).
WRITES_PER_ENCODER = 4


@dataclass(frozen=True)
class ClusterPlan:
    """What runs where, from the cluster's resources."""

    gpus: int  # GPUs in the cluster: one encode actor each (0: CPU encode actors)
    encoders: int  # encode actors
    encoder_threads: int  # encoder pairs (and calls in work) per actor: `encoders_per_gpu` on a GPU
    group_papers: int  # papers per group (a block of the pipeline)
    chunk_shards: int  # chunk shards of a new embedded index (an actor each)
    write_tasks: int  # write tasks at once (each mostly waits: on the shard actors, or on the server)
    object_store_bytes: int  # the pipeline's budget of the object store

    def encoder_args(self) -> dict[str, Any]:
        return {"num_gpus": 1} if self.gpus else {"num_cpus": 1}


def plan_cluster(resources: dict[str, float], s: Settings) -> ClusterPlan:
    """One encode actor per GPU (as the single-process indexer has an encoder replica per GPU), or
    without GPUs one CPU actor per 8 CPUs (the rest prepare papers); groups and chunk shards as
    `plan.make_plan` sizes them for this many GPUs. Write tasks: two per chunk shard actor (one
    writing while the next sends), or WRITES_PER_ENCODER per encode actor into a server; without a
    bound, every group waiting to be written took a worker process of its own."""
    gpus = int(resources.get("GPU", 0))
    encoders = gpus or max(1, int(resources.get("CPU", 1)) // 8)
    shards = s.edge_chunk_shards or 2 * max(1, gpus)
    return ClusterPlan(
        gpus,
        encoders,
        s.encoders_per_gpu if gpus else 1,
        group_papers(s, max(1, gpus)),
        shards,
        WRITES_PER_ENCODER * encoders if s.qdrant_url else 2 * shards,
        int(resources.get("object_store_memory", 2**30) * OBJECT_STORE_SHARE),
    )


def make_recipe(s: Settings, force: bool = False, shard: tuple[int, int] | None = None) -> Recipe:
    """What shapes the points, taken from the Indexer `paperindex index` would build (models loaded once
    here on the CPU, no CUDA graphs, no store): the settings' fingerprint, the chunking, the window
    spec and tokenizer, the vector sizes."""
    from ..runtime import build

    rt = build(
        s.model_copy(update={"device": "cpu"}), reranker=False, store=ClientStore(location=":memory:"), indexing=False
    )
    try:
        ix, passage = rt.indexer, rt.passage_encoder
        return Recipe(
            s,
            ix.fingerprint,
            ix.chunking,
            passage.windows.spec,
            passage.tokenizer.backend_tokenizer.to_str(),
            ix.layout,
            force,
            shard,
        )
    finally:
        rt.close()
        rt.passage_encoder.close()


def connect(address: str) -> None:
    """Join the Ray cluster at `address` (`auto`: the one this process runs in; LOCAL: ray.init()'s own
    choice), unless this process is connected already."""
    if not ray.is_initialized():
        ray.init(address=None if address == LOCAL else address, log_to_driver=False, logging_level=logging.WARNING)


def index_cluster(
    s: Settings,
    files: Sequence[Path],
    address: str,
    force: bool = False,
    shard: tuple[int, int] | None = None,
    on_batch: Callable[[IndexStats], None] | None = None,
) -> IndexStats:
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
    Returns the run's statistics; `on_batch` gets them each time a group is committed (`Indexer.index`'s)."""
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
    claims = ray.remote(Claims).options(num_cpus=0, scheduling_strategy=this_node()).remote()
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
    ds = ds.map_batches(
        read_stage,
        batch_size=1,
        num_cpus=1,
        ray_remote_args_fn=_task_args,
        fn_kwargs=dict(recipe=recipe, sink=sink, claims=claims, gpus=plan.encoders, most=plan.group_papers),
    )
    ds = ds.map_batches(
        prepare_stage, batch_size=1, num_cpus=1, ray_remote_args_fn=_task_args, fn_kwargs=dict(recipe=recipe)
    )
    pool = ActorPoolStrategy(
        size=plan.encoders,
        max_tasks_in_flight_per_actor=plan.encoder_threads + 1,
        max_concurrent_calls_per_actor=plan.encoder_threads,
        enable_true_multi_threading=True,
    )
    settings = recipe.settings.model_copy(update={"device": "auto" if plan.gpus else "cpu"})
    ds = ds.map_batches(
        EncodeStage, batch_size=1, compute=pool, fn_constructor_kwargs=dict(settings=settings), **plan.encoder_args()
    )
    return ds.map_batches(
        write_stage,
        batch_size=1,
        num_cpus=0.25,
        concurrency=plan.write_tasks,
        ray_remote_args_fn=_task_args,
        fn_kwargs=dict(sink=sink),
    )


def _results(ds) -> Iterator[Done]:
    for row in ds.iter_rows():
        yield pickle.loads(row["item"])
