"""Device plans side by side on one GPU: the plan this GPU gets, and an older GPU's plan forced on it
(a T4's: sm_75, 16 GB: padded batches, SDPA without flash attention, no CUDA graphs, a 16 GB card's
token budget), each indexing the same papers end to end, with the old sentence-transformers way beside.

    python bench/gpu_plans.py                                    # on a CUDA machine: ~2-3 min on an H200
    python bench/gpu_plans.py --tiny --papers 6 --device cpu     # a smoke run of this script

Models are random-weight MPNet-base (passages) and BERT-base + bottleneck adapters (SPECTER2-shaped paper
heads) of the real shapes (bench/models.py: no download); the corpus is real prose (bench/corpus.py).
Rows: chunks/s end to end into Qdrant Edge (after a warm-up run), the ratio to the old way (measured as
bench/index_throughput.py does: SentenceTransformer(...).half().encode(chunks, batch_size=256), truncating
at 512 tokens), peak GPU memory (allocated, and reserved by PyTorch's allocator: what the card must hold),
the plan's token budget and encoder threads, and the least cosine of a sample of chunk vectors to the fp32
reference. Last, what 16 GB cards would get (device_plan: a T4 alone, and beside a 7 GB model set).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from indexer.encode.device import DevicePlan, GiB, PlanOverrides, device_plan, read_device_plan  # noqa: E402

OUT = Path(os.environ.get("OUT", tempfile.gettempdir()))
# A T4 as torch reports it (15.6 GB, 40 multiprocessors), ~0.5 GiB taken by the CUDA context.
T4 = dict(capability=(7, 5), total_memory=15_600_000_000, free_memory=15_050_000_000, sm_count=40)
RESULTS: dict = {"rows": [], "sixteen_gb": []}


def say(*a) -> None:
    print(*a, flush=True)


def row(name: str, **kv) -> None:
    RESULTS["rows"].append({"run": name, **kv})
    say("ROW", name, json.dumps(kv, default=str))
    (OUT / "gpu_plans.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def old_way(st_dir: Path, texts: list[str], device: torch.device) -> float:
    """The old way's chunks/s (bench/index_throughput.py's baseline_chunks): a chunk's first 512 tokens."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(st_dir), device=str(device))
    if device.type == "cuda":
        st.half()
    st.max_seq_length = 512
    st.encode(texts[:512], batch_size=256, show_progress_bar=False)
    sync(device)
    t = time.perf_counter()
    st.encode(texts, batch_size=256, convert_to_numpy=True, show_progress_bar=False)
    sync(device)
    cps = len(texts) / (time.perf_counter() - t)
    row("old way: ST .half().encode(bs=256), truncating at 512", chunks=len(texts), chunks_s=cps)
    del st
    gc.collect()
    torch.cuda.empty_cache()  # what it held is not counted in the plans' peaks
    return cps


