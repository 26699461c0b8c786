"""Capacity planning: disk and memory of the `chunks` collection per million chunks, by vector layout.

Builds the embedded store (Qdrant Edge) at two sizes with synthetic chunks (random unit vectors, a
realistic payload of ~512 words), bulk-loads them, builds HNSW (and quantized copies), then opens each
index in a fresh process and runs queries. Per-million figures are the slope between the two sizes,
so fixed overheads drop out.

    python bench/capacity.py     # single-vector layouts at 10k and 20k chunks, multivector at 4k and 8k
    python bench/capacity.py --sizes 20000 50000 --layouts single int8

Layouts: single (one 768-d vector per chunk: long_chunk=mean/truncate), multivector (--windows
vectors of 768-d per chunk: long_chunk=multivector), int8 (single + scalar quantization), int8-disk
(int8 with the float32 originals on disk), multivector-int8-disk.
Qdrant Edge keeps everything in memory-mapped files, so memory is read off the files by component:
RAM is what the layout keeps resident (HNSW graph, payload indexes, id tracker, quantized copies, and
the float32 vectors unless they are on disk); payload text and the write-ahead log stay on disk.
"resident" is measured: the process's mapped pages after the queries (the working set they touched;
its heap does not grow with the index). Load+build seconds are those of the larger size, on whatever
else the machine is doing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from indexer.store import EdgeStore, Layout, Point, StoreOptions, chunk_point_id, paper_point_id  # noqa: E402

LAYOUTS = {
    # name: (multivector, quantization, vectors_on_disk)
    "single": (False, "none", False),
    "multivector": (True, "none", False),
    "int8": (False, "int8", False),
    "int8-disk": (False, "int8", True),
    "multivector-int8-disk": (True, "int8", True),
}
VOCAB = [f"w{i}" for i in range(5000)]


def unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    v = rng.standard_normal(shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def build(path: Path, n: int, layout: str, dim: int, windows: int, words: int, seed: int = 0) -> float:
    multivector, quantization, on_disk = LAYOUTS[layout]
    store = EdgeStore(path, options=StoreOptions(bulk_load=True, quantization=quantization, vectors_on_disk=on_disk))
    store.create(Layout(dim, dim, multivector))
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for start in range(0, n, 512):
        batch = []
        for i in range(start, min(n, start + 512)):
            pid, c = f"paper{i // 20}", i % 20
            text = " ".join(rng.choice(VOCAB, words))
            payload = {
                "paper_id": pid,
                "paper_uuid": paper_point_id(pid),
                "chunk_index": c,
                "year": 1990 + i % 35,
                "text": text,
                "metadata": {
                    "paper_id": pid,
                    "title": f"title of {pid}",
                    "year": 1990 + i % 35,
                    "chunk_index": c,
                    "word_start": c * 462,
                    "word_end": c * 462 + words,
                    "authors": ["A. Author", "B. Author"],
                },
            }
            batch.append(Point(chunk_point_id(pid, c), unit(rng, (windows, dim) if multivector else (dim,)), payload))
        store.upsert(store.chunks, batch)
    store.finish_bulk()
    info = store._shards[store.chunks][0].info()
    if info.indexed_vectors_count < n:
        print(f"  warning: {layout} n={n}: only {info.indexed_vectors_count} vectors indexed", file=sys.stderr)
    store.close()
    return time.perf_counter() - t0


COMPONENTS = ("vectors", "quantized", "graph", "payload_index", "id_tracker", "payload", "wal", "other")


def component(rel: Path) -> str:
    parts = rel.parts
    if parts[0] == "wal":
        return "wal"
    name = parts[2] if len(parts) > 2 else ""
    if name.startswith("vector_storage"):
        return "quantized" if rel.name.startswith("quantized") else "vectors"
    if name.startswith("vector_index"):
        return "graph"
    for prefix in ("payload_index", "payload_storage", "id_tracker"):
        if name.startswith(prefix):
            return prefix.replace("_storage", "")
    return "other"


def disk_bytes(path: Path) -> dict[str, int]:
    """Allocated bytes (not apparent sizes: Qdrant preallocates sparse files) by component."""
    out = dict.fromkeys(COMPONENTS, 0)
    for f in path.rglob("*"):
        if f.is_file():
            out[component(f.relative_to(path))] += f.stat().st_blocks * 512
    return out


def ram_bytes(parts: dict[str, int], on_disk: bool) -> int:
    return sum(parts[k] for k in ("quantized", "graph", "payload_index", "id_tracker", "other")) + (
        0 if on_disk else parts["vectors"]
    )


MEASURE = """
import json, sys, numpy as np
sys.path.insert(0, {root!r})
from indexer.store import EdgeStore
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {{k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile", "VmHWM")}}
before = status()
store = EdgeStore({path!r})
rng = np.random.default_rng(1)
for _ in range({queries}):
    q = rng.standard_normal({dim}).astype(np.float32)
    store.search(store.chunks, q / np.linalg.norm(q), 10)
after = status()
store.close()
print(json.dumps({{k: after[k] - before[k] for k in after}}))
"""


def memory(path: Path, dim: int, queries: int) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE.format(root=str(ROOT), path=str(path), dim=dim, queries=queries)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes", type=int, nargs=2, default=[10000, 20000], help="two chunk counts; per-million figures are the slope"
    )
    ap.add_argument(
        "--mv-sizes",
        type=int,
        nargs=2,
        default=[4000, 8000],
        help="the same for multivector layouts (each chunk holds --windows vectors)",
    )
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--windows", type=int, default=3, help="vectors per chunk in multivector layouts")
    ap.add_argument("--words", type=int, default=512, help="words of text per chunk payload")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    rows = []
    for layout in args.layouts:
        sizes = args.mv_sizes if LAYOUTS[layout][0] else args.sizes
        per_size = []
        for n in sizes:
            with tempfile.TemporaryDirectory(prefix="capacity-") as tmp:
                path = Path(tmp) / "index"
                seconds = build(path, n, layout, args.dim, args.windows, args.words)
                parts = disk_bytes(path / "chunks")
                per_size.append(
                    {
                        "n": n,
                        "build_s": seconds,
                        "disk": sum(parts.values()),
                        "ram": ram_bytes(parts, LAYOUTS[layout][2]),
                        **parts,
                        **memory(path, args.dim, args.queries),
                    }
                )
                shutil.rmtree(path)
        (a, b), scale = per_size, 1e6 / (sizes[1] - sizes[0])
        slope = {k: (b[k] - a[k]) * scale for k in ("disk", "ram", *COMPONENTS, "RssFile")}
        rows.append(
            {
                "layout": layout,
                "vectors_per_chunk": args.windows if LAYOUTS[layout][0] else 1,
                **slope,
                "sizes": per_size,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)  # partial results survive an interrupted run

    if args.json:
        print(json.dumps(rows, indent=2))
        return
    gib = 2**30
    print(
        f"per million chunks ({args.dim}-d, {args.words}-word payloads; slope between two sizes: {args.sizes} chunks, "
        f"multivector {args.mv_sizes})"
    )
    cols = ("vectors", "quantized", "graph", "payload_index", "payload", "wal")
    print(
        f"{'layout':<22}{'vec/chunk':>10}{'disk':>7}{'RAM':>7}{'resident':>9}"
        + "".join(f"{c:>14}" for c in cols)
        + f"{'build s':>9}"
    )
    for r in rows:
        print(
            f"{r['layout']:<22}{r['vectors_per_chunk']:>10}{r['disk'] / gib:>7.1f}{r['ram'] / gib:>7.2f}"
            f"{r['RssFile'] / gib:>9.2f}"
            + "".join(f"{r[c] / gib:>14.2f}" for c in cols)
            + f"{r['sizes'][-1]['build_s']:>9.0f}"
        )
    print("GiB per million chunks; build s: load and build at the larger size")


if __name__ == "__main__":
    main()
