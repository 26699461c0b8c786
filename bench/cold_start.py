"""What a fresh process pays before it runs at speed: loading the models, compiling, capturing CUDA graphs.

    python bench/cold_start.py [--papers 500]      # on a CUDA machine
    python bench/cold_start.py --gpus 4 --gate all    # four GPUs, each capture holding back all four
    python bench/cold_start.py --papers 500 --batches sorted   # passage batches as before unpadded ones
    python bench/cold_start.py --papers 500 --heads-plan padded   # paper heads padded, as before packed
    python bench/cold_start.py --tiny --device cpu --papers 20   # a smoke run of this script

Indexes the same papers twice in one process, into no store, with the defaults (two encoder threads
per GPU, tokenizer workers as PAPERINDEX_TOKENIZER_WORKERS's default on a GPU host): the first run is
what a short `paperindex index` run costs, the second what it costs once the graphs are there. Prints
the time spent loading the models (on CUDA that compiles the fused add + LayerNorm) and capturing graphs
(each capture runs the batch twice, then records it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def add_graph_options(ap: argparse.ArgumentParser) -> None:
    """--share-graphs and --capture-warm-ups (bench/index_throughput.py takes them too)."""
    ap.add_argument(
        "--share-graphs",
        choices=["on", "off"],
        default="on",
        help="a GPU's encoder threads share one passage model and its CUDA graphs (on: as now), or each has its own "
        "(off: as before)",
    )
    ap.add_argument(
        "--capture-warm-ups",
        type=int,
        default=None,
        help="runs of a new shape before its capture (the encoders' capture_warm_ups; default kernels.graphs.WARM_UPS)",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--papers", type=int, default=500)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs that index (PAPERINDEX_GPUS; 0: all visible)")
    ap.add_argument(
        "--gate",
        choices=["gpu", "all"],
        default="gpu",
        help="a CUDA graph capture holds back the work of its own GPU (gpu: as now) or of every GPU (all: as before)",
    )
    add_graph_options(ap)
    ap.add_argument(
        "--batches",
        choices=["sorted", "unpadded"],
        default="unpadded",
        help="passage batches as batching.WINDOW_BATCHES cuts them (unpadded: as now), or from one length-sorted run "
        "(sorted: as before)",
    )
    ap.add_argument(
        "--heads-plan",
        choices=["padded", "packed"],
        default="packed",
        help="paper heads packed end to end (packed: as now), or in padded batches (batching.HEAD_BATCHES: as before)",
    )
    args = ap.parse_args()

    import corpus as corpus_mod
    import models as bench_models
    from index_throughput import NullStore
    from shapes import plan_heads, plan_windows

    from indexer.config import Settings
    from indexer.papers import read_papers
    from indexer.pipeline import Indexer
    from indexer.plan import Tuning, make_plan
    from indexer.runtime import capture_warm_ups, gpu_replicas, load_encoders

    work = Path(tempfile.mkdtemp(prefix="pi-cold-"))
    path = corpus_mod.write(work / "corpus.jsonl", args.papers, 8000 if not args.tiny else 1500)
    sample = [json.loads(line)["text"] for _, line in zip(range(200), path.open())]
    st_dir = bench_models.build_passage(work / "mpnet", sample, tiny=args.tiny)
    paper_dirs = bench_models.build_paper(work / "specter2", sample, tiny=args.tiny)

    s = Settings(
        device=args.device,
        gpus=args.gpus,
        passage_model=str(st_dir),
        paper_model=str(paper_dirs[0]),
        paper_adapter=str(paper_dirs[1]),
        query_adapter=str(paper_dirs[2]),
    )
    t = time.perf_counter()
    tuning = Tuning(
        share_graphs=args.share_graphs == "on",
        gate_per_device=args.gate == "gpu",
        capture_warm_ups=args.capture_warm_ups,
    )
    plan = make_plan(s, tuning=tuning)
    warm_ups = capture_warm_ups(plan)
    paper, passage = load_encoders(s, plan=plan)
    idx = Indexer(
        NullStore(),
        paper,
        passage,
        s.chunk_words,
        s.chunk_overlap,
        s.max_chunks_per_paper,
        plan.group_papers,
        replicas=gpu_replicas(plan, paper, passage),
        group_seconds=plan.group_seconds,
        tuning=plan.tuning,
    )
    load_s = time.perf_counter() - t
    plan_windows([p for _, p in idx.workers], args.batches)
    heads = plan_heads(list({id(p): p for p, _ in idx.workers}.values()), args.heads_plan)
    runners = [p.run for _, p in idx.workers] + heads
    graphed = list({id(r._graphed): r._graphed for r in runners if r._graphed is not None}.values())
    out = {
        "papers": args.papers,
        "gpus": idx.gpus,
        "gate": args.gate,
        "share_graphs": args.share_graphs,
        "capture_warm_ups": warm_ups,
        "batches": args.batches,
        "heads_plan": args.heads_plan,
        "models_loaded_s": round(load_s, 2),
        "cpus": os.cpu_count(),
    }
    for run in ("cold", "warm"):
        before = [len(g.capture_seconds) for g in graphed]
        t = time.perf_counter()
        stats = idx.index(read_papers([path]), force=True)
        dt = time.perf_counter() - t
        captures = sorted(c for g, n in zip(graphed, before) for c in g.capture_seconds[n:])
        out[run] = {
            "seconds": round(dt, 2),
            "chunks": stats.chunks,
            "chunks_s": round(stats.chunks / dt),
            "captures": len(captures),
            "capturing_s": round(sum(captures), 2),
            "longest_capture_s": round(captures[-1], 2) if captures else None,
        }
        print(run, json.dumps(out[run]), flush=True)
    passage.close()
    print(json.dumps(out))
    name = (
        f"cold_start_{idx.gpus}_gpus_gate_{args.gate}_share_{args.share_graphs}_warm_ups_"
        f"{warm_ups}_batches_{args.batches}_heads_{args.heads_plan}.json"
    )
    (Path(os.environ.get("OUT", tempfile.gettempdir())) / name).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
