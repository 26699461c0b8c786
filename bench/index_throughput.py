"""Indexing throughput: the old sentence-transformers way and paperindex, side by side, in one run.

    python bench/index_throughput.py                  # on a CUDA machine; prints the table last
    python bench/index_throughput.py --gpus 2         # also N=1 vs N=2 GPUs (one encoder replica per GPU)
    python bench/index_throughput.py --tiny --papers 6 --device cpu    # a smoke run of this script

Models are random-weight MPNet-base (passages) and BERT-base + bottleneck adapter (SPECTER2-shaped
paper heads) of the real shapes; the corpus is real prose (bench/corpus.py), 512-word chunks with 50
words of overlap, every token embedded (windows of `--window` tokens).

Rows:
- kernel rows: the MPNet forward alone at one full batch shape (no tokenization, no store);
- `old way`: SentenceTransformer(...).half().encode(chunks, batch_size=256), truncating at 512
  tokens: tokenization and forward only, nothing stored;
- `paperindex`: Indexer.index end to end: read JSONL -> chunk -> tokenize (worker processes) ->
  encode paper heads + every window of every chunk -> upsert into Qdrant Edge (or into nothing:
  `no store`, to show what the store costs);
- paper heads: the SPECTER2 way (tokenizer padding + adapter model in fp16, batches of 256) and
  PaperEncoder.encode_papers.
Token counts: `chunk tok/s` counts each chunk token once; `model tok/s` counts what the model ran
(window tokens with overlaps and special tokens; for the old way, the truncated 512). `% GEMM` is the
model FLOPs at full length over the fp16 matrix-multiply rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cold_start import add_graph_options  # noqa: E402
from store_writes import PointsMadeHere  # noqa: E402

from indexer.config import Settings  # noqa: E402
from indexer.encode.device import ENCODERS_PER_GPU  # noqa: E402
from indexer.plan import Tuning  # noqa: E402
from indexer.store import Store  # noqa: E402

OUT = Path(os.environ.get("OUT", tempfile.gettempdir()))
RESULTS: dict = {"rows": [], "notes": []}
GPU_EVENTS = False  # --gpu-events
PROFILE: str | None = None  # --profile: "all" (every thread, idle too) or "gil" (whoever holds the interpreter lock)


def say(*a) -> None:
    print(*a, flush=True)


def save() -> None:
    (OUT / "index_throughput.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def row(name: str, **kv) -> None:
    RESULTS["rows"].append({"run": name, **kv})
    say("ROW", name, json.dumps(kv, default=str))
    save()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(devices) -> float:
    return sum(torch.cuda.max_memory_allocated(d) for d in devices) / 2**30 if devices[0].type == "cuda" else 0.0


def reset_peak(devices) -> None:
    if devices[0].type == "cuda":
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)


def flops_per_token(width: int, layers: int = 12, hidden: int = 768, ffn: int = 3072) -> float:
    """Forward FLOPs per token of a BERT-shaped encoder at sequence length `width`."""
    return layers * (2 * hidden * (4 * hidden + 2 * ffn) + 4 * width * hidden)


def gemm_tflops(device: torch.device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


class GpuMonitor:
    """Mean NVML utilisation (share of time a kernel was running) of the given GPUs while active."""

    def __init__(self, devices) -> None:
        self.samples: list[list[int]] = []
        self.handles = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(d.index or 0) for d in devices if d.type == "cuda"]
        except Exception as exc:  # no NVML: no utilisation column
            say("no NVML:", exc)
        self.stop = threading.Event()
        self.clocks: list[list[int]] = []  # SM clock, MHz

    def __enter__(self):
        def loop():
            while not self.stop.wait(0.05):
                self.samples.append([self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles])
                self.clocks.append([self.nvml.nvmlDeviceGetClockInfo(h, self.nvml.NVML_CLOCK_SM) for h in self.handles])

        if self.handles:
            self.thread = threading.Thread(target=loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.handles:
            self.thread.join()

    @property
    def busy(self) -> str:
        if not self.samples:
            return "-"
        return "/".join(f"{np.mean([s[i] for s in self.samples]):.0f}%" for i in range(len(self.handles)))


class GpuEvents:
    """CUDA events around every batch the encoders run (`GraphedForward.replay`: graphed or eager),
    on the stream it runs on: each GPU's share of its encoding time that it ran batches, and its time
    per token on the full-width passage batches (a slower GPU, or a GPU left waiting?); the passage
    batches with and without a padding mask, apart."""

    def __init__(self, full_width: int, devices: Sequence[torch.device] = (), passage_graphs: Sequence = ()) -> None:
        self.full_width = full_width
        self.passage = {id(g) for g in passage_graphs}  # the passage encoders' graphs (the rest: paper heads)
        self.marks: dict = defaultdict(list)  # device -> [(start, end, rows, width, padded, passage)]
        self.devices = devices
        self.anchors: dict = {}  # device -> (event, perf_counter at it): puts the GPU's gaps on the run's clock

    def __enter__(self):
        from indexer.encode import kernels

        for d in self.devices:
            with torch.cuda.device(d):
                torch.cuda.synchronize()
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                ev.synchronize()
                self.anchors[str(d)] = (ev, time.perf_counter())
        marks = self.marks

        def observe(g, inputs, run):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = run(*inputs)
            end.record()
            ids = inputs[0]  # (rows, width); packed heads: (tokens,), one row
            rows, width = ids.shape if ids.dim() == 2 else (1, ids.shape[0])
            padded = len(inputs) == 2 and inputs[1] is not None
            marks[str(kernels.one_device(g.device))].append((start, end, rows, width, padded, id(g) in self.passage))
            return out

        self.observing = kernels.observing_batches(observe)
        self.observing.__enter__()
        return self

    def __exit__(self, *exc):
        self.observing.__exit__(*exc)

    def report(self, t0: float | None = None) -> dict:
        """Per GPU; with `t0` (perf_counter at the run's start) also its longest idle gaps, each
        [start s, length ms] on the run's clock (as the timeline's spans)."""
        out = {}
        for dev, marks in sorted(self.marks.items()):
            torch.cuda.synchronize(dev)
            ref = marks[0][0]
            spans = [(ref.elapsed_time(s), ref.elapsed_time(e), r, w) for s, e, r, w, _, _ in marks]
            kinds = [(p, passage) for *_, p, passage in marks]
            # Two threads enqueue on a GPU's stream: one's batch may fall between the other's events,
            # so the busy time is the union of the spans (an upper bound: a span includes the time the
            # stream waited between its start event and its batch's launch).
            merged: list[list[float]] = []
            for s, e, _, _ in sorted(spans):
                if merged and s <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], e)
                else:
                    merged.append([s, e])
            busy = sum(e - s for s, e in merged)
            window = merged[-1][1] - merged[0][0]
            gaps = np.array([b[0] - a[1] for a, b in zip(merged, merged[1:])] or [0.0])
            rows = max((r for _, _, r, w in spans if w == self.full_width), default=0)
            full = [(e - s) / (r * w) * 1e6 for s, e, r, w in spans if w == self.full_width and r == rows]
            # Passage batches by whether they needed a padding mask: their share of the busy time and
            # their median time per 1,000 positions run (rows × width, filler rows in).
            by_mask = {}
            for name, want in (("unpadded", False), ("padded", True)):
                mine = [(e - s, r * w) for (s, e, r, w), (p, passage) in zip(spans, kinds) if passage and p == want]
                by_mask[name] = dict(
                    batches=len(mine),
                    busy_share=round(sum(t for t, _ in mine) / busy, 3),
                    us_per_ktok=round(float(np.median([t / n * 1e6 for t, n in mine])), 2) if mine else None,
                )
            heads = [e - s for (s, e, _, _), (_, passage) in zip(spans, kinds) if not passage]
            out[dev] = dict(
                batches=len(spans),
                busy_pct=round(100 * busy / window, 1),
                window_s=round(window / 1e3, 2),
                heads_busy_s=round(sum(heads) / 1e3, 3),
                heads_busy_share=round(sum(heads) / busy, 3),
                idle_gaps=len(merged) - 1,
                idle_s=round(float(gaps.sum()) / 1e3, 2),
                idle_in_gaps_over_10ms_s=round(float(gaps[gaps > 10].sum()) / 1e3, 2),
                longest_gap_ms=round(float(gaps.max()), 1),
                full_batches=len(full),
                us_per_ktok_full=round(float(np.median(full)), 2) if full else None,
                passage_batches=by_mask,
            )
            if t0 is not None and dev in self.anchors:
                anchor, at = self.anchors[dev]
                start = at + anchor.elapsed_time(ref) / 1e3 - t0  # the first mark on the run's clock
                longest = sorted(zip(merged, merged[1:]), key=lambda ab: ab[0][1] - ab[1][0])[:8]
                out[dev]["longest_gaps"] = [
                    [round(start + a[1] / 1e3, 3), round(b[0] - a[1], 1)] for a, b in sorted(longest)
                ]
        return out


class GcTimes:
    """The cyclic garbage collector's passes during the run: per generation their number and time,
    and the passes over 20 ms on the run's clock (a pass holds the interpreter lock: every thread,
    the GPUs' too, waits for it). With `freeze`, what exists when the run starts (models, graphs,
    the warm-up's leftovers) is left out of the collector's passes (runtime.frozen_heap), as
    `paperindex index` and the service do once their models are loaded."""

    def __init__(self, freeze: bool = False) -> None:
        self.freeze = freeze
        self.passes: list[tuple[int, float, float]] = []  # (generation, start, seconds)

    def _note(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.passes.append((info["generation"], self._t, time.perf_counter() - self._t))

    def __enter__(self):
        import gc

        from indexer.runtime import frozen_heap

        self.frozen = frozen_heap() if self.freeze else nullcontext()
        self.frozen.__enter__()
        self.tracked = len(gc.get_objects())
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc):
        import gc

        gc.callbacks.remove(self._note)
        self.frozen.__exit__(*exc)

    def report(self, t0: float) -> dict:
        by = {g: [s for gg, _, s in self.passes if gg == g] for g in (0, 1, 2)}
        return dict(
            tracked_at_start=self.tracked,
            frozen=self.freeze,
            **{
                f"gen{g}": dict(n=len(v), s=round(sum(v), 3), longest_ms=round(1e3 * max(v, default=0), 1))
                for g, v in by.items()
            },
            over_20ms=[[g, round(t - t0, 3), round(1e3 * s, 1)] for g, t, s in self.passes if s > 0.02][:40],
        )


class LockProbe:
    """How long a thread that wakes up waits for the interpreter lock: a thread sleeps 1 ms again
    and again, and each time notes how late it ran (a sleep lets go of the lock; waking needs it)."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self.stop = threading.Event()

    def __enter__(self):
        def loop():
            while not self.stop.is_set():
                t = time.perf_counter()
                time.sleep(0.001)
                self.late.append(time.perf_counter() - t - 0.001)

        self.thread = threading.Thread(target=loop, daemon=True, name="lock-probe")
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def report(self) -> dict:
        late = np.array(self.late or [0.0]) * 1e3
        return dict(
            wakeups=len(self.late),
            mean_ms=round(float(late.mean()), 3),
            p50_ms=round(float(np.median(late)), 3),
            p99_ms=round(float(np.percentile(late, 99)), 3),
            over_1ms=round(float((late > 1).mean()), 3),
        )


