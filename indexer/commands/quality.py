"""`paperindex eval` and `coverage` (indexer/quality)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import ValidationError

from ..errors import CliError
from ..hub import check_models, model_refs
from .common import log, print_json


def _quality_settings(args: argparse.Namespace):
    """Settings for eval / coverage: the environment's, with the command line's model-side overrides."""
    from ..config import Settings

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

    from ..quality.eval import BeirData, evaluate, format_report, load_beir, open_setup, reference_run

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
        print_json(report)
    else:
        print(format_report(report) + f"\nreport: {out}")
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    from ..papers import PaperIn, input_files, read_papers
    from ..quality.coverage import markdown_table, parse_strategy, run_strategy, sample_probes

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
        print_json(report)
    else:
        print(table + f"\nreport: {args.out}")
    return 0
