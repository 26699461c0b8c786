"""`paperindex index --ray` against the single-process pipeline, on the same corpus in one run.

    python bench/ray_throughput.py                   # one GPU: the chunks/s of --ray over the native pipeline
    python bench/ray_throughput.py --gpus 2          # --ray on 1 and on 2 GPUs (scaling), native on one
    python bench/ray_throughput.py --tiny --papers 24 --device cpu   # a smoke run of this script

Models are random-weight MPNet-base and BERT-base + adapters of the real shapes (bench/models.py), the
corpus real prose (bench/corpus.py); both pipelines write into a fresh embedded store (Qdrant Edge) and
start cold (models loaded, CUDA graphs captured during the run), as `paperindex index` does.

Rows: `wall` chunks/s counts the whole call (for Ray: the encode actors' start, model loads and graph
captures included); `steady` chunks/s counts from the first group written to the last (the chunks of
every later group over that time), what a long run converges to. The ratio row divides --ray's rates by
the native pipeline's (target: steady >= 0.9 on one GPU). Results: $OUT/ray_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from indexer.config import Settings  # noqa: E402
from indexer.pipeline import IndexStats  # noqa: E402

OUT = Path(os.environ.get("OUT", tempfile.gettempdir()))
RESULTS: dict = {"rows": []}


def say(*a) -> None:
    print(*a, flush=True)


def row(name: str, **kv) -> None:
    RESULTS["rows"].append({"run": name, **kv})
    say("ROW", name, json.dumps(kv, default=str))
    (OUT / "ray_throughput.json").write_text(json.dumps(RESULTS, indent=1, default=str))


class Clock:
    """Progress callbacks -> the run's rates: over the whole call, and from the first group written on."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first: tuple[float, int] | None = None
        self.last = IndexStats()

    def __call__(self, st: IndexStats) -> None:
        if self.first is None:
            self.first = (time.perf_counter(), st.chunks)
        self.last = st

    def rates(self, stats: IndexStats) -> dict:
        wall = time.perf_counter() - self.t0
        t1, c1 = self.first or (self.t0, 0)
        steady = (stats.chunks - c1) / max(time.perf_counter() - t1, 1e-9)
        return {
            "papers": stats.papers_indexed,
            "chunks": stats.chunks,
            "seconds": round(wall, 1),
            "wall_chunks_per_s": round(stats.chunks / wall),
            "steady_chunks_per_s": round(steady),
            "first_group_s": round(t1 - self.t0, 1),
        }


def native(s: Settings, corpus: Path) -> dict:
    from indexer.papers import read_papers
    from indexer.runtime import build, frozen_heap

    clock = Clock()
    rt = build(s, reranker=False)
    try:
        with frozen_heap(), rt.store.parallel_writes():
            stats = rt.indexer.index(read_papers([corpus]), on_batch=clock)
        out = clock.rates(stats)
    finally:
        rt.close()
    return out


def on_ray(s: Settings, corpus: Path) -> dict:
    from indexer.distributed import index_on_ray

    clock = Clock()
    return clock.rates(index_on_ray(s, [corpus], on_batch=clock))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--papers", type=int, default=1500)
    ap.add_argument("--words", type=int, default=8000, help="body words per paper")
    ap.add_argument(
        "--gpus", type=int, default=1, help="GPUs of the Ray cluster (runs on 1 and, if more, on this many)"
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a smoke run of this script on CPU)")
    ap.add_argument("--order", choices=["ray-first", "native-first"], default="ray-first")
    args = ap.parse_args()
    try:
        import ray
    except ModuleNotFoundError:
        sys.exit('this benchmark needs Ray: pip install "paperindex[ray]"')
    import corpus as corpus_mod
    import models as bench_models
    import torch

    RESULTS["env"] = dict(
        torch=torch.__version__,
        ray=ray.__version__,
        cpus=os.cpu_count(),
        args=vars(args),
        gpu=torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
    )
    say(RESULTS["env"])
    work = Path(tempfile.mkdtemp(prefix="pi-ray-bench-"))
    t = time.perf_counter()
    path = corpus_mod.write(work / "corpus.jsonl", args.papers, args.words)
    sample = [json.loads(line)["text"] for _, line in zip(range(200), path.open())]
    st_dir = bench_models.build_passage(work / "mpnet", sample, tiny=args.tiny)
    base, prox, adhoc = bench_models.build_paper(work / "specter2", sample, tiny=args.tiny)
    say(f"corpus and models at {time.perf_counter() - t:.0f} s")

    models = dict(passage_model=str(st_dir), paper_model=str(base), paper_adapter=str(prox), query_adapter=str(adhoc))

    def settings(name: str, gpus: int) -> Settings:
        shutil.rmtree(work / name, ignore_errors=True)
        return Settings(**models, device=args.device, gpus=gpus, qdrant_path=work / name, reranker_model=None)

    gpu_counts = [1] if args.gpus <= 1 else [1, args.gpus]
    ray_rows: dict[int, dict] = {}

    def ray_runs() -> None:
        for n in gpu_counts:
            ray.init(num_gpus=n if args.device == "cuda" else 0, include_dashboard=False, log_to_driver=False)
            try:
                ray_rows[n] = on_ray(settings(f"ray{n}", n), path)
            finally:
                ray.shutdown()
            row(f"--ray, {n} GPU" if args.device == "cuda" else "--ray, CPU", **ray_rows[n])

    def native_run() -> dict:
        r = native(settings("native", 1), path)
        row("native, 1 GPU" if args.device == "cuda" else "native, CPU", **r)
        return r

    if args.order == "ray-first":
        ray_runs()
        base_row = native_run()
    else:
        base_row = native_run()
        ray_runs()
    one = ray_rows[1]
    row(
        "ratio --ray / native (1 GPU)",
        wall=round(one["wall_chunks_per_s"] / base_row["wall_chunks_per_s"], 3),
        steady=round(one["steady_chunks_per_s"] / base_row["steady_chunks_per_s"], 3),
    )
    if args.gpus > 1:
        many = ray_rows[args.gpus]
        row(
            f"scaling --ray {args.gpus} GPUs / 1 GPU",
            wall=round(many["wall_chunks_per_s"] / one["wall_chunks_per_s"], 3),
            steady=round(many["steady_chunks_per_s"] / one["steady_chunks_per_s"], 3),
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