class NullStore(Store):
    """Takes every write and keeps nothing: the pipeline without Qdrant's cost."""

    papers, chunks = "papers", "chunks"

    def create(self, layout) -> None: ...
    def committed(self, paper_ids):
        return {}

    def upsert(self, collection, points) -> None: ...
    def upsert_chunks(self, entries) -> None: ...
    def delete_chunks(self, paper_ids) -> None: ...
    def delete_papers(self, paper_ids) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------------


def kernel_rows(hf_dir: Path, ids: np.ndarray, device: torch.device, gemm: float, compiled_only: bool = False) -> None:
    """The MPNet forward alone at one (rows, width) shape: HF eager vs the SDPA pooled forward, with
    and without CUDA graphs (and torch.compile); cosine against the fp32 reference."""
    from transformers import MPNetModel

    from indexer.encode.kernels import GraphedForward, speed_up

    rows, width = ids.shape
    ref32 = MPNetModel.from_pretrained(hf_dir, add_pooling_layer=False).to(device).eval()
    model = MPNetModel.from_pretrained(hf_dir, add_pooling_layer=False).to(device).half().eval()
    d_ids = torch.from_numpy(ids).to(device)
    h_ids = torch.from_numpy(ids).pin_memory()
    check = d_ids[:64].long()
    with torch.inference_mode():
        ref = ref32(input_ids=check).last_hidden_state[:, 0].double()
    del ref32
    fast = speed_up(model, "cls")  # compiles the fused add + LayerNorm that the graphs run
    graphed = GraphedForward(fast, device)
    variants = {
        "kernel: HF MPNet eager fp16": lambda model=model: model(
            input_ids=d_ids.long(), attention_mask=torch.ones_like(d_ids)
        ).last_hidden_state[:, 0],
        "kernel: SDPA pooled fp16, eager (add + LayerNorm unfused)": lambda fast=fast: fast(d_ids, None),
        "kernel: SDPA pooled fp16 + CUDA graph (fused add + LayerNorm)": lambda graphed=graphed: graphed(h_ids, None),
    }
    if compiled_only:
        variants = {}
        t = time.perf_counter()
        try:
            compiled = GraphedForward(speed_up(model, "cls", compile=True), device)
            with torch.inference_mode():
                compiled(h_ids, None)
            sync(device)
            RESULTS["notes"].append(f"torch.compile + capture took {time.perf_counter() - t:.0f} s")
            variants["kernel: SDPA pooled fp16, whole forward torch.compile + CUDA graph"] = lambda: compiled(
                h_ids, None
            )
        except Exception as exc:
            RESULTS["notes"].append(f"torch.compile failed after {time.perf_counter() - t:.0f} s: {exc!r}"[:500])
    for name, fn in variants.items():
        try:
            with torch.inference_mode():
                for _ in range(3):
                    out = fn()
                sync(device)
                reset_peak([device])
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                n = 20
                s.record()
                for _ in range(n):
                    out = fn()
                e.record()
                e.synchronize()
                dt = s.elapsed_time(e) / 1e3
            cos = torch.nn.functional.cosine_similarity(out[:64].double(), ref, dim=-1).min().item()
            tps = n * rows * width / dt
            row(
                name,
                shape=f"{rows}x{width}",
                model_tok_s=tps,
                gemm_pct=100 * tps * flops_per_token(width) / (gemm * 1e12),
                peak_gib=peak_gib([device]),
                cos_vs_fp32=cos,
            )
        except Exception as exc:  # keep the other rows
            say(f"{name} failed: {exc!r}")
            RESULTS["notes"].append(f"{name} failed: {exc!r}"[:500])
    variants.clear()
    del model, fast, graphed
    torch.cuda.empty_cache()


