"""`paperindex stats`, `delete` and `migrate`."""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import asdict
from pathlib import Path

from ..errors import CliError
from .common import print_json, settings_of


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cmd_stats(args: argparse.Namespace) -> int:
    from ..store import open_store

    s = settings_of(args)
    store = open_store(s)
    try:
        layout = store.layout()
        out = {
            "store": s.qdrant_url or str(Path(s.qdrant_path).resolve()),
            "papers": store.count(store.papers),
            "chunks": store.count(store.chunks),
            "layout": asdict(layout) if layout else None,
        }
        if not s.qdrant_url and Path(s.qdrant_path).exists():
            # allocated blocks, not apparent sizes: Qdrant preallocates sparse files
            out["disk_bytes"] = sum(f.stat().st_blocks * 512 for f in Path(s.qdrant_path).rglob("*") if f.is_file())
    finally:
        store.close()
    if args.json:
        print_json(out)
        return 0
    kind = "Qdrant server" if s.qdrant_url else "embedded Qdrant Edge"
    print(f"index   {out['store']} ({kind})")
    print(f"papers  {out['papers']:,}")
    print(f"chunks  {out['chunks']:,}")
    if layout:
        passages = "multivectors (a vector per window, MaxSim)" if layout.multivector else "one vector per chunk"
        print(
            f"vectors paper heads {layout.paper_dim}-d (Euclidean); "
            f"passages {layout.chunk_dim}-d {passages}, dot product"
        )
    else:
        print("vectors none yet: index some papers first")
    if "disk_bytes" in out:
        print(f"disk    {_size(out['disk_bytes'])}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from ..pipeline import delete_papers
    from ..store import open_store

    store = open_store(settings_of(args))
    try:
        existing = delete_papers(store, args.paper_ids)
    finally:
        store.close()
    missing = [p for p in args.paper_ids if p not in existing]
    print(f"deleted {len(existing)} paper(s) with their chunks")
    if missing:
        print(f"not in the index: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..migrate import migrate
    from ..store import ClientStore, EdgeStore, store_options

    s = settings_of(args)
    if s.qdrant_url:
        raise CliError(
            "migrate copies the embedded index (PAPERINDEX_QDRANT_PATH); unset PAPERINDEX_QDRANT_URL and pass --to URL"
        )
    options = store_options(s)
    source = EdgeStore(s.qdrant_path, s.papers_collection, s.chunks_collection)
    target = ClientStore(
        args.to,
        args.api_key or s.qdrant_api_key,
        s.qdrant_prefer_grpc,
        s.qdrant_timeout,
        s.papers_collection,
        s.chunks_collection,
        options,
    )
    # str hash() changes between processes; the checkpoint name must not, or a rerun starts over
    checkpoint = Path(s.qdrant_path) / f".migrate-{hashlib.sha256(args.to.encode()).hexdigest()[:12]}.json"
    bar = tqdm(total=source.count(source.papers) + source.count(source.chunks), unit="pt", disable=args.quiet)
    try:
        copied = migrate(source, target, checkpoint, args.batch, on_batch=lambda _c, n: bar.update(n))
        target.finish_bulk()
    finally:
        bar.close()
        source.close()
        target.close()
    print(
        f"copied {copied.get(s.chunks_collection, 0)} chunks and {copied.get(s.papers_collection, 0)} papers "
        f"to {args.to}"
    )
    return 0
