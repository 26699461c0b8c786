"""One Qdrant Edge shard: what it is created with, creating and opening it. Used by the embedded
store (edge.py) and by its chunk shards' writer processes (writers.py)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import Point
from .schema import INTEGER_KEYS, FilterModels, SearchFilter, make_filter

# How long a process opening a shard waits for another to let go of it (see load_shard).
OPEN_WAIT_S = 10.0


@dataclass(frozen=True)
class ShardSpec:
    """What a new Qdrant Edge shard is created with, in plain values (a writer process creates its
    chunk shard from one: see EdgeStore.create)."""

    vector: str
    dim: int
    distance: str  # a qdrant_edge.Distance name
    multivector: bool
    m: int  # HNSW m; 0 defers the graph (bulk load)
    ef_construct: int
    quantization: str  # "none" | "int8"
    on_disk: bool
    indexes: tuple[str, ...]  # payload keys indexed; INTEGER_KEYS as integers


def edge_filters(qe) -> FilterModels:
    return FilterModels(qe.Filter, qe.FieldCondition, qe.MatchAny, qe.RangeFloat)


def paper_filter(qe, paper_ids: Sequence[str]):
    return make_filter(SearchFilter(paper_ids=list(paper_ids)), edge_filters(qe))


def vector_value(vector: np.ndarray) -> list:
    return vector.astype(np.float32, copy=False).tolist()


def edge_points(qe, vname: str, points: Sequence[Point]) -> list:
    return [qe.Point(p.id, {vname: vector_value(p.vector)}, p.payload) for p in points]


def edge_config(qe, spec: ShardSpec):
    quant = (
        qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True)
        if spec.quantization == "int8"
        else None
    )
    params = qe.EdgeVectorParams(
        size=spec.dim,
        distance=getattr(qe.Distance, spec.distance),
        multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim) if spec.multivector else None,
        on_disk=spec.on_disk or None,
        quantization_config=quant,
    )
    hnsw = qe.HnswIndexConfig(m=spec.m, ef_construct=spec.ef_construct, full_scan_threshold=10000)
    # Payload (chunk text) on disk, as on a Qdrant server: filters use the in-RAM payload indexes.
    return qe.EdgeConfig(vectors={spec.vector: params}, hnsw_config=hnsw, on_disk_payload=True)


def create_shard(qe, path: Path, spec: ShardSpec):
    """A new shard at `path`, its payload indexes made before any point. A folder already there is
    what a creation that did not finish left (a collection is created only where its first shard's
    config is missing, and its shards get no write before all are created), so it is replaced."""
    if path.exists():
        shutil.rmtree(path)
    shard = qe.EdgeShard.create(str(path), edge_config(qe, spec))
    for key in spec.indexes:
        kind = qe.PayloadSchemaType.Integer if key in INTEGER_KEYS else qe.PayloadSchemaType.Keyword
        shard.update(qe.UpdateOperation.create_field_index(key, kind))
    shard.flush()
    return shard


def load_shard(qe, path: str, wait_s: float | None = None):
    """EdgeShard.load, waiting while another process holds the shard: the engine locks a shard's
    write-ahead log, and after a crash the crashed run's writer processes may still be closing theirs."""
    deadline = time.monotonic() + (OPEN_WAIT_S if wait_s is None else wait_s)
    while True:
        try:
            return qe.EdgeShard.load(path)
        except Exception as exc:
            if "WouldBlock" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.2)
