"""`paperindex index`: read, encode, write and build the index, each phase shown as it runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import CliError, Interrupted
from ..hub import check_models, model_refs
from .common import settings_of

EXAMPLE = Path(__file__).parent.parent / "data" / "example_papers.jsonl"


def _gpu_memory() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}GiB"


def _count_records(files: list[Path], quiet: bool) -> int | None:
    """Records in the input (None for a JSON array: read whole only once indexing reads it), with a bar
    over the bytes read where that takes a while."""
    from tqdm import tqdm

    n = 0
    with tqdm(
        total=sum(f.stat().st_size for f in files),
        unit="B",
        unit_scale=True,
        desc="reading",
        leave=False,
        disable=quiet or None,
        delay=1.0,
    ) as bar:
        for f in files:
            with f.open("rb") as fh:
                if fh.read(64).lstrip()[:1] == b"[":
                    return None
                fh.seek(0)
                for line in fh:
                    n += bool(line.strip())
                    bar.update(len(line))
    return n


@contextlib.contextmanager
def _ticking(bar) -> Iterator[None]:
    """The bar redrawn every half second while the block runs: its time and rate move even while no
    step ends (a slow CPU may take many seconds over one paper; building the index has few steps)."""
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True, name="progress")
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


@contextlib.contextmanager
def _spinner(desc: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A bar for a phase without steps of its own to count (building the index), ticking with the time
    spent; the callable it yields sets (done, total) where the phase reports them."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, total=None, unit="shard", disable=quiet or None, delay=1.0)

    def progress(n: int, total: int) -> None:
        bar.total = total
        bar.update(n - bar.n)

    try:
        with _ticking(bar):
            yield progress
    finally:
        bar.close()


def cmd_index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..papers import BadRecord, input_files, read_papers
    from ..runtime import build, frozen_heap

    shard = None
    if args.shard:
        i, _, n = args.shard.partition("/")
        if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
            raise CliError(f"--shard takes i/n with 0 <= i < n, got {args.shard!r}")
        shard = (int(i), int(n))
    if args.ray and Path(args.ray).exists():  # `--ray corpus.jsonl`: argparse took the path for the address
        args.paths, args.ray = [args.ray, *args.paths], "local"
    paths = args.paths or [str(EXAMPLE)]
    try:
        files = input_files(paths)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from exc
    if args.strict:
        bad = [r for r in read_papers(files, shard) if isinstance(r, BadRecord)]
        if bad:
            for r in bad:
                print(f"bad record {r}", file=sys.stderr)
            raise CliError(f"{len(bad)} bad record(s); nothing indexed (--strict)")
    s = settings_of(args)
    address = args.ray or s.ray_address
    t0 = time.perf_counter()
    total = _count_records(files, args.quiet)
    if not address:
        check_models(model_refs(s, paper=True, passage=True))
    rt = None if address else build(s, reranker=False)
    bar = tqdm(total=total, unit="paper", desc="indexing", disable=args.quiet, dynamic_ncols=True)
    last: list = []  # the stats as last reported: what an interrupted run kept

    def progress(st) -> None:
        last[:] = [st]
        bar.update(st.papers_indexed + st.papers_unchanged + len(st.bad) - bar.n)
        secs = max(st.seconds, 1e-9)
        post = {
            "chunks/s": f"{st.chunks / secs:,.0f}",
            "tok/s": f"{st.tokens / secs:,.0f}",
            "skipped": st.papers_unchanged,
            "bad": len(st.bad),
        }
        if mem := _gpu_memory():
            post["gpu"] = mem
        bar.set_postfix(post, refresh=False)

    try:
        if rt is None:
            stats = _index_on_ray(s, files, address, args.force, shard, progress)
        else:
            # The embedded store writes its chunk shards from processes of their own meanwhile (on a new
            # index they create them, while the run starts).
            with frozen_heap(), rt.store.parallel_writes(), _ticking(bar):
                stats = rt.indexer.index(read_papers(files, shard), force=args.force, on_batch=progress)
            bar.close()
            with _spinner("building the index", args.quiet) as built:
                rt.store.finish_bulk(built)
    except KeyboardInterrupt as exc:
        st = last[0] if last else None
        kept = f"{st.papers_indexed} paper(s) indexed and kept" if st else "nothing indexed"
        there = f", {st.papers_unchanged} already there" if st and st.papers_unchanged else ""
        raise Interrupted(f"interrupted after {time.perf_counter() - t0:.0f}s: {kept}{there}; rerun to resume") from exc
    finally:
        bar.close()
        if rt is not None:
            rt.close()
    searchable = time.perf_counter() - t0
    for r in stats.bad:
        print(f"bad record {r}", file=sys.stderr)
    secs = max(stats.seconds, 1e-9)
    summary = stats.as_dict() | {
        "papers_per_s": round(stats.papers_indexed / secs, 2),
        "tokens_per_s": round(stats.tokens / secs),
        "searchable_s": round(searchable, 2),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"indexed {stats.papers_indexed} papers ({stats.chunks} chunks, {stats.windows} windows, "
            f"{stats.tokens:,} passage tokens "
            f"+ {stats.head_tokens:,} head tokens) in {stats.seconds:.1f}s, searchable after {searchable:.1f}s; "
            f"{stats.papers_unchanged} already indexed, "
            f"{len(stats.bad)} bad record(s) skipped"
            + (
                f"; {stats.papers_capped} paper(s) cut to {s.max_chunks_per_paper} chunks (--max-chunks-per-paper)"
                if stats.papers_capped
                else ""
            )
        )
    return 0


def _index_on_ray(s, files: list[Path], address: str, force: bool, shard: tuple[int, int] | None, progress):
    try:
        from ..distributed import index_cluster
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise CliError('--ray needs Ray: pip install "paperindex[ray]"') from exc
    return index_cluster(s, files, address, force, shard, progress)
