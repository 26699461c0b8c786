"""`paperindex`: index | search | similar | stats | delete | migrate | eval | coverage.

`serve` is the HTTP service's own command (`app.cli`, the `paperindex` entry point), added through
`extend`: the library never imports the service."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from .commands.index import cmd_index
from .commands.quality import cmd_coverage, cmd_eval
from .commands.search import cmd_search, cmd_similar
from .commands.store import cmd_delete, cmd_migrate, cmd_stats
from .errors import Interrupted


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


# Adds commands of a layer above the library: called with `command(name, parents, help)` and the options
# every command shares.
Extend = Callable[[Callable[[str, list[argparse.ArgumentParser], str], argparse.ArgumentParser],
                   argparse.ArgumentParser], None]


def parser(extend: Extend | None = None) -> argparse.ArgumentParser:
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
    if extend is not None:
        extend(command, common)
    return p


def main(argv: list[str] | None = None, extend: Extend | None = None) -> int:
    args = parser(extend).parse_args(argv)
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
