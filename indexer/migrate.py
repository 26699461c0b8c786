"""Copy one store into another (embedded Qdrant Edge -> server/cluster), batched and resumable.

Chunks go first and papers (the commit markers) last, so a paper is visible as done on the target
only once all its chunks are there. Progress is checkpointed after every batch in a small JSON file;
a rerun continues from there. Point ids are copied as they are, so a repeated batch is harmless.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from .store import Store

log = logging.getLogger(__name__)


def migrate(
    source: Store,
    target: Store,
    checkpoint: Path,
    batch: int = 256,
    on_batch: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    layout = source.layout()
    if layout is None:
        raise FileNotFoundError("the source index is empty: nothing to migrate")
    target.create(layout)
    state = json.loads(checkpoint.read_text()) if checkpoint.exists() else {}
    copied: dict[str, int] = {}
    for collection in (source.chunks, source.papers):
        done = state.get(collection, {})
        if done.get("finished"):
            copied[collection] = done.get("copied", 0)
            continue
        n = done.get("copied", 0)
        for points, offset in source.scroll(collection, batch=batch, offset=done.get("offset")):
            target.upsert(collection, points)
            n += len(points)
            state[collection] = {"offset": offset, "copied": n, "finished": offset is None}
            checkpoint.write_text(json.dumps(state))
            if on_batch:
                on_batch(collection, len(points))
        state[collection] = {"offset": None, "copied": n, "finished": True}
        checkpoint.write_text(json.dumps(state))
        copied[collection] = n
    target.flush()
    return copied
