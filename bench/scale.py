"""The corpus at its real size: 12,000 papers (1.2 M chunks) from JSONL to searchable on one GPU, searched
over HTTP, and recall@10 of two-stage dense search against exact MaxSim with real model weights.

Phases, each its own command (a GPU host limits one command's time); they share a work folder
(default paperindex_data/scale, git-ignored, so it stays between commands on one machine):

  prepare  the corpus: pseudo-papers of real English prose (the docstrings of the Python installed,
           its standard library's and site-packages', those with little code), --chunks-per-paper
           512/50-word chunks each, in JSONL parts; held-out paragraphs' first sentences as queries (in
           no paper); random-weight models of the real shapes (MPNet-base passages, SPECTER2-shaped
           heads, a MiniLM-L6-shaped cross-encoder)
  index    what `paperindex index` does, in-process: read, encode, write (one pipelined stage), then build
           (finish_bulk: HNSW graphs); timed apart. It stops taking new parts after --feed-s seconds and
           the next `index` goes on from there; the build runs once every part is written
  search   `paperindex serve` over that index (a subprocess on loopback): GET /search latency per mode
           (query encoding included), the server's memory, the index's disk
  recall   all-MiniLM-L6-v2 (real weights, --recall-model) indexes the corpus the same way; each query's
           two-stage result (the engine's, and a brute-force one by pooled vector, per prefetch depth K)
           against exact MaxSim over every window of every chunk (torch, brute force, on the GPU)
  report   the table from what the phases saved
  all      every phase in one process (a smoke run on a CPU: --papers 40 --chunks-per-paper 4 --tiny)

The timing rows use random weights (their speed does not depend on the values) and real text; the
recall rows use real weights. Each phase prints the one table (rows not measured yet show "-") and
writes it with every figure to --out (scale.md, scale.json).

    python bench/scale.py --phase prepare index --out $OUT  # ~1.5 min on 16 cores (3.5 GB of JSONL), then index
    python bench/scale.py --phase index --out $OUT          # again until it says every part is written
    python bench/scale.py --phase search --out $OUT
    python bench/scale.py --phase recall --recall-model .models/minilm-fp16 --out $OUT
    python bench/scale.py --phase all --papers 40 --chunks-per-paper 4 --tiny --device cpu \\
        --recall-model .models/minilm-fp16 --work /tmp/scale-smoke      # smoke run
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import multiprocessing as mp
import os
import random
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

CHUNK_WORDS, CHUNK_OVERLAP = 512, 50  # the defaults: a paper of W words has 1 + ceil((W - 512) / 462) chunks
QUERY_EVERY = 50  # one paragraph in this many is held out of the corpus, for queries
SEARCHABLE_TARGET_S = 600
P50_TARGET_MS, P50_RERANK_TARGET_MS = 10.0, 40.0
RECALL_TARGET = 0.98
PHASES = ["prepare", "index", "search", "recall"]
# A docstring is kept where this share of its words are letters: with site-packages' code-heavy ones
# too, a 512-word chunk made ~980 word pieces; with these ~750, as bench/corpus.py's (747), so chunks
# get the window counts of real prose.
WORDY = 0.85
TIE_MARGIN = 0.01  # "close" chunks: exact MaxSim within this of a query's 10th best (how ambiguous its top 10 is)


def say(*a: Any) -> None:
    print(*a, flush=True)


# corpus ----------------------------------------------------------------------------------------------


def _docstrings(path: str) -> list[str]:
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8", errors="ignore"))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= 20:
                out.append(" ".join(doc.split()))
    return out


def wordy(paragraph: str) -> bool:
    """Prose rather than code: at least WORDY of its words are letters once punctuation is stripped."""
    words = paragraph.split()
    return sum(w.strip(".,;:()\"'!?").isalpha() for w in words) >= WORDY * len(words)


def prose(site_packages: bool, workers: int) -> list[str]:
    """Distinct docstrings (>= 20 words, `wordy`) of the standard library, and of site-packages too:
    real English prose, ~2.3 M distinct words with torch and transformers installed (the stdlib's
    alone: ~0.2 M)."""
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"]] + ([paths["purelib"], paths["platlib"]] if site_packages else [])
    files = sorted(
        {
            str(f)
            for r in roots
            for f in Path(r).rglob("*.py")
            if not {"test", "tests"} & set(f.parts) and (site_packages or "site-packages" not in f.parts)
        }
    )
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
        docs = [d for ds in ex.map(_docstrings, files, chunksize=64) for d in ds]
    return [d for d in dict.fromkeys(docs) if wordy(d)]


def query_of(paragraph: str) -> str:
    """A paragraph's first sentence (its first 20 words where that is shorter than 6), at most 30 words."""
    words = re.split(r"(?<=[.!?])\s", paragraph, maxsplit=1)[0].split()
    return " ".join((words if len(words) >= 6 else paragraph.split()[:20])[:30])


_POOL: list[str] = []  # the corpus paragraphs, inherited by the part writers (fork)