def reference(st_dir: Path, texts: list[str]) -> np.ndarray:
    """fp32 vectors of short texts (one window each) from sentence-transformers on the CPU."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(st_dir), device="cpu").encode(texts, batch_size=16, convert_to_numpy=True)


def plan_run(
    name: str,
    plan: DevicePlan,
    device: torch.device,
    dirs: dict,
    corpus: Path,
    args,
    base: float | None,
    probe: tuple[list[str], np.ndarray],
) -> None:
    from indexer.encode import PaperEncoder, PassageEncoder
    from indexer.papers import read_papers
    from indexer.pipeline import Indexer
    from indexer.runtime import encoder_grid
    from indexer.store import EdgeStore

    say(f"{name}: {plan.describe()}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    workers = max(2, min((os.cpu_count() or 2) - 4, 12))
    paper = PaperEncoder(*dirs["paper"], device=str(device), plan=plan)
    passage = PassageEncoder(dirs["passage"], device=str(device), tokenizer_workers=workers, plan=plan)
    per_gpu = plan.encoders_per_gpu if device.type == "cuda" else 1
    replicas = list(encoder_grid([str(device)], per_gpu, paper, passage).values()) if device.type == "cuda" else []
    texts, ref = probe
    cos = float(cosine(np.stack([v[0] for v in passage.encode_chunks(texts)]), ref).min())

    def index(n: int) -> tuple[int, float]:
        store = EdgeStore(tempfile.mkdtemp(prefix="pi-plans-"))
        idx = Indexer(store, paper, passage, chunk_size=512, chunk_overlap=50, replicas=replicas)
        t = time.perf_counter()
        with store.parallel_writes():
            stats = idx.index(p for i, p in enumerate(read_papers([corpus])) if i < n)
        sync(device)
        dt = time.perf_counter() - t
        assert store.count(store.chunks) == stats.chunks and stats.papers_indexed == n  # every paper kept
        store.close()
        return stats.chunks, dt

    index(args.warm_up)  # captures (where the plan has graphs), compiled kernels, allocator
    chunks, dt = index(args.papers)
    peak = (
        dict(
            peak_alloc_gib=torch.cuda.max_memory_allocated(device) / GiB,
            peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GiB,
        )
        if device.type == "cuda"
        else {}
    )
    row(
        name,
        attention=plan.attention,
        graphs=plan.graphs,
        token_budget=plan.token_budget,
        threads=per_gpu,
        papers=args.papers,
        chunks=chunks,
        seconds=dt,
        chunks_s=chunks / dt,
        ratio_vs_old=chunks / dt / base if base else None,
        cos_vs_fp32=cos,
        **peak,
    )
    passage.close()


def table() -> str:
    cols = [
        ("chunks_s", "chunks/s", "{:,.0f}"),
        ("ratio_vs_old", "× old", "{:.2f}"),
        ("peak_reserved_gib", "peak GiB (reserved)", "{:.1f}"),
        ("peak_alloc_gib", "peak GiB (allocated)", "{:.1f}"),
        ("token_budget", "budget", "{}"),
        ("threads", "threads", "{}"),
        ("cos_vs_fp32", "cos vs fp32 (min)", "{:.4f}"),
    ]
    lines = ["| run | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in RESULTS["rows"]:
        cells = [fmt.format(r[k]) if r.get(k) is not None else "" for k, _, fmt in cols]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    lines += ["", "| 16 GB card | token budget | encoder threads | attention | CUDA graphs |", "|---|---|---|---|---|"]
    for name, p in RESULTS["sixteen_gb"]:
        lines.append(f"| {name} | {p['token_budget']} | {p['encoders_per_gpu']} | {p['attention']} | {p['graphs']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--papers", type=int, default=1200, help="papers in each timed indexing run")
    ap.add_argument("--warm-up", type=int, default=300, help="papers indexed before each timed run")
    ap.add_argument("--baseline-chunks", type=int, default=4000, help="chunks the old way encodes")
    ap.add_argument(
        "--plans",
        nargs="+",
        default=["t4", "default"],
        choices=["t4", "default"],
        help="t4: a T4's plan (sm_75, 16 GB) forced on this GPU; default: this GPU's own",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a smoke run of this script on CPU)")
    args = ap.parse_args()

    import corpus as corpus_mod
    import models as bench_models

    from indexer.chunking import chunk_words

    device = torch.device(args.device)
    RESULTS["env"] = dict(
        torch=torch.__version__,
        cpus=os.cpu_count(),
        args=vars(args),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    )
    say(RESULTS["env"])
    work = Path(tempfile.mkdtemp(prefix="pi-plans-"))
    t = time.perf_counter()
    path = corpus_mod.write(work / "corpus.jsonl", max(args.papers, args.warm_up), 8000 if not args.tiny else 1500)
    papers = [json.loads(line) for _, line in zip(range(300), path.open())]
    sample = [p["text"] for p in papers[:200]]
    dirs = {
        "passage": str(bench_models.build_passage(work / "mpnet", sample, tiny=args.tiny)),
        "paper": [str(d) for d in bench_models.build_paper(work / "specter2", sample, tiny=args.tiny)],
    }
    say(f"corpus and models at {time.perf_counter() - t:.0f} s")

    chunk_texts = [c.text for p in papers for c in chunk_words(p["text"], 512, 50)]
    base = (
        old_way(Path(dirs["passage"]), chunk_texts[: args.baseline_chunks], device) if device.type == "cuda" else None
    )
    # Short texts (one window each) for the fp32 reference.
    probe_texts = [" ".join(c.split()[:120]) for c in chunk_texts[:64]]
    probe = (probe_texts, reference(Path(dirs["passage"]), probe_texts))

    for name in args.plans:
        if name == "t4" and device.type == "cuda":
            plan = device_plan(**T4)
            label = "T4 plan forced (sm_75, 16 GB)"
        elif name == "t4":  # a smoke run: the older GPUs' path (padded, no flash) on the CPU
            plan = device_plan(None, overrides=PlanOverrides(attention="sdpa"))
            label = "older GPUs' path on the CPU"
        else:
            plan = read_device_plan([device])
            arch = "CPU" if plan.capability is None else "sm_{}{}".format(*plan.capability)
            label = f"this GPU's plan ({arch})"
        plan_run(label, plan, device, dirs, path, args, base, probe)
        gc.collect()  # the run's encoders and graphs, before the next run's peak is measured
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for name, taken in (("T4 alone", 0), ("T4 beside a 7 GB model set", 7 * GiB)):
        p = device_plan(T4["capability"], T4["total_memory"], T4["free_memory"] - taken, T4["sm_count"])
        RESULTS["sixteen_gb"].append(
            (
                name,
                dict(
                    token_budget=p.token_budget,
                    encoders_per_gpu=p.encoders_per_gpu,
                    attention=p.attention,
                    graphs=p.graphs,
                ),
            )
        )
    (OUT / "gpu_plans.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    say(table())


if __name__ == "__main__":
    main()
