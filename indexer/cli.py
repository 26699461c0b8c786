"""`paperindex`: index | search | similar | stats | delete | migrate | serve | eval | coverage."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from pydantic import ValidationError

from .errors import CliError, Interrupted
from .hub import check_models, model_refs

log = logging.getLogger("paperindex")

EXAMPLE = Path(__file__).parent / "data" / "example_papers.jsonl"


def _settings(args: argparse.Namespace):
    from .config import Settings

    overrides = {
        k: v
        for k, v in {
            "qdrant_path": args.qdrant_path,
            "qdrant_url": args.qdrant_url,
            "device": args.device,
        }.items()
        if v is not None
    }
    for name in ("long_chunk", "max_chunks_per_paper", "bulk_load"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise CliError(f"bad settings: {exc}") from exc


def _filter(args: argparse.Namespace):
    from .store import SearchFilter

    return SearchFilter(args.year_from, args.year_to, list(args.filter_paper_ids or []))


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

    from .papers import BadRecord, input_files, read_papers
    from .runtime import build, frozen_heap

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
    s = _settings(args)
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
        from .distributed import index_cluster
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise CliError('--ray needs Ray: pip install "paperindex[ray]"') from exc
    return index_cluster(s, files, address, force, shard, progress)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


# What a score means, by the kind of search and its mode (what Qdrant returns for each collection's metric:
# the passages' dot product, the paper heads' Euclidean distance, BM25, or a fused rank score).
PASSAGE_SCORES = {
    "dense": "dot product of the passage vectors (MaxSim over windows), higher is better",
    "lexical": "BM25, higher is better",
    "hybrid": "dense and BM25 lists fused by rank, higher is better",
}
PAPER_SCORES = {
    "dense": "Euclidean distance between SPECTER2 vectors, lower is closer",
    "lexical": "BM25 of title and abstract, higher is better",
    "hybrid": "dense and BM25 lists fused by rank, higher is better",
}


def _open_index(s):
    """The store, once it is known to hold papers: an empty index answers before any model is loaded."""
    from .store import open_store

    store = open_store(s)
    try:
        if store.layout() is None or store.count(store.papers) == 0:
            where = s.qdrant_url or Path(s.qdrant_path).resolve()
            raise CliError(f"the index at {where} holds no papers yet: index some papers first (paperindex index)")
    except BaseException:
        store.close()
        raise
    return store


def _passage_json(p) -> dict:
    return asdict(p)


def _group_json(g) -> dict:
    paper = g.paper or {}
    return {
        "paper_id": g.paper_id,
        "title": g.title,
        "score": g.score,
        "year": paper.get("year"),
        "abstract": paper.get("abstract"),
        "metadata": paper.get("metadata") or {},
        "passages": [_passage_json(p) for p in g.passages],
    }


def _papers_out(res, header: str) -> None:
    print(header)
    for i, r in enumerate(res, 1):
        print(f"{i:>2}. [{r.score:.3f}] {r.paper_id}  {r.title} ({r.year or 'n.d.'})")


def cmd_search(args: argparse.Namespace) -> int:
    """Passage, grouped or paper search; `--json` prints what GET /search (or /search/papers) answers."""
    s = _settings(args)
    store = _open_index(s)
    try:
        from .runtime import query_searcher  # torch and the models' code: only once the index holds papers

        check_models(model_refs(s, paper=args.papers, passage=not args.papers, reranker=args.rerank))
        searcher = query_searcher(s, store, passages=not args.papers, papers=args.papers, reranker=args.rerank)
        flt = _filter(args)
        mode = args.mode or s.search_mode
        if args.papers:
            res = searcher.papers(args.query, args.k, flt, mode=mode)
            if args.json:
                _print_json({"query": args.query, "mode": mode, "hits": [asdict(r) for r in res]})
            elif res:
                _papers_out(res, f"papers; score: {PAPER_SCORES[mode]} ({mode})")
            return _no_results(args, res)
        reranked = "; reranked: by the cross-encoder's score, higher is better" if args.rerank else ""
        if args.group:
            groups = searcher.grouped(
                args.query, args.k, args.group_size, flt, rerank=args.rerank, candidates=args.candidates, mode=mode
            )
            if args.json:
                _print_json(
                    {
                        "query": args.query,
                        "mode": mode,
                        "reranked": args.rerank,
                        "groups": [_group_json(g) for g in groups],
                    }
                )
            elif groups:
                print(f"papers by their best passages; score: {PASSAGE_SCORES[mode]} ({mode}){reranked}")
                for i, g in enumerate(groups, 1):
                    print(f"{i:>2}. [{g.score:.3f}] {g.paper_id}  {g.title}")
                    for p in g.passages:
                        print(f"      {_where(p)} [{p.score:.3f}] {p.snippet(160)}")
            return _no_results(args, groups)
        hits = searcher.passages(args.query, args.k, flt, rerank=args.rerank, candidates=args.candidates, mode=mode)
        if args.json:
            _print_json(
                {"query": args.query, "mode": mode, "reranked": args.rerank, "hits": [_passage_json(h) for h in hits]}
            )
        elif hits:
            print(f"passages; score: {PASSAGE_SCORES[mode]} ({mode}){reranked}")
            for i, h in enumerate(hits, 1):
                rr = f" rerank {h.rerank_score:.3f}" if h.rerank_score is not None else ""
                print(f"{i:>2}. [{h.score:.3f}{rr}] {h.paper_id} {_where(h)}  {h.title}\n      {h.snippet(200)}")
        return _no_results(args, hits)
    finally:
        store.close()


def _where(p) -> str:
    """A passage's place in its paper: its chunk, or the title and abstract (the head's passage)."""
    from .chunking import HEAD_CHUNK

    return "#abstract" if p.chunk_index == HEAD_CHUNK else f"#{p.chunk_index}"


def _no_results(args: argparse.Namespace, found: list) -> int:
    if not found and not args.json:
        print("no results")
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    """Papers nearest to an indexed one, from its stored vector (no model is loaded); `--json` prints what
    GET /papers/{id}/similar answers."""
    from .search import Searcher

    store = _open_index(_settings(args))
    try:
        res = Searcher(store, None, None).similar(args.paper_id, args.k, _filter(args))
    finally:
        store.close()
    if args.json:
        _print_json({"paper_id": args.paper_id, "hits": [asdict(r) for r in res]})
    elif res:
        _papers_out(res, f"papers nearest to {args.paper_id}; score: {PAPER_SCORES['dense']}")
    return _no_results(args, res)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cmd_stats(args: argparse.Namespace) -> int:
    from .store import open_store

    s = _settings(args)
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
        _print_json(out)
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
    from .pipeline import delete_papers
    from .store import open_store

    store = open_store(_settings(args))
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

    from .migrate import migrate
    from .store import ClientStore, EdgeStore, store_options

    s = _settings(args)
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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    s = _settings(args)
    check_models(model_refs(s, paper=True, passage=True, reranker=True))
    from app.main import create_app

    # uvicorn closes idle connections after 5 s by default, as long as httpx keeps them for reuse: a
    # request sent just as the server closes is reset. The server must hold them longer than clients.
    uvicorn.run(
        create_app(s),
        host=args.host or s.host,
        port=args.port or s.port,
        log_level="info",
        timeout_keep_alive=s.keep_alive_s,
    )
    return 0


def _quality_settings(args: argparse.Namespace):
    """Settings for eval / coverage: the environment's, with the command line's model-side overrides."""
    from .config import Settings

    names = (
        "device",
        "long_chunk",
        "window_tokens",
        "window_overlap",
        "chunk_words",
        "chunk_overlap",
        "search_prefetch",
        "search_fusion",
    )
    try:
        return Settings(**{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})
    except ValidationError as exc:
        raise CliError(f"bad settings: {exc}") from exc


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .quality.eval import BeirData, evaluate, format_report, load_beir, open_setup, reference_run

    data = load_beir(args.dataset, args.split)
    if args.max_queries:
        keep = list(data.queries)[: args.max_queries]
        data = BeirData(data.name, data.corpus, {q: data.queries[q] for q in keep}, {q: data.qrels[q] for q in keep})
    s = _quality_settings(args)
    check_models(model_refs(s, passage=True, reranker=args.rerank))
    setup = open_setup(s, args.index_dir, rerank=args.rerank)
    if args.rerank and setup.searcher.reranker is None:
        setup.cleanup()
        raise CliError("--rerank needs a reranker model (PAPERINDEX_RERANKER_MODEL)")
    docs = tqdm(total=len(data.corpus), unit="doc", disable=args.quiet, dynamic_ncols=True)
    modes = ["hybrid", "dense", "lexical"] if args.mode == "all" else [args.mode]
    queries = tqdm(
        total=len(data.queries) * (len(modes) + args.rerank), unit="query", disable=args.quiet, dynamic_ncols=True
    )
    try:
        report = evaluate(
            setup,
            data,
            modes=modes,
            rerank=args.rerank,
            candidates=args.candidates,
            with_title=not args.no_title,
            on_batch=lambda st: docs.update(st.papers_indexed + st.papers_unchanged - docs.n),
            on_query=lambda _n: queries.update(1),
        )
    finally:
        docs.close()
        queries.close()
        setup.cleanup()
    if args.reference:
        report["reference"] = reference_run(
            s.passage_model,
            data,
            with_title=not args.no_title,
            device=report["device"],
            max_seq_length=args.reference_max_seq_length,
        )
    out = Path(args.out or f"eval-{data.name}-{s.long_chunk}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        _print_json(report)
    else:
        print(format_report(report) + f"\nreport: {out}")
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    from .papers import PaperIn, input_files, read_papers
    from .quality.coverage import markdown_table, parse_strategy, run_strategy, sample_probes

    s = _quality_settings(args)
    check_models(model_refs(s, passage=True))
    strategies = [parse_strategy(x, s.window_overlap) for x in args.strategies.split(",")]
    edges = [int(x) for x in args.buckets.split(",")]
    if edges != sorted(edges) or len(edges) < 2:
        raise CliError(f"--buckets takes increasing word offsets, e.g. 0,300,400,512; got {args.buckets!r}")
    papers = [p for p in read_papers(input_files(args.paths)) if isinstance(p, PaperIn)]
    probes = sample_probes(papers, s.chunk_words, s.chunk_overlap, edges, args.per_bucket, args.seed)
    if not probes:
        raise CliError("no sentence to sample: the papers need text with sentences inside their chunks")
    log.info(
        "%d papers, %d probe sentences; strategies: %s",
        len(papers),
        len(probes),
        ", ".join(x.label for x in strategies),
    )
    results = []
    for st in strategies:
        r = run_strategy(s, st, papers, probes, edges)
        log.info(
            "%s: R@1 %s, R@10 all %.3f", st.label, {b: v["r@1"] for b, v in r.recall.items()}, r.recall["all"]["r@10"]
        )
        results.append(r)
    table = markdown_table(results, edges)
    report = {
        "papers": len(papers),
        "probes": len(probes),
        "buckets": edges,
        "passage_model": s.passage_model,
        "chunk_words": s.chunk_words,
        "chunk_overlap": s.chunk_overlap,
        "seed": args.seed,
        "results": [r.as_dict() for r in results],
        "table": table,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        _print_json(report)
    else:
        print(table + f"\nreport: {args.out}")
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, where it has one of its own (an option left unset takes
    its setting's, which the help names)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"takes a number of at least 1, got {n}")
    return n


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("paperindex")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paperindex",
        formatter_class=_Help,
        description="Two-level RAG index for scientific papers (settings: PAPERINDEX_* env vars)",
    )
    p.add_argument("--version", action="version", version=f"paperindex {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--qdrant-path", help="embedded index folder (PAPERINDEX_QDRANT_PATH; default paperindex_data)")
    common.add_argument(
        "--qdrant-url", help="Qdrant server URL (PAPERINDEX_QDRANT_URL; default: none, the embedded index)"
    )
    common.add_argument("--device", help="auto, cpu, cuda, cuda:N (PAPERINDEX_DEVICE; default auto)")
    common.add_argument("--json", action="store_true", help="machine-readable output (searches: the HTTP API's JSON)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, parents: list[argparse.ArgumentParser], help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=parents, help=help, description=help, formatter_class=_Help)

    ix = command("index", [common], "index JSONL/JSON files or folders (default: the bundled example corpus)")
    ix.add_argument(
        "paths", nargs="*", help="JSONL or JSON files, or folders of them (default: the bundled example corpus)"
    )
    ix.add_argument("--strict", action="store_true", help="refuse the whole input if any record is bad")
    ix.add_argument("--force", action="store_true", help="re-embed papers even if unchanged")
    ix.add_argument("--shard", help="i/n: index only the papers of shard i of n (split work across GPUs or hosts)")
    ix.add_argument(
        "--long-chunk",
        choices=["multivector", "mean", "truncate"],
        help="how windows of a long chunk are combined (PAPERINDEX_LONG_CHUNK; default multivector)",
    )
    ix.add_argument(
        "--max-chunks-per-paper",
        type=_positive,
        dest="max_chunks_per_paper",
        help="cut longer papers to this many chunks (PAPERINDEX_MAX_CHUNKS_PER_PAPER; default: no cap)",
    )
    ix.add_argument(
        "--bulk-load",
        action="store_true",
        default=None,
        dest="bulk_load",
        help="defer HNSW building to the end (PAPERINDEX_BULK_LOAD)",
    )
    ix.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run on a Ray cluster: ADDRESS, `auto` (the one this host is in), none: a new one here "
        "(PAPERINDEX_RAY_ADDRESS)",
    )
    ix.set_defaults(func=cmd_index)

    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("-k", type=_positive, default=10, help="results to show (papers with --group or --papers)")
    filters.add_argument("--year-from", type=int, help="only papers of this year or later")
    filters.add_argument("--year-to", type=int, help="only papers of this year or earlier")
    filters.add_argument(
        "--paper-id", action="append", dest="filter_paper_ids", help="restrict to this paper (repeatable)"
    )

    se = command("search", [common, filters], "search passages (or papers with --papers)")
    se.add_argument("query", help="what to look for, in words")
    se.add_argument("--papers", action="store_true", help="paper search with SPECTER2's ad-hoc query adapter")
    se.add_argument("--group", action="store_true", help="group passages by paper")
    se.add_argument("--group-size", type=_positive, default=3, help="passages shown per paper with --group")
    se.add_argument("--rerank", action="store_true", help="rescore with the cross-encoder")
    se.add_argument(
        "--candidates", type=_positive, default=50, help="passages the cross-encoder rescores with --rerank"
    )
    se.add_argument(
        "--mode",
        choices=["hybrid", "dense", "lexical"],
        help="dense (the models' vectors), lexical (BM25) or hybrid (both, fused) "
        "(PAPERINDEX_SEARCH_MODE; default hybrid)",
    )
    se.set_defaults(func=cmd_search)

    si = command("similar", [common, filters], "papers nearest to an indexed paper (SPECTER2)")
    si.add_argument("paper_id", help="an indexed paper's id")
    si.set_defaults(func=cmd_similar)

    st = command("stats", [common], "what the index holds")
    st.set_defaults(func=cmd_stats)

    de = command("delete", [common], "remove papers and all their chunks")
    de.add_argument("paper_ids", nargs="+", help="ids of the papers to remove")
    de.set_defaults(func=cmd_delete)

    mi = command("migrate", [common], "copy the embedded index into a Qdrant server or cluster")
    mi.add_argument("--to", required=True, help="target Qdrant URL")
    mi.add_argument("--api-key", help="the target's API key (PAPERINDEX_QDRANT_API_KEY; default: none)")
    mi.add_argument("--batch", type=_positive, default=256, help="points copied per request")
    mi.set_defaults(func=cmd_migrate)

    sv = command("serve", [common], "run the HTTP service (uvicorn)")
    sv.add_argument(
        "--host", help="address to bind (PAPERINDEX_HOST; default 127.0.0.1, this host only: 0.0.0.0 for all)"
    )
    sv.add_argument("--port", type=int, help="port (PAPERINDEX_PORT; default 8000)")
    sv.set_defaults(func=cmd_serve)

    quality = argparse.ArgumentParser(add_help=False)
    quality.add_argument("--device", help="auto, cpu, cuda, cuda:N (PAPERINDEX_DEVICE; default auto)")
    quality.add_argument(
        "--window-tokens",
        type=_positive,
        dest="window_tokens",
        help="tokens per window (PAPERINDEX_WINDOW_TOKENS; default 254)",
    )
    quality.add_argument(
        "--window-overlap",
        type=int,
        dest="window_overlap",
        help="tokens consecutive windows share at least (PAPERINDEX_WINDOW_OVERLAP; default 16)",
    )
    quality.add_argument(
        "--chunk-words",
        type=_positive,
        dest="chunk_words",
        help="words per chunk (PAPERINDEX_CHUNK_WORDS; default 512)",
    )
    quality.add_argument(
        "--chunk-overlap",
        type=int,
        dest="chunk_overlap",
        help="words consecutive chunks share (PAPERINDEX_CHUNK_OVERLAP; default 50)",
    )
    quality.add_argument("--json", action="store_true", help="print the report as JSON")
    quality.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")

    ev = command(
        "eval", [quality], "retrieval quality on a BEIR-format dataset (nDCG@10, Recall@10/100, MRR@10, latency)"
    )
    ev.add_argument("dataset", help="folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    ev.add_argument("--split", default="test", help="the qrels file to score against")
    ev.add_argument(
        "--long-chunk",
        choices=["multivector", "mean", "truncate"],
        help="how windows of a long chunk are combined (PAPERINDEX_LONG_CHUNK; default multivector)",
    )
    ev.add_argument(
        "--mode", choices=["hybrid", "dense", "lexical", "all"], default="all", help="search modes to report"
    )
    ev.add_argument(
        "--prefetch",
        type=_positive,
        dest="search_prefetch",
        help="chunks found by the pooled vector for MaxSim (PAPERINDEX_SEARCH_PREFETCH; default 200)",
    )
    ev.add_argument(
        "--fusion",
        choices=["rrf", "dbsf"],
        dest="search_fusion",
        help="how hybrid fuses the lists (PAPERINDEX_SEARCH_FUSION; default rrf)",
    )
    ev.add_argument("--rerank", action="store_true", help="also report metrics after cross-encoder reranking")
    ev.add_argument("--candidates", type=_positive, default=100, help="passages the cross-encoder rescores per query")
    ev.add_argument("--no-title", action="store_true", help="embed the text alone (BEIR and MTEB embed title + text)")
    ev.add_argument("--max-queries", type=_positive, help="score only the first this many queries (default: all)")
    ev.add_argument("--index-dir", help="keep the index here (reused when rerun); default: a temporary folder")
    ev.add_argument(
        "--reference",
        action="store_true",
        help="also run plain sentence-transformers (exact dot-product search) on the same data",
    )
    ev.add_argument(
        "--reference-max-seq-length", type=_positive, help="the reference's truncation length (default: the model's)"
    )
    ev.add_argument("--out", help="JSON report path (default: eval-<dataset>-<long_chunk>.json)")
    ev.set_defaults(func=cmd_eval)

    co = command("coverage", [quality], "known-item coverage: find chunks by sentences from anywhere inside them")
    co.add_argument("paths", nargs="+", help="papers (JSONL/JSON files or folders) with long texts")
    co.add_argument(
        "--strategies",
        default="truncate,mean:256,multivector:256",
        help="comma-separated: truncate, mean:N, multivector:N[:overlap]",
    )
    co.add_argument(
        "--buckets", default="0,300,400,512", help="word offsets inside a chunk that bound the position buckets"
    )
    co.add_argument("--per-bucket", type=_positive, default=100, help="probe sentences per bucket")
    co.add_argument("--seed", type=int, default=0, help="of the probe sentences' sampling")
    co.add_argument("--out", default="coverage.json", help="JSON report path")
    co.set_defaults(func=cmd_coverage)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("indexer", "app", "paperindex"):
        logging.getLogger(name).setLevel(logging.WARNING if args.quiet else logging.INFO)
    logging.getLogger("adapters").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # read by transformers when a command imports it: commands that load no model never do
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .errors import PaperIndexError

    t0 = time.perf_counter()
    try:
        return args.func(args)
    except (PaperIndexError, FileNotFoundError, ValueError) as exc:
        print(f"paperindex {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        what = str(exc) if isinstance(exc, Interrupted) else f"interrupted after {time.perf_counter() - t0:.0f}s"
        print(f"paperindex {args.command}: {what}", file=sys.stderr)
        _exit_now_if_encoding(130)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or flushing at exit fails again
        return 141  # 128 + SIGPIPE, what a shell reports for a command stopped by it


def _exit_now_if_encoding(code: int) -> None:
    """After Ctrl-C the index run does not wait for encoder threads still in a forward pass (a CPU may
    take minutes over one batch); what they would give is dropped, and everything else is written and
    closed by now. The interpreter's own exit would wait on them, or abort in the C++ runtime while
    they run (`terminate called without an active exception`): end the process here instead."""
    if any(t.is_alive() and t.name.startswith("encode") for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