def _write_part(job: tuple[str, int, int, int, int]) -> int:
    path, first, n, words, seed = job
    with open(path, "w", encoding="utf-8") as f:
        for i in range(first, first + n):
            rng = random.Random(seed * 1_000_003 + i)
            body: list[str] = []
            count = 0
            while count < words:
                p = rng.choice(_POOL)
                body.append(p)
                count += p.count(" ") + 1
            f.write(
                json.dumps(
                    {
                        "paper_id": f"scale{i:06d}",
                        "title": " ".join(rng.choice(_POOL).split()[:12]),
                        "abstract": " ".join(" ".join(rng.choice(_POOL) for _ in range(3)).split()[:220]),
                        "text": " ".join(" ".join(body).split()[:words]),
                        "year": 1990 + i % 35,
                    }
                )
                + "\n"
            )
    return n


def write_corpus(
    folder: Path, pool: list[str], papers: int, words: int, part_papers: int, workers: int, seed: int
) -> list[Path]:
    global _POOL
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*.jsonl"):
        old.unlink()
    jobs = [
        (str(folder / f"part-{i // part_papers:04d}.jsonl"), i, min(part_papers, papers - i), words, seed)
        for i in range(0, papers, part_papers)
    ]
    _POOL = pool
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
        list(ex.map(_write_part, jobs))
    return [Path(j[0]) for j in jobs]


def parts(work: Path) -> list[Path]:
    found = sorted((work / "corpus").glob("part-*.jsonl"))
    if not found:
        raise SystemExit(f"no corpus under {work / 'corpus'}: run --phase prepare first (a fresh machine has lost it)")
    return found


# models ----------------------------------------------------------------------------------------------


def build_models(folder: Path, texts: list[str], tiny: bool) -> dict[str, str]:
    """Settings overrides naming the random-weight models of the real shapes (bench/models.py)."""
    import models as bench_models

    base, proximity, adhoc = bench_models.build_paper(folder / "specter2", texts, tiny=tiny)
    return {
        "passage_model": str(bench_models.build_passage(folder / "mpnet", texts, tiny=tiny)),
        "paper_model": str(base),
        "paper_adapter": str(proximity),
        "query_adapter": str(adhoc),
        "reranker_model": str(bench_models.build_reranker(folder / "reranker", texts, tiny=tiny)),
    }


# saved state -----------------------------------------------------------------------------------------


class Saved:
    """The phases' figures, kept in the work folder (so later commands add to them) and copied to --out."""

    def __init__(self, work: Path, out: Path) -> None:
        self.path, self.out = work / "scale.json", out
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def __getitem__(self, key: str) -> Any:
        return self.data.setdefault(key, {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.data, indent=1, default=str)
        self.path.write_text(text)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "scale.json").write_text(text)
        (self.out / "scale.md").write_text(table(self.data) + "\n")


def settings_for(a: argparse.Namespace, saved: Saved, index: str, **override: Any) -> dict[str, Any]:
    """PAPERINDEX_* field values of a phase: the prepared models, an index folder under the work folder."""
    return {
        **saved["prepare"]["models"],
        "qdrant_path": str(a.work / index),
        "device": a.device,
        "bulk_load": a.bulk_load,
        **override,
    }