def baseline_chunks(st_dir: Path, texts: list[str], device: torch.device) -> tuple[float, float]:
    """The old way's (chunks/s, tokens/s): it embeds a chunk's first 512 tokens only."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(st_dir), device=str(device))
    if device.type == "cuda":
        st.half()
    st.max_seq_length = 512
    st.encode(texts[:512], batch_size=256, show_progress_bar=False)
    sync(device)
    reset_peak([device])
    t = time.perf_counter()
    st.encode(texts, batch_size=256, convert_to_numpy=True, show_progress_bar=False)
    sync(device)
    dt = time.perf_counter() - t
    lens = [min(len(x), 512) for x in st.tokenizer(texts, add_special_tokens=True)["input_ids"]]
    cps = len(texts) / dt
    width = 512
    row(
        "old way: ST .half().encode(bs=256), truncating at 512",
        chunks=len(texts),
        seconds=dt,
        chunks_s=cps,
        chunk_tok_s=sum(lens) / dt,
        model_tok_s=sum(lens) / dt,
        gemm_pct=100 * sum(lens) / dt * flops_per_token(width) / (RESULTS["gemm_tflops"] * 1e12)
        if device.type == "cuda"
        else None,
        peak_gib=peak_gib([device]),
    )
    del st
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cps, sum(lens) / dt


def instrument(indexer) -> dict:
    """Per stage (select / prepare / encode / write): seconds inside it, summed over threads, and CPU
    seconds of the calling thread (for select and write nearly all of it holds the interpreter lock)."""
    stages = ("select", "prepare", "encode", "write")
    busy: dict = {f"{stage}_{kind}": 0.0 for stage in stages for kind in ("s", "cpu")}
    busy["spans"] = []  # (stage, start, end): the run's timeline
    lock = threading.Lock()
    for stage in stages:
        inner = getattr(indexer, stage)

        def timed(*a, inner=inner, stage=stage, **kw):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return inner(*a, **kw)
            finally:
                with lock:
                    end = time.perf_counter()
                    busy[stage + "_s"] += end - t
                    busy[stage + "_cpu"] += time.thread_time() - c
                    busy["spans"].append((stage, t, end, threading.current_thread().name))

        setattr(indexer, stage, timed)
    return busy


@contextmanager
def sampled(name: str | None) -> Iterator[None]:
    """py-spy samples this process while the block runs (see --profile)."""
    if name is None:
        yield
        return
    out = OUT / ("profile-" + "".join(c if c.isalnum() else "-" for c in name)[:80] + ".txt")
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    mode = ["--gil"] if PROFILE == "gil" else ["--subprocesses", "--idle"]
    spy = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(os.getpid()),
            *mode,
            "--threads",
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


def timeline(spans: list, t0: float, t1: float) -> dict:
    """Where the run's wall time went: before the first encode, after the last, and between them
    the time no encoder thread was encoding (the GPU then has nothing queued), split by whether
    a tokenized group was waiting (then the encoders were not taking it: e.g. the writer was behind)."""
    enc = sorted((a, b) for s, a, b, _ in spans if s == "encode")
    if not enc:
        return {}
    idle, at = [], enc[0][0]
    for a, b in enc:
        if a > at:
            idle.append((at, a))
        at = max(at, b)
    prep_done = sorted(b for s, _, b, _ in spans if s == "prepare")
    enc_starts = sorted(a for a, _ in enc)
    # a gap with fewer groups prepared than taken by then: the encoders waited for the producer
    starved = sum(b - a for a, b in idle if sum(p <= a for p in prep_done) <= sum(e <= a for e in enc_starts))
    writes = sorted((a, b) for s, a, b, _ in spans if s == "write")
    # each encoder thread's time between its groups (waiting for a prepared one), from the first
    # encode of the run to the last
    per_thread: dict[str, list] = defaultdict(list)
    for s, a, b, name in sorted(spans, key=lambda x: x[1]):
        if s == "encode":
            per_thread[name].append((a, b))
    between = {}
    for name, v in per_thread.items():
        ends = [enc[0][0], *(b for _, b in v)]  # the run's first encode, then this thread's ends
        between[name] = sum(a - end for (a, _), end in zip(v, ends)) + (at - ends[-1])
    return dict(
        before_first_encode_s=round(enc[0][0] - t0, 3),
        after_last_encode_s=round(t1 - at, 3),
        no_encoder_s=round(sum(b - a for a, b in idle), 3),
        no_encoder_waiting_for_tokens_s=round(starved, 3),
        gaps=len(idle),
        encoder_threads_between_groups=round(sum(between.values()) / (len(between) * (at - enc[0][0])), 3),
        # the last writes (start, end) from the last encode's end, and the run's end after the last write
        last_writes_s=[(round(a - at, 3), round(b - at, 3)) for a, b in writes[-4:]],
        after_last_write_s=round(t1 - writes[-1][1], 3) if writes else None,
        # every stage call: (stage, thread, start, end) in seconds from the run's start
        spans=[(s, name, round(a - t0, 3), round(b - t0, 3)) for s, a, b, name in sorted(spans, key=lambda x: x[1])],
    )


def index_run(
    name: str,
    corpus: Path,
    n: int,
    paper_enc,
    passage_enc,
    replicas,
    store_kind: str,
    chunk_tokens: dict,
    base: tuple[float, float] | None,
    gemm: float,
    chunk_shards: int = 1,
    in_process: bool = False,
    papers_per_batch: int = 256,
    create_here: bool = False,
    gc_freeze: bool = False,
    in_flight: int = 48,
    writer: str = "new",
    tuning: Tuning = Tuning(),
) -> dict:

    from store_writes import timed as store_calls_timed

    from indexer.papers import read_papers
    from indexer.pipeline import Indexer
    from indexer.store import EdgeStore, StoreOptions

    devices = list(
        dict.fromkeys(
            torch.device("cuda", d.index or 0) if d.type == "cuda" else d
            for d in [passage_enc.device] + [p.device for _, p in replicas]
        )
    )
    tmp = tempfile.mkdtemp(prefix="pi-bench-")
    # in_process: no writer processes, the chunks written in this process
    options = StoreOptions(chunk_shards=chunk_shards, writer_processes=not in_process, writer_in_flight=in_flight)
    store = (
        (PointsMadeHere if writer == "old" else EdgeStore)(tmp, options=options)
        if store_kind == "edge"
        else NullStore()
    )
    idx = Indexer(
        store,
        paper_enc,
        passage_enc,
        chunk_size=512,
        chunk_overlap=50,
        papers_per_batch=papers_per_batch,
        replicas=replicas,
        tuning=tuning,
    )
    busy = instrument(idx)
    writes: dict[str, float] = defaultdict(float)  # the writer thread's time by store call
    if store_kind == "edge":
        store_calls_timed(store, writes)
    graphed = list(
        {id(p.run._graphed): p.run._graphed for _, p in idx.workers if p.run._graphed is not None}.values()
    )  # shared on a GPU
    before = [(len(g), g.eager_batches) for g in graphed]
    reset_peak(devices)
    marks: list[tuple[float, int]] = []  # (time, chunks written) after each batch
    events = GpuEvents(passage_enc.window_tokens + 2, devices, graphed) if GPU_EVENTS else nullcontext()
    with (
        GpuMonitor(devices) as mon,
        LockProbe() as probe,
        events,
        GcTimes(gc_freeze) as gcs,
        sampled(name if store_kind == "edge" and PROFILE else None),
    ):
        t = time.perf_counter()
        if create_here:
            idx.ensure_collections()  # as before: the chunk shards created in this process, then opened by the writers
        with store.parallel_writes() as report:  # as `paperindex index` runs it
            stats = idx.index(
                (p for i, p in enumerate(read_papers([corpus])) if i < n),
                on_batch=lambda s: marks.append((time.perf_counter(), s.chunks)),
            )
        for d in devices:
            sync(d)
        t_end = time.perf_counter()
        dt = t_end - t
    if store_kind != "null":
        assert store.count(store.chunks) == stats.chunks and store.count(store.papers) == stats.papers_indexed
    store.close()
    ctok = chunk_tokens["per_chunk"] * stats.chunks
    width = passage_enc.window_tokens + 2
    res = dict(
        papers=stats.papers_indexed,
        chunks=stats.chunks,
        windows=stats.windows,
        seconds=dt,
        chunks_s=stats.chunks / dt,
        papers_s=stats.papers_indexed / dt,
        chunk_tok_s=ctok / dt,
        model_tok_s=stats.tokens / dt,
        # without the pipeline's fill and drain: from the first batch written to the last
        steady_chunks_s=(marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0]) if len(marks) > 2 else None,
        gemm_pct=100
        * (stats.tokens * flops_per_token(width) + stats.head_tokens * flops_per_token(384))
        / dt
        / (gemm * len(devices) * 1e12)
        if gemm
        else None,
        gpu_busy=mon.busy,
        sm_mhz="/".join(f"{np.mean([c[i] for c in mon.clocks]):.0f}" for i in range(len(mon.handles)))
        if mon.clocks
        else None,
        gpu_events=events.report(t) if GPU_EVENTS else None,
        peak_gib=peak_gib(devices),
        ratio_vs_old=(stats.chunks / dt) / base[0] if base else None,
        tok_ratio_vs_old=ctok / dt / base[1] if base else None,
        stage_busy_s={k: round(v, 1) for k, v in busy.items() if k != "spans"},
        writer_split_s={
            **{k: round(v, 2) for k, v in writes.items()},
            "other (payloads, points)": round(busy["write_s"] - sum(writes.values()), 2),
        }
        if writes
        else None,
        # the writer thread's time waiting for a chunk shard's process, and each process's time writing
        shard_writes=asdict(report) if store_kind == "edge" else None,
        timeline=timeline(busy["spans"], t, t_end),
        lock_wait=probe.report,
        gc=gcs.report(t),
        tokenize_lanes=passage_enc.tokenize_lanes,
        # passage graphs after the run, captured during it, and batches run without one
        graphs=[
            {"graphs": len(g), "captured": len(g) - n0, "eager_batches": g.eager_batches - e0}
            for g, (n0, e0) in zip(graphed, before)
        ],
    )
    row(name, **res)
    return res


def heads(paper_dirs, corpus: Path, n: int, device: torch.device, paper_enc) -> None:
    import adapters
    from transformers import AutoTokenizer

    from indexer.encode import paper_head
    from indexer.papers import read_papers

    base, prox, _ = paper_dirs
    papers = [p for i, p in enumerate(read_papers([corpus])) if i < n]
    titles, abstracts = [p.title for p in papers], [p.abstract for p in papers]
    tok = AutoTokenizer.from_pretrained(base)
    texts = [paper_head(t, a, tok.sep_token) for t, a in zip(titles, abstracts)]

    def old_way(model, batch=256):
        out = []
        for i in range(0, len(texts), batch):
            inputs = tok(
                texts[i : i + batch],
                padding=True,
                truncation=True,
                max_length=512,
                return_tensors="pt",
                return_token_type_ids=False,
            ).to(device)
            with torch.inference_mode():
                out.append(model(**inputs).last_hidden_state[:, 0].float().cpu())
        return torch.cat(out)

    old = adapters.AutoAdapterModel.from_pretrained(base)
    old.load_adapter(str(prox), load_as="proximity", set_active=True)
    old.to(device).eval()
    ref = old_way(old.float(), 64)[:256].double()  # fp32 reference, first batch
    if device.type == "cuda":
        old.half()
    old_way(old)
    sync(device)
    reset_peak([device])
    t = time.perf_counter()
    old_way(old)
    sync(device)
    dt_old = time.perf_counter() - t
    row(
        "paper heads, old way: adapter model fp16, tokenizer padding, bs=256",
        papers=n,
        seconds=dt_old,
        papers_s=n / dt_old,
        peak_gib=peak_gib([device]),
    )
    del old
    if device.type == "cuda":
        torch.cuda.empty_cache()
    from shapes import plan_heads

    def timed(encode, items) -> tuple[float, float]:
        for _ in range(2):  # warm-up: graphs for the shapes these heads need (captured when a shape comes again)
            for i in range(0, n, 256):
                encode(*(x[i : i + 256] for x in items))
        sync(device)
        reset_peak([device])
        t = time.perf_counter()
        vecs = [encode(*(x[i : i + 256] for x in items)) for i in range(0, n, 256)]
        sync(device)
        return time.perf_counter() - t, torch.nn.functional.cosine_similarity(
            torch.from_numpy(vecs[0]).double(), ref, dim=-1
        ).min().item()

    dt, cos = timed(paper_enc.encode_papers, (titles, abstracts))
    row(
        "paper heads, paperindex: PaperEncoder.encode_papers",
        papers=n,
        seconds=dt,
        papers_s=n / dt,
        peak_gib=peak_gib([device]),
        ratio_vs_old=dt_old / dt,
        cos_vs_fp32=cos,
    )
    # Tokenized beforehand: the encoder's own share, heads packed (now) and padded (before).
    ids = paper_enc.tokenize_heads(titles, abstracts)
    tokens = sum(map(len, ids))
    for name in ("padded", "packed"):
        plan_heads([paper_enc], name)
        dt, cos = timed(paper_enc.encode_ids, (ids,))
        row(
            f"paper heads, tokenized beforehand, {name}: PaperEncoder.encode_ids",
            papers=n,
            seconds=dt,
            papers_s=n / dt,
            head_tok_s=tokens / dt,
            peak_gib=peak_gib([device]),
            ratio_vs_old=dt_old / dt,
            cos_vs_fp32=cos,
        )


def table() -> str:
    cols = [
        "chunks_s",
        "chunk_tok_s",
        "model_tok_s",
        "gemm_pct",
        "gpu_busy",
        "peak_gib",
        "ratio_vs_old",
        "tok_ratio_vs_old",
        "steady_chunks_s",
        "papers_s",
        "cos_vs_fp32",
    ]
    heads_ = [
        "chunks/s",
        "chunk tok/s",
        "model tok/s",
        "% GEMM",
        "GPU busy",
        "peak GiB",
        "× old (chunks/s; heads: papers/s)",
        "× old (tok/s)",
        "steady chunks/s",
        "papers/s",
        "cos vs fp32",
    ]

    def fmt(k, v):
        if v is None or v == "":
            return ""
        if isinstance(v, str):
            return v
        if k.endswith("tok_s"):
            return f"{v / 1e6:.2f} M"
        if k == "cos_vs_fp32":
            return f"{v:.5f}"
        if k in ("ratio_vs_old", "tok_ratio_vs_old"):
            return f"{v:.2f}"
        if k in ("gemm_pct", "peak_gib"):
            return f"{v:.1f}"
        return f"{v:,.0f}"

    lines = ["| run | " + " | ".join(heads_) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in RESULTS["rows"]:
        lines.append(f"| {r['run']} | " + " | ".join(fmt(k, r.get(k)) for k in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--papers", type=int, default=1500, help="papers in each timed indexing run")
    ap.add_argument("--baseline-chunks", type=int, default=6000)
    ap.add_argument("--heads", type=int, default=2048, help="paper heads in the head rows")
    ap.add_argument("--window", type=int, nargs="+", default=[254], help="window tokens (each a run)")
    ap.add_argument(
        "--overlap",
        type=int,
        nargs="+",
        default=[Settings.model_fields["window_overlap"].default],
        help="least window overlap in tokens (each a run)",
    )
    ap.add_argument(
        "--stores", nargs="+", default=["edge", "null"], choices=["edge", "null"], help="Qdrant Edge, or none"
    )
    ap.add_argument(
        "--chunk-shards",
        type=int,
        nargs="+",
        default=[2],
        help="Qdrant Edge chunk shards, each written by its own process (each a run; default 2, "
        "PAPERINDEX_EDGE_CHUNK_SHARDS's on one GPU)",
    )
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="also a run with one chunk shard written in this process (no writer process)",
    )
    ap.add_argument(
        "--pipeline-compile", action="store_true", help="end-to-end runs with torch.compile (PAPERINDEX_COMPILE)"
    )
    ap.add_argument(
        "--gpus",
        type=int,
        nargs="+",
        default=[1],
        help="GPUs (each a run, beside one GPU's; the tokenizer workers are those of the most)",
    )
    ap.add_argument(
        "--per-gpu",
        type=int,
        nargs="+",
        default=[ENCODERS_PER_GPU],
        help="encoder threads per GPU (each a run; default: PAPERINDEX_ENCODERS_PER_GPU's)",
    )
    ap.add_argument(
        "--workers", type=int, help="tokenizer worker processes (default: PAPERINDEX_TOKENIZER_WORKERS's for --device)"
    )
    ap.add_argument(
        "--lanes",
        type=int,
        nargs="+",
        help="lanes of the tokenizer workers in the several-GPU runs (each a run; default: as `paperindex index` has "
        "them "
        "for --gpus); one-GPU runs have one, as `paperindex index` on one GPU",
    )
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (a kernel row, last)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a smoke run of this script on CPU)")
    ap.add_argument(
        "--profile",
        nargs="?",
        const="all",
        choices=["all", "gil"],
        help="sample each timed Qdrant Edge run with py-spy: every thread and the worker processes, idle too (all), "
        "or only the thread that holds the interpreter lock (gil); collapsed stacks in $OUT/profile-*.txt",
    )
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["kernel", "baseline", "heads", "one-gpu", "e2e"],
        help="parts not to run (one-gpu: with --gpus N, only the N-GPU runs; e2e: no indexing runs, e.g. the heads "
        "alone)",
    )
    ap.add_argument(
        "--in-flight",
        type=int,
        nargs="+",
        help="messages sent to a chunk shard's process before the writer waits for it "
        "(StoreOptions.writer_in_flight; each a run)",
    )
    ap.add_argument(
        "--papers-per-batch",
        type=int,
        nargs="+",
        help="papers per group (each a run; default: as `paperindex index` has them on that many GPUs)",
    )

    def variant(flag: str, choices: list[str], now: str, text: str) -> None:
        """An option whose values are each a run: with --gpus N, the one-GPU run takes only the last."""
        ap.add_argument(
            flag,
            nargs="+",
            choices=choices,
            default=[now],
            help=f"{text}; each a run (the one-GPU run of --gpus N: the last only)",
        )

    variant(
        "--writer",
        ["old", "new"],
        "new",
        "chunk points (ids, payloads) made by the chunk shards' writer processes as now (new), "
        "or by the indexing process's writer thread as before (old)",
    )
    variant(
        "--create",
        ["here", "writers"],
        "writers",
        "a new index's chunk shards created by their writer processes while the run "
        "starts (writers: as now), or in this process before it (here: as before)",
    )
    variant(
        "--gc",
        ["default", "freeze"],
        "freeze",
        "what exists at the run's start left out of the garbage collector's passes "
        "(freeze: as paperindex does now), or the collector as Python sets it (default: as before)",
    )
    variant(
        "--write-order",
        ["input", "free"],
        "free",
        "groups written as they come unless an earlier one shares a paper (free: as now), "
        "or in input order (input: as before)",
    )
    variant(
        "--heads-plan",
        ["padded", "packed"],
        "packed",
        "paper heads packed end to end, no padding (packed: as now), or in "
        "padded batches (batching.HEAD_BATCHES: as before)",
    )
    variant(
        "--batches",
        ["sorted", "unpadded"],
        "unpadded",
        "passage batches as batching.WINDOW_BATCHES cuts them (unpadded: the grid's "
        "widths first, batches that need no padding mask, rows in steps; as now), or cut from one length-sorted run, "
        "rows in powers "
        "of two (sorted: as before)",
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="run the timed rows this many times over (alternating A/B rows)"
    )
    ap.add_argument(
        "--spread",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="several GPUs: the first groups spread over them and the last cut finer (Tuning.spread; each a run), or "
        "every GPU's threads taking groups as they come, each ramp size once and the last group halved (off)",
    )
    ap.add_argument(
        "--gate",
        nargs="+",
        choices=["gpu", "all"],
        default=["gpu"],
        help="a CUDA graph capture holds back the work of its own GPU (gpu: as now) or of every GPU (all: as before); "
        "each a run",
    )
    ap.add_argument(
        "--fresh-graphs",
        action="store_true",
        help="each timed run starts without CUDA graphs (captured as they come, as in a new process), not with the "
        "warm-up's",
    )
    ap.add_argument(
        "--ring",
        type=int,
        nargs="+",
        help="passage batches each encoder thread keeps in flight (BatchRunner.in_flight; each a run)",
    )
    ap.add_argument(
        "--warm-up-papers",
        type=int,
        help="papers the warm-up indexes (each group size a pass; default: 1,000 per encoder thread, "
        "at least 2,000, at most --papers)",
    )
    add_graph_options(ap)
    ap.add_argument(
        "--gpu-events",
        action="store_true",
        help="CUDA events around each batch: each GPU's busy share and its time per token on full batches",
    )
    args = ap.parse_args()
    gpu_runs, args.gpus = args.gpus, max(args.gpus)
    global PROFILE, GPU_EVENTS
    PROFILE, GPU_EVENTS = args.profile, args.gpu_events and args.device != "cpu"

    import corpus as corpus_mod
    import models as bench_models
    from shapes import plan_heads, plan_windows

    from indexer.chunking import chunk_words
    from indexer.encode import PaperEncoder, PassageEncoder
    from indexer.encode.kernels.graphs import WARM_UPS, GpuGate
    from indexer.encode.runner import CAPTURE_AFTER
    from indexer.plan import Hardware, make_plan
    from indexer.runtime import encoder_grid
    from indexer.store import StoreOptions

    device = torch.device(args.device)
    hw = Hardware.detect(args.device)  # the counts the runs are sized from, as `paperindex index` sizes its own
    RESULTS["env"] = dict(
        torch=torch.__version__,
        cpus=os.cpu_count(),
        args={**vars(args), "gpus": gpu_runs},
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        gpus=torch.cuda.device_count() if device.type == "cuda" else 0,
    )
    say(RESULTS["env"])
    work = Path(tempfile.mkdtemp(prefix="pi-bench-"))
    t = time.perf_counter()
    n_corpus = max(args.papers, args.heads, 300)
    path = corpus_mod.write(work / "corpus.jsonl", n_corpus, 8000 if not args.tiny else 1500)
    papers = [json.loads(line) for _, line in zip(range(400), path.open())]
    say(f"corpus: {n_corpus} papers in {time.perf_counter() - t:.0f} s")

    sample = [p["text"] for p in papers[:200]]
    st_dir = bench_models.build_passage(work / "mpnet", sample, tiny=args.tiny)
    paper_dirs = bench_models.build_paper(work / "specter2", sample, tiny=args.tiny)
    hf_dir = work / "mpnet" / "hf"
    say(f"models built at {time.perf_counter() - t:.0f} s")

    gemm = gemm_tflops(device) if device.type == "cuda" else 0.0
    RESULTS["gemm_tflops"] = gemm
    say(f"fp16 GEMM 8192^3: {gemm:.0f} TFLOP/s")

    # every token of each chunk counted once (per chunk, from a sample of the corpus)
    chunk_texts = [c.text for p in papers for c in chunk_words(p["text"], 512, 50)]
    probe = PassageEncoder(str(st_dir), device="cpu")
    ntok = [len(x) for x in probe.tokenizer(chunk_texts[:3000], add_special_tokens=False)["input_ids"]]
    chunk_tokens = {"per_chunk": float(np.mean(ntok))}
    RESULTS["chunk_tokens"] = dict(
        mean=float(np.mean(ntok)), median=float(np.median(ntok)), over_512=float(np.mean(np.array(ntok) > 510))
    )
    say("chunk tokens:", RESULTS["chunk_tokens"])

    if "kernel" not in args.skip and device.type == "cuda":
        win = probe.tokenize_windows(chunk_texts[:2000])
        w = probe.window_tokens + 2
        full = win.ids[win.lengths == w][:, :w]
        kernel_ids = full[: 131072 // w]
        kernel_rows(hf_dir, kernel_ids, device, gemm)

    base = None
    if "baseline" not in args.skip:
        base = baseline_chunks(st_dir, chunk_texts[: args.baseline_chunks], device)

    from indexer.papers import read_papers

    t = time.perf_counter()
    parsed = sum(1 for _, _ in zip(range(args.papers), read_papers([path])))
    RESULTS["notes"].append(
        f"reading + validating {parsed} papers (JSONL -> PaperIn) alone: {time.perf_counter() - t:.1f} s"
    )

    # One gate for every encoder of the runs: --gate sets whether a capture holds back its GPU's work or every GPU's.
    capture_gate = GpuGate()
    graph_options = dict(
        capture_warm_ups=WARM_UPS if args.capture_warm_ups is None else args.capture_warm_ups, gate=capture_gate
    )
    paper_enc = PaperEncoder(
        str(paper_dirs[0]), str(paper_dirs[1]), str(paper_dirs[2]), device=args.device, **graph_options
    )
    store_names = {"edge": "Qdrant Edge", "null": "no store"}
    for window, overlap in [(w, o) for w in args.window for o in args.overlap if "e2e" not in args.skip]:
        passage_enc = PassageEncoder(
            str(st_dir),
            device=args.device,
            window_tokens=window,
            window_overlap=overlap,
            tokenizer_workers=make_plan(
                Settings(device=args.device, gpus=args.gpus, tokenizer_workers=args.workers), hw
            ).tokenizer_workers,
            tokenizer_lanes=make_plan(
                Settings(device=args.device, gpus=args.gpus, tokenizer_workers=args.workers), hw
            ).tokenizer_lanes,
            compile=args.pipeline_compile,
            **graph_options,
        )
        # The encoders `paperindex index` runs (indexer.runtime): each GPU its own paper encoder, shared
        # by that GPU's threads, and a passage replica per thread.
        if device.type != "cuda":
            args.per_gpu = [1]  # replicas are per GPU
        grid = (
            encoder_grid(
                [f"cuda:{i}" for i in range(args.gpus)],
                max(args.per_gpu),
                paper_enc,
                passage_enc,
                args.share_graphs == "on",
            )
            if device.type == "cuda"
            else {}
        )

        def replicas_for(n_gpus: int, per_gpu: int) -> list:
            return [pair for (i, j), pair in grid.items() if i < n_gpus and j < per_gpu]

        replicas_all = replicas_for(args.gpus, max(args.per_gpu))
        try:
            gpu_counts = sorted(set(gpu_runs) if "one-gpu" in args.skip else {1, *gpu_runs})

            def groups_for(n: int) -> list[int]:
                return args.papers_per_batch or [make_plan(Settings(device=args.device, gpus=n), hw).group_papers]

            # warm-up on the same papers: worker processes started, CUDA graphs captured for the
            # shapes the corpus needs, so that no timed run pays for captures another did not. The
            # encoders capture a shape the second time it comes; the warm-up captures each the first
            # time, so the timed runs start where a long run is. Each encoder thread captures its own
            # shapes, from the groups it gets: the warm-up gives each ~1,000 papers (2,000 in all at
            # least), in groups of each size the timed runs use (a group's last batches' shapes
            # depend on its size).
            t = time.perf_counter()
            encoders = {
                id(e): e for e in (paper_enc, passage_enc, *(e for pair in grid.values() for e in pair))
            }.values()
            paper_encs = list({id(p): p for p in (paper_enc, *(p for p, _ in replicas_all))}.values())
            runners = [enc.run for enc in encoders] + [
                r for name in args.heads_plan for r in plan_heads(paper_encs, name)
            ]
            graphed = list({id(r._graphed): r._graphed for r in runners if r._graphed is not None}.values())
            for g in graphed:
                g.capture_after = 1
            warm_papers = min(args.papers, args.warm_up_papers or max(2000, 1000 * (1 + len(replicas_all))))
            passage_encs = [passage_enc, *(p for _, p in replicas_all)]
            for group, batching, heads_plan in [
                (g, b, h)
                for g in sorted({g for n in gpu_counts for g in groups_for(n)})
                for b in args.batches
                for h in args.heads_plan
            ]:
                plan_windows(passage_encs, batching)
                plan_heads(paper_encs, heads_plan)
                index_run(
                    f"warm-up (window {window}/{overlap})",
                    path,
                    warm_papers,
                    paper_enc,
                    passage_enc,
                    replicas_all,
                    "null",
                    chunk_tokens,
                    None,
                    gemm,
                    papers_per_batch=group,
                )
                RESULTS["rows"].pop()
            for g in graphed:
                g.capture_after = CAPTURE_AFTER
            RESULTS["notes"].append(
                f"warm-up, window {window}/{overlap}{' + compile' if args.pipeline_compile else ''}: "
                f"{time.perf_counter() - t:.0f} s "
                f"({warm_papers} papers a pass)"
            )

            def lanes_for(n: int) -> list[int]:  # as `paperindex index` has them on n GPUs, or --lanes
                if n == 1:
                    return [1]
                return args.lanes or [
                    make_plan(
                        Settings(device=args.device, gpus=n, tokenizer_workers=passage_enc.windows.workers), hw
                    ).tokenizer_lanes
                ]

            for n_gpus, per_gpu, n_lanes, group in [
                (n, k, m, g) for n in gpu_counts for k in args.per_gpu for m in lanes_for(n) for g in groups_for(n)
            ]:
                replicas = replicas_for(n_gpus, per_gpu)
                passage_enc.windows.set_lanes(n_lanes)
                tag = (
                    f"window {window}/{overlap}"
                    + (" + compile" if args.pipeline_compile else "")
                    + (f", {n_gpus} GPUs" if args.gpus > 1 else "")
                    + (f", {per_gpu} threads per GPU" if max(args.per_gpu) > 1 else "")
                    + (f", {n_lanes} tokenizing lanes" if args.lanes and len(args.lanes) > 1 else "")
                    + (
                        f", groups of {group} papers"
                        if args.papers_per_batch and len(args.papers_per_batch) > 1
                        else ""
                    )
                )
                runs = [(k, n, False) for k in args.stores for n in (args.chunk_shards if k == "edge" else [1])]
                runs += [("edge", 1, True)] if args.in_process else []
                flights = args.in_flight or [StoreOptions().writer_in_flight]
                spreads = args.spread if n_gpus > 1 else args.spread[:1]  # one GPU: the same either way
                rings = args.ring or [passage_enc.run.in_flight]

                def ran(values: list[str], n_gpus=n_gpus) -> list[str]:  # see variant
                    return values if n_gpus > 1 or args.gpus == 1 else values[-1:]

                for (
                    kind,
                    shards,
                    in_process,
                    flight,
                    spread,
                    writer,
                    gate,
                    ring,
                    create,
                    gc_mode,
                    order,
                    batching,
                    heads_plan,
                ) in [
                    (*r, f, sp, w, gt, rg, cr, gm, wo, bt, hp)
                    for _ in range(args.repeat)
                    for r in runs
                    for f in (flights if r[0] == "edge" else flights[:1])
                    for sp in spreads
                    for w in ran(args.writer)
                    for gt in (args.gate if n_gpus > 1 else args.gate[:1])
                    for rg in rings
                    for cr in ran(args.create)
                    for gm in ran(args.gc)
                    for wo in ran(args.write_order)
                    for bt in ran(args.batches)
                    for hp in ran(args.heads_plan)
                ]:
                    plan_windows(passage_encs, batching)
                    plan_heads(paper_encs, heads_plan)
                    for enc in [passage_enc, *(p for _, p in replicas)]:
                        enc.run.in_flight = ring
                    capture_gate.per_device = gate == "gpu"  # between runs: no GPU work is under way
                    if args.fresh_graphs:
                        for g in graphed:
                            g.clear()
                            g._seen.clear()
                    label = store_names[kind] + (
                        f", {shards} chunk shard{'s' if shards > 1 else ''}" if kind == "edge" else ""
                    )
                    label += ", written in-process" if in_process else ""
                    label += f", {flight} messages in flight" if len(flights) > 1 and kind == "edge" else ""
                    label += f", spread {spread}" if len(spreads) > 1 else ""
                    label += f", writer {writer}" if len(args.writer) > 1 else ""
                    label += (
                        f", capture holds back {'its GPU' if gate == 'gpu' else 'every GPU'}"
                        if len(args.gate) > 1 and n_gpus > 1
                        else ""
                    )
                    label += ", fresh graphs" if args.fresh_graphs else ""
                    label += (
                        f", shards created {'in this process' if create == 'here' else 'by the writers'}"
                        if len(args.create) > 1
                        else ""
                    )
                    label += f", gc {gc_mode}" if len(args.gc) > 1 else ""
                    label += (
                        f", written {'in input order' if order == 'input' else 'as they come'}"
                        if len(args.write_order) > 1
                        else ""
                    )
                    label += f", {ring} batches in flight per thread" if len(rings) > 1 else ""
                    label += f", batches {batching}" if len(args.batches) > 1 else ""
                    label += f", heads {heads_plan}" if len(args.heads_plan) > 1 else ""
                    index_run(
                        f"paperindex e2e → {label} ({tag})",
                        path,
                        args.papers,
                        paper_enc,
                        passage_enc,
                        replicas,
                        kind,
                        chunk_tokens,
                        base,
                        gemm,
                        shards,
                        in_process,
                        group,
                        create_here=create == "here",
                        gc_freeze=gc_mode == "freeze",
                        in_flight=flight,
                        writer=writer,
                        tuning=Tuning(spread=spread == "on", in_input_order=order == "input"),
                    )
        finally:
            passage_enc.close()

    if "heads" not in args.skip:
        heads(paper_dirs, path, args.heads, device, paper_enc)

    if args.compile and "kernel" not in args.skip and device.type == "cuda":
        kernel_rows(hf_dir, kernel_ids, device, gemm, compiled_only=True)

    say("\n" + table())
    for note in RESULTS["notes"]:
        say("note:", note)
    (OUT / "index_throughput.md").write_text(table() + "\n")
    save()


if __name__ == "__main__":
    main()