def env_of(fields: dict[str, Any]) -> dict[str, str]:
    return {f"PAPERINDEX_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}


# prepare ---------------------------------------------------------------------------------------------


def phase_prepare(a: argparse.Namespace, saved: Saved) -> None:
    t0 = time.perf_counter()
    for old in ("index", "recall-index"):  # an index of an earlier corpus would skip its papers
        shutil.rmtree(a.work / old, ignore_errors=True)
    workers = a.workers or os.cpu_count() or 2
    paras = prose(a.prose == "all", workers)
    held = set(range(0, len(paras), QUERY_EVERY))
    pool = [p for i, p in enumerate(paras) if i not in held]
    queries = [query_of(paras[i]) for i in sorted(held)]
    random.Random(a.seed).shuffle(queries)
    a.work.mkdir(parents=True, exist_ok=True)
    (a.work / "queries.json").write_text(json.dumps(queries))
    prose_s = time.perf_counter() - t0
    words = CHUNK_WORDS + (a.chunks_per_paper - 1) * (CHUNK_WORDS - CHUNK_OVERLAP)
    t = time.perf_counter()
    files = write_corpus(a.work / "corpus", pool, a.papers, words, a.part_papers, workers, a.seed)
    corpus_s = time.perf_counter() - t
    t = time.perf_counter()
    # The vocabularies learn the prose's word pieces from ~6,000 of its paragraphs (~0.4 M words): as many
    # pieces a word as from all of it, in a fifth of the time.
    models = build_models(a.work / "models", pool[:: max(1, len(pool) // 6000)], a.tiny)
    pool_words = sum(p.count(" ") + 1 for p in pool)
    saved.data = {
        "prepare": {
            "papers": a.papers,
            "words_per_paper": words,
            "chunks_per_paper": a.chunks_per_paper,
            "parts": len(files),
            "corpus_gib": round(sum(f.stat().st_size for f in files) / 2**30, 2),
            "prose": a.prose,
            "pool_paragraphs": len(pool),
            "pool_words": pool_words,
            "repeats": round(a.papers * words / pool_words, 1),
            "queries": len(queries),
            "tiny": a.tiny,
            "models": models,
            "seconds": {
                "prose": round(prose_s, 1),
                "corpus": round(corpus_s, 1),
                "models": round(time.perf_counter() - t, 1),
            },
        }
    }
    say(
        f"prepared {a.papers} papers of {words} words in {len(files)} parts ({saved['prepare']['corpus_gib']} GiB), "
        f"{len(queries)} queries; prose pool {len(pool)} paragraphs, {pool_words:,} words "
        f"(each ~{saved['prepare']['repeats']}x in the corpus); {saved['prepare']['seconds']}"
    )


# index -----------------------------------------------------------------------------------------------


class Tapped:
    """A store whose chunk writes are shown to `tap` (the papers' chunks and their vectors) first."""

    def __init__(self, store: Any, tap: Callable[[Sequence], None]) -> None:
        self._store, self._tap = store, tap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def upsert_chunks(self, entries: Sequence) -> None:
        self._tap(entries)
        self._store.upsert_chunks(entries)


def index_corpus(
    fields: dict[str, Any],
    files: Sequence[Path],
    feed_until: float | None,
    last: bool = True,
    tap: Callable[[Sequence], None] | None = None,
) -> dict[str, Any]:
    """What `paperindex index` does (indexer/cli.py): load the models, index the parts inside the
    store's parallel writes, then build what the writes deferred, each timed. Parts are taken until
    perf_counter() passes `feed_until` (none if it has passed once the models are loaded); the build
    runs if every part was taken and they are the `last` to index. `tap` sees the chunks and vectors of every write."""
    from indexer.config import Settings
    from indexer.papers import read_papers
    from indexer.runtime import build, frozen_heap
    from indexer.store import open_store

    t = time.perf_counter()
    s = Settings(**fields)
    rt = build(s, reranker=False, store=None if tap is None else Tapped(open_store(s), tap))
    out: dict[str, Any] = {"load_s": time.perf_counter() - t, "parts": [], "index_s": 0.0, "stats": {"chunks": 0}}
    taken: list[str] = out["parts"]
    if feed_until is not None and time.perf_counter() > feed_until:
        rt.passage_encoder.close()
        rt.close()
        return out

    def records() -> Iterator:
        for f in files:
            if feed_until is not None and time.perf_counter() > feed_until:
                return
            taken.append(f.name)  # once the next part starts (or the run ends) this one was read whole
            yield from read_papers([f])

    said = [time.perf_counter()]

    def progress(st: Any) -> None:  # a line every 30 s: a command cut at the machine's limit still shows its pace
        if time.perf_counter() - said[0] >= 30:
            said[0] = time.perf_counter()
            say(
                f"  {st.papers_indexed:,} papers, {st.chunks:,} chunks in {st.seconds:.0f} s "
                f"({st.chunks / max(st.seconds, 1e-9):,.0f} chunks/s)"
            )

    try:
        t = time.perf_counter()
        with frozen_heap(), rt.store.parallel_writes():
            stats = rt.indexer.index(records(), on_batch=progress)
        out["index_s"] = time.perf_counter() - t
        out["stats"] = stats.as_dict()
        if last and len(taken) == len(files):
            say(f"  written: {stats.chunks:,} chunks in {out['index_s']:.0f} s; building")
            t = time.perf_counter()
            rt.store.finish_bulk()
            out["build_s"] = time.perf_counter() - t
    finally:
        rt.passage_encoder.close()  # its tokenizer processes: later phases of this process have their own
        rt.close()
    return out


def phase_index(a: argparse.Namespace, saved: Saved, started: float) -> None:
    state = saved["index"]
    files = parts(a.work)
    done = set(state.get("parts_done", []))
    todo = [f for f in files if f.name not in done]
    if not todo and "build_s" in state:
        say("every part is indexed and built: nothing to do (run --phase prepare to start over)")
        return
    take = todo[: a.max_parts] if a.max_parts else todo
    feed_until = started + a.feed_s if a.feed_s else None
    run = index_corpus(settings_for(a, saved, "index"), take, feed_until, last=len(take) == len(todo))
    state.setdefault("runs", []).append({k: v for k, v in run.items() if k != "parts"} | {"parts": len(run["parts"])})
    state["parts_done"] = sorted(done | set(run["parts"]))
    if "build_s" in run:
        state["build_s"] = run["build_s"]
    runs = state["runs"]
    totals = {k: sum(r["stats"].get(k, 0) for r in runs) for k in ("papers_indexed", "chunks", "windows", "tokens")}
    state.update(
        totals,
        load_s=runs[0]["load_s"],
        index_s=sum(r["index_s"] for r in runs),
        parts_total=len(files),
        bulk_load=a.bulk_load,
    )
    saved.save()
    left = len(files) - len(state["parts_done"])
    say(
        f"index: {len(run['parts'])} parts ({run['stats']['chunks']:,} chunks) in {run['index_s']:.0f} s"
        + (f", built in {run['build_s']:.0f} s" if "build_s" in run else "")
        + (f"; {left} of {len(files)} parts left: run --phase index again" if left else "; every part is written")
    )


# search ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> dict[str, float]:
    """The process's resident memory: all of it, its peak, and the anonymous (heap, models) and
    file-backed (the index's memory-mapped pages it touched) parts."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    keys = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}
    return {name: round(int(status[k].split()[0]) / 1024) for k, name in keys.items() if k in status}


def disk_gib(path: Path) -> dict[str, float]:
    """Allocated bytes under each top-level folder of the index, and in all."""
    out = {
        d.name: sum(f.stat().st_blocks * 512 for f in d.rglob("*") if f.is_file()) / 2**30
        for d in sorted(path.iterdir())
        if d.is_dir()
    }
    return {k: round(v, 2) for k, v in {**out, "total": sum(out.values())}.items()}


def timed_gets(client: Any, params: Sequence[dict], warm_up: int) -> dict[str, Any]:
    """GET /search with each params in turn (the first `warm_up` untimed): p50/p95/mean ms, errors."""
    times, errors = [], []
    for i, p in enumerate(params):
        t = time.perf_counter()
        r = client.get("/search", params=p)
        ms = (time.perf_counter() - t) * 1e3
        if r.status_code != 200:
            errors.append(f"{r.status_code} {r.text[:200]}")
        elif i >= warm_up:
            times.append(ms)
    if not times:
        return {"errors": len(errors), "first_error": errors[0] if errors else None}
    q = statistics.quantiles(times, n=20) if len(times) > 1 else times * 19
    return {
        "n": len(times),
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(q[18], 2),
        "mean_ms": round(statistics.fmean(times), 2),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def search_runs(modes: bool) -> list[tuple[str, dict[str, Any]]]:
    """(row name, extra GET /search params) of each latency row."""
    flat = [(m, {"mode": m}) for m in ("dense", "hybrid", "lexical")] if modes else [("dense", {})]
    return flat + [
        ("grouped, 10 papers x 3", {"group_by_paper": "true", "k": 10, "group_size": 3}),
        ("reranked, 50 candidates", {"rerank": "true", "candidates": 50}),
    ]


def phase_search(a: argparse.Namespace, saved: Saved) -> None:
    import httpx

    from indexer.config import Settings

    if "build_s" not in saved["index"]:
        raise SystemExit("the index is not built yet: run --phase index until it says every part is written")
    queries = json.loads((a.work / "queries.json").read_text())[: a.queries]
    port = free_port()
    fields = settings_for(a, saved, "index")
    env = {**os.environ, **env_of(fields), "PYTHONPATH": str(ROOT)}
    log = (a.work / "server.log").open("w")
    t0 = time.perf_counter()
    srv = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    out = saved["search"]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            while True:
                if srv.poll() is not None:
                    raise SystemExit(f"the server exited ({srv.returncode}); see {a.work / 'server.log'}")
                try:
                    if c.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() - t0 > 600:
                    raise SystemExit(f"the server was not ready in 600 s; see {a.work / 'server.log'}")
                time.sleep(0.25)
            out["ready_s"] = round(time.perf_counter() - t0, 1)
            out["rss_ready_mib"] = rss_mib(srv.pid)
            names = {p["name"] for p in c.get("/openapi.json").json()["paths"]["/search"]["get"]["parameters"]}
            out["modes"] = "mode" in names
            out["default_mode"] = Settings(**fields).search_mode if out["modes"] else "dense"
            out["rows"] = {}
            for name, extra in search_runs(out["modes"]):
                params = [{"q": queries[i % len(queries)], "k": 10, **extra} for i in range(a.warm_up + a.requests)]
                out["rows"][name] = timed_gets(c, params, a.warm_up)
                say(f"search {name}: {out['rows'][name]}")
            out["rss_mib"] = rss_mib(srv.pid)
    finally:
        srv.terminate()
        try:
            srv.wait(60)
        except subprocess.TimeoutExpired:
            srv.kill()
        log.close()
    out["disk_gib"] = disk_gib(a.work / "index")
    out["chunks"] = saved["index"].get("chunks")
    saved.save()


# recall ----------------------------------------------------------------------------------------------


class Windows:
    """Every chunk's window vectors as the pipeline writes them (a tap on the store), by point id."""

    def __init__(self) -> None:
        from indexer.store import chunk_point_id

        self.point_id = chunk_point_id
        self.ids: list[str] = []
        self.parts: list[np.ndarray] = []
        self.counts: list[int] = []

    def __call__(self, entries: Sequence) -> None:
        for e in entries:
            for c, v in zip(e.chunks, e.vectors):
                self.ids.append(self.point_id(e.paper.paper_id, c.chunk_index))
                self.parts.append(np.asarray(v, dtype=np.float32).reshape(-1, v.shape[-1]))
                self.counts.append(len(self.parts[-1]))


def recall_at(truth: np.ndarray, found: np.ndarray) -> float:
    """Mean over queries of |found top 10 ∩ truth top 10| / 10 (rows of chunk numbers; -1: none)."""
    return float(np.mean([len(set(t.tolist()) & set(f.tolist()) - {-1}) / len(t) for t, f in zip(truth, found)]))


def best_of(scores: Any, rows: Any, top: int) -> Any:
    """The `top` rows (chunk numbers) of each query by score; ties go to the lower chunk number, so
    that an exact ranking and a two-stage one over the same chunks agree."""
    by_row = rows.argsort(dim=1)
    scores, rows = scores.gather(1, by_row), rows.gather(1, by_row)
    return rows.gather(1, scores.sort(dim=1, descending=True, stable=True).indices[:, :top])


def brute_force(
    q: Any, w: Any, owner: Any, n_chunks: int, ks: Sequence[int], engine: dict[str, np.ndarray], top: int, batch: int
) -> dict[str, Any]:
    """Exact MaxSim over every window of every chunk, and against it: the two-stage top `top` by each
    pooled vector and depth K (the K best chunks by the pooled vector, rescored by MaxSim), and the
    engine's hits (chunk numbers, -1 for none). Also how ambiguous each query's top 10 is: the chunks
    within TIE_MARGIN of its 10th best, and the share of the engine's hits that are (a miss there
    may be a near-tie rather than a worse chunk)."""
    import torch

    counts = torch.bincount(owner, minlength=n_chunks).clamp(min=1).unsqueeze(1)
    mean = torch.zeros(n_chunks, w.shape[1], device=w.device).index_add_(0, owner, w) / counts
    pooled = {"mean": mean, "normalised mean": torch.nn.functional.normalize(mean, dim=1)}
    truth, close = [], []
    two_stage: dict[str, list] = {f"{p} K={k}": [] for p in pooled for k in ks}
    near: dict[str, list] = {name: [] for name in engine}
    for at in range(0, len(q), batch):
        qb = q[at : at + batch]
        best = torch.full((len(qb), n_chunks), -torch.inf, device=w.device)
        best.scatter_reduce_(1, owner.expand(len(qb), -1), qb @ w.T, "amax")
        idx = best_of(best, torch.arange(n_chunks, device=w.device).expand(len(qb), -1), top)
        tenth = best.gather(1, idx[:, -1:]) - TIE_MARGIN
        truth.append(idx.cpu())
        close.append((best >= tenth).sum(1).cpu())
        for name, p in pooled.items():
            order = (qb @ p.T).topk(min(max(ks), n_chunks), dim=1).indices
            for k in ks:
                cand = order[:, :k]
                two_stage[f"{name} K={k}"].append(best_of(best.gather(1, cand), cand, top).cpu())
        for name, rows in engine.items():
            r = torch.from_numpy(rows[at : at + batch]).to(w.device)
            near[name].append(((best.gather(1, r.clamp(min=0)) >= tenth) & (r >= 0)).float().mean(1).cpu())
    exact = torch.cat(truth).numpy()
    return {
        "close_chunks_median": float(torch.cat(close).float().median()),
        "brute_force": {key: round(recall_at(exact, torch.cat(v).numpy()), 4) for key, v in two_stage.items()},
        "engine": {
            name: {
                "recall@10": round(recall_at(exact, rows), 4),
                "within_margin_of_10th": round(float(torch.cat(near[name]).mean()), 4),
            }
            for name, rows in engine.items()
        },
    }


def engine_top(
    fields: dict[str, Any], qv: np.ndarray, ks: Sequence[int], top: int, row_of: dict[str, int]
) -> dict[str, tuple[np.ndarray, float]]:
    """The engine's dense search over the built index (the store alone: no query encoding, no HTTP),
    two-stage at each prefetch depth K: each query's top `top` as chunk numbers (-1: none), and the
    median ms per query."""
    from indexer.config import Settings
    from indexer.store import open_store

    try:
        from indexer.store import SearchQuery
    except ImportError:  # an index of one dense vector a chunk: no prefetch to vary
        SearchQuery = None  # noqa: N806
    depths = {f"K={k}": k for k in ks} if SearchQuery is not None else {"(no prefetch in this build)": 0}
    store = open_store(Settings(**fields))
    out = {}
    try:
        for name, k in depths.items():
            found, times = [], []
            for v in qv:
                query = SearchQuery(vector=v, mode="dense", prefetch=k) if SearchQuery is not None else v
                t = time.perf_counter()
                hits = store.search(store.chunks, query, top)
                times.append(time.perf_counter() - t)
                rows = [row_of.get(h.id, -1) for h in hits]
                found.append(rows + [-1] * (top - len(rows)))
            out[name] = (np.array(found), statistics.median(times) * 1e3)
    finally:
        store.close()
    return out


def phase_recall(a: argparse.Namespace, saved: Saved) -> None:
    import torch

    from indexer.encode import PassageEncoder

    if not a.recall_model:
        raise SystemExit("--recall-model: a sentence-transformers folder with real weights (.models/minilm-fp16)")
    files = parts(a.work)
    papers_per_part = max(1, saved["prepare"]["papers"] // len(files))
    files = files[: max(1, math.ceil(a.recall_papers / papers_per_part))] if a.recall_papers else files
    fields = settings_for(a, saved, "recall-index", passage_model=a.recall_model, reranker_model="")
    shutil.rmtree(fields["qdrant_path"], ignore_errors=True)  # every chunk written in this run: the tap sees them all
    windows = Windows()
    run = index_corpus(fields, files, None, tap=windows)
    queries = json.loads((a.work / "queries.json").read_text())[: a.recall_queries]
    ks = sorted(a.prefetch)
    qv = PassageEncoder(a.recall_model, device=a.device, graphs=False).encode_queries(queries)
    engine = engine_top(fields, qv, ks, 10, {pid: i for i, pid in enumerate(windows.ids)})
    device = torch.device("cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu")
    w = torch.from_numpy(np.concatenate(windows.parts)).to(device)
    windows.parts.clear()
    owner = torch.repeat_interleave(torch.arange(len(windows.counts)), torch.tensor(windows.counts)).to(device)
    t = time.perf_counter()
    hits = {k: rows for k, (rows, _) in engine.items()}
    found = brute_force(torch.from_numpy(qv).to(device), w, owner, len(windows.ids), ks, hits, 10, a.exact_batch)
    out = saved["recall"]
    out.update(
        found,
        model=a.recall_model,
        papers=run["stats"]["papers_indexed"],
        chunks=len(windows.ids),
        windows=int(w.shape[0]),
        dim=int(w.shape[1]),
        queries=len(queries),
        device=str(device),
        exact_s=round(time.perf_counter() - t, 1),
        close_margin=TIE_MARGIN,
        index={"load_s": run["load_s"], "index_s": run["index_s"], "build_s": run.get("build_s")},
    )
    for name, (_, ms) in engine.items():
        out["engine"][name]["store_ms_p50"] = round(ms, 2)
    # Each chunk shard prefetches its own top K: the engine rescores up to shards x K chunks.
    out["chunk_shards"] = len(list(Path(fields["qdrant_path"]).glob("chunks*")))
    saved.save()
    say(f"recall: {json.dumps(out)}")


# the table -------------------------------------------------------------------------------------------


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def _met(ok: bool | None) -> str:
    return "-" if ok is None else "yes" if ok else "**no**"


def table(d: dict[str, Any]) -> str:
    """The one table: every row of every phase, "-" where not measured yet."""
    p, ix, se, rc = (d.get(k, {}) for k in ("prepare", "index", "search", "recall"))
    rows: list[tuple[str, str, str, str, str]] = []
    chunks = ix.get("chunks")
    corpus = (
        (
            f"{p['papers']:,} papers x {p['words_per_paper']:,} words, {p['corpus_gib']} GiB JSONL; prose pool "
            f"{p['pool_words']:,} words ({p['repeats']}x)"
        )
        if p
        else "-"
    )
    rows.append(("corpus", corpus, "", "", "pseudo-papers of real prose (`--phase prepare`)"))
    if ix:
        per = f" ({ix['windows'] / chunks:.2f} and {ix['tokens'] / chunks:.0f} a chunk)" if chunks else ""
        rows.append(
            (
                "chunks / windows / passage tokens",
                f"{_fmt(chunks)} / {_fmt(ix.get('windows'))} / {_fmt(ix.get('tokens'))}{per}",
                "",
                "",
                f"{ix.get('papers_indexed', 0):,} papers in {len(ix.get('runs', []))} command(s)",
            )
        )
    index_s, build_s, load_s = ix.get("index_s"), ix.get("build_s"), ix.get("load_s")
    rate = f" ({chunks / index_s:,.0f} chunks/s)" if chunks and index_s else ""
    rows += [
        ("model load", _fmt(load_s, " s"), "", "", "random weights of the real shapes; the first command's"),
        (
            "read + encode + write (pipelined)",
            _fmt(index_s, " s") + rate,
            "",
            "",
            "`Indexer.index` in the store's parallel writes",
        ),
        (
            "build (after the last write)",
            _fmt(build_s, " s"),
            "",
            "",
            f"`finish_bulk`; bulk load {ix.get('bulk_load', '-')}",
        ),
    ]
    total = load_s + index_s + build_s if None not in (load_s, index_s, build_s) else None
    rows.append(
        (
            "**JSONL → searchable**",
            _fmt(total, " s"),
            f"< {SEARCHABLE_TARGET_S} s",
            _met(None if total is None else total < SEARCHABLE_TARGET_S),
            "model load + the two above",
        )
    )
    rows.append(
        ("service start → ready", _fmt(se.get("ready_s"), " s"), "", "", "`paperindex serve` on the built index")
    )
    for name, r in (se.get("rows") or {name: {} for name, _ in search_runs(True)}).items():
        target = P50_RERANK_TARGET_MS if name.startswith("reranked") else P50_TARGET_MS
        p50 = r.get("p50_ms")
        err = f"; {r['errors']} errors: {r['first_error']}" if r.get("errors") else ""
        if name.startswith(("grouped", "reranked")):
            name += f" ({se.get('default_mode', 'default')} mode)"
        rows.append(
            (
                f"GET /search {name}: p50 / p95",
                f"{_fmt(p50)} / {_fmt(r.get('p95_ms'))} ms",
                f"p50 < {target:g} ms",
                _met(None if p50 is None else p50 < target),
                f"{r.get('n', '-')} requests, k 10, query encoding in{err}",
            )
        )
    rss, disk = se.get("rss_mib") or {}, se.get("disk_gib") or {}
    rows.append(
        (
            "server RSS (anon + file)",
            f"{_fmt(rss.get('rss'))} MiB ({_fmt(rss.get('anon'))} + {_fmt(rss.get('file'))})" if rss else "-",
            "",
            "",
            "after the queries; file: the index's mapped pages touched",
        )
    )
    rows.append(
        (
            "index on disk",
            _fmt(disk.get("total"), " GiB"),
            "",
            "",
            ", ".join(f"{k} {v}" for k, v in disk.items() if k != "total") or "-",
        )
    )
    if rc:
        rows.append(
            (
                "recall corpus",
                f"{rc['chunks']:,} chunks, {rc['windows']:,} windows of {rc['dim']}-d",
                "",
                "",
                f"{rc['model']} (real weights); {rc['queries']} held-out sentences; median "
                f"{rc['close_chunks_median']:.0f} chunks within {rc['close_margin']} of a query's 10th best",
            )
        )
        ri = rc["index"]
        rows.append(
            (
                "recall index: read + encode + write / build",
                f"{_fmt(ri['index_s'], ' s')} / {_fmt(ri['build_s'], ' s')}",
                "",
                "",
                f"the same corpus through the pipeline with {rc['dim']}-d real weights",
            )
        )
        for name, e in rc["engine"].items():
            rows.append(
                (
                    f"recall@10, engine two-stage {name}",
                    _fmt(e["recall@10"]),
                    f">= {RECALL_TARGET}",
                    _met(e["recall@10"] >= RECALL_TARGET),
                    f"the store's dense search, K per chunk shard ({rc.get('chunk_shards', '-')}); "
                    f"{e['within_margin_of_10th']:.3f} of its hits within the margin; "
                    f"{_fmt(e['store_ms_p50'])} ms p50 (vector search alone)",
                )
            )
        for key, v in rc["brute_force"].items():
            rows.append(
                (
                    f"recall@10, brute-force prefetch by {key}",
                    _fmt(v),
                    f">= {RECALL_TARGET}",
                    _met(v >= RECALL_TARGET),
                    "exact top K by the pooled vector, rescored by MaxSim (no HNSW)",
                )
            )
    else:
        rows.append(("recall@10, two-stage vs exact MaxSim", "-", f">= {RECALL_TARGET}", "-", "`--phase recall`"))
    lines = ["| measurement | value | target | met | how |", "|---|---|---|---|---|"]
    return "\n".join(lines + [f"| {' | '.join(r)} |" for r in rows])


# -----------------------------------------------------------------------------------------------------


def release() -> None:
    """What a phase left on the GPU (its models, CUDA graphs), for the next phase of this process."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# a run longer than one command ---------------------------------------------------------------------


def start_background(argv: list[str], work: Path) -> None:
    """This command without --background/--follow, in a session of its own (it outlives the command
    that started it, on a machine that stays up), its output in work/run.log and its exit status in
    work/run.rc when it ends."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("run.log", "run.rc"):
        (work / name).unlink(missing_ok=True)
    keep, skip = [], False
    for arg in argv:  # its figures go to the work folder (--follow copies them out), not to this command's $OUT
        if skip:
            skip = False
        elif arg in ("--background", "--follow", "--out", "--work"):
            skip = arg != "--background"
        elif not arg.startswith(("--follow=", "--out=", "--work=")):
            keep.append(arg)
    child = [
        sys.executable,
        "-u",
        str(Path(__file__).resolve()),
        *keep,
        "--feed-s",
        "0",
        "--work",
        str(work),
        "--out",
        str(work),
    ]
    cmd = " ".join(shlex.quote(x) for x in child)
    rc = shlex.quote(str(work / "run.rc"))
    with (work / "run.log").open("w") as log:
        subprocess.Popen(
            ["sh", "-c", f"{cmd}; echo $? > {rc}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    say(f"started in the background: {cmd}")


def follow(work: Path, out: Path, seconds: float) -> int:
    """Print what the background run writes for up to `seconds`, or until it ends; then copy its
    figures and log to `out`. 0: it ended well; 3: it still runs (follow again); else its exit status."""
    log, rc = work / "run.log", work / "run.rc"
    if not log.is_file():
        raise SystemExit(f"no background run in {work}: start one with --background (a fresh machine has lost it)")
    end, at = time.monotonic() + seconds, 0
    while True:
        with log.open("rb") as f:
            f.seek(at)
            new = f.read()
        at += len(new)
        if new:
            sys.stdout.write(new.decode(errors="replace"))
            sys.stdout.flush()
        if rc.is_file() or time.monotonic() > end:
            break
        time.sleep(5)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("scale.json", "scale.md", "run.log", "server.log"):
        if (work / name).is_file() and (work / name).resolve() != (out / name).resolve():
            shutil.copyfile(work / name, out / name)
    if not rc.is_file():
        say("\nstill running: follow again at once (python bench/scale.py --follow 540 --out $OUT)")
        return 3
    return int(rc.read_text().strip() or 1)


def main() -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--phase",
        nargs="+",
        choices=[*PHASES, "report", "all"],
        help="one or more, run in the order prepare, index, search, recall",
    )
    ap.add_argument(
        "--background",
        action="store_true",
        help="run the phases in a process of their own that outlives this command (no --feed-s limit)",
    )
    ap.add_argument(
        "--follow",
        type=float,
        metavar="S",
        help="print the background run's output for up to S seconds, then copy its figures to --out",
    )
    ap.add_argument("--work", type=Path, default=ROOT / "paperindex_data" / "scale", help="the phases' shared folder")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or ROOT / "paperindex_data" / "scale"),
        help="where scale.md and scale.json go ($OUT by default)",
    )
    ap.add_argument("--device", default="auto", help="PAPERINDEX_DEVICE of every phase")
    g = ap.add_argument_group("prepare")
    g.add_argument("--papers", type=int, default=12_000)
    g.add_argument("--chunks-per-paper", type=int, default=100, help="sets the words per paper (1.2 M chunks in all)")
    g.add_argument("--part-papers", type=int, default=250, help="papers per JSONL part (the unit --feed-s stops at)")
    g.add_argument(
        "--prose",
        choices=["all", "stdlib"],
        default="all",
        help="docstrings of site-packages too, or the stdlib's only",
    )
    g.add_argument("--tiny", action="store_true", help="tiny random models (2 layers of 64) for a smoke run on a CPU")
    g.add_argument("--workers", type=int, help="processes that make the corpus (default: every core)")
    g.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("index")
    g.add_argument(
        "--feed-s",
        type=float,
        default=420,
        help="take no new part once the command has run this many seconds (0: take all)",
    )
    g.add_argument("--max-parts", type=int, help="take at most this many parts in one command")
    g.add_argument(
        "--bulk-load",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="PAPERINDEX_BULK_LOAD (docs/deployment.md: for a first load of 1M+ chunks)",
    )
    g = ap.add_argument_group("search")
    g.add_argument("--queries", type=int, default=200, help="distinct queries (held-out sentences)")
    g.add_argument("--requests", type=int, default=200, help="timed requests per row")
    g.add_argument("--warm-up", type=int, default=10, help="untimed requests before each row")
    g = ap.add_argument_group("recall")
    g.add_argument("--recall-model", help="a sentence-transformers folder with real weights (e.g. .models/minilm-fp16)")
    g.add_argument("--recall-papers", type=int, help="index only the first N papers' parts (default: all)")
    g.add_argument("--recall-queries", type=int, default=500)
    g.add_argument("--prefetch", type=int, nargs="+", default=[50, 100, 200, 400, 800], help="prefetch depths K")
    g.add_argument("--exact-batch", type=int, default=32, help="queries per brute-force pass")
    a = ap.parse_args()
    a.work = a.work.resolve()
    if a.background:
        if not a.phase:
            ap.error("--background needs --phase")
        start_background(sys.argv[1:], a.work)
    if a.background or a.follow is not None:
        sys.exit(follow(a.work, a.out, a.follow or 0))
    if not a.phase:
        ap.error("--phase, or --follow")
    import transformers

    transformers.logging.set_verbosity_error()  # random-weight models: no warnings about untrained heads
    saved = Saved(a.work, a.out)
    phases = PHASES if "all" in a.phase else [p for p in PHASES if p in a.phase]
    for phase in phases:
        if phase == "prepare":
            phase_prepare(a, saved)
        elif phase == "index":
            phase_index(a, saved, started)  # the feed deadline counts from the command's start
        elif phase == "search":
            phase_search(a, saved)
        else:
            phase_recall(a, saved)
        saved.save()
        release()
    say("\n" + table(saved.data))
    say(f"\n{' '.join(a.phase)}: {time.perf_counter() - started:.0f} s; figures in {a.out / 'scale.json'}")


if __name__ == "__main__":
    main()
