"""Crash/resume: `paperindex index` killed -9 at random points over several seeds, then rerun; the index
must end exactly right every time.

Per seed, two phases on one embedded index: the first index of a corpus, then a re-index of a changed
version of it (papers longer, shorter, retitled, new). Each phase is killed 1-3 times at random
progress (a kill may land while an earlier kill is being resumed), then run to the end and audited
point by point (tests/support/reliability.py `audit`: counts, no duplicate (paper_id, chunk_index),
every paper's chunks all present with their current text, nothing stale).

    python bench/crash_resume.py --tiny                 # tiny random models built on the fly (CPU, offline)
    python bench/crash_resume.py --seeds 20 --papers 200
    python bench/crash_resume.py                        # the models in PAPERINDEX_* (as configured)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from indexer.config import Settings  # noqa: E402
from indexer.store import EdgeStore  # noqa: E402

from support.papers import write_jsonl  # noqa: E402
from support.reliability import audit, corpus_versions, crash_and_resume, final_state, settings_env  # noqa: E402

TINY = dict(window_tokens=48, window_overlap=8, chunk_words=120, chunk_overlap=20, token_budget=4096, device="cpu")


def tiny_settings(root: Path) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from support.tiny_models import build_all

    return build_all(root / "models") | TINY


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--papers", type=int, default=60, help="papers in the first version of each corpus")
    ap.add_argument("--batch", type=int, default=2, help="papers per batch (each batch is a commit point)")
    ap.add_argument(
        "--tiny", action="store_true", help="build tiny random models (offline) instead of PAPERINDEX_* models"
    )
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()

    runs = []
    with tempfile.TemporaryDirectory(prefix="crash-resume-") as tmp:
        root = Path(tmp)
        overrides = tiny_settings(root) if args.tiny else {}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            rng = random.Random(seed)
            s = Settings(**overrides, qdrant_path=root / f"index-{seed}", papers_per_batch=args.batch)
            env = settings_env(s)
            v1, v2 = corpus_versions(seed, args.papers)
            for phase, papers, expected in (("index", v1, final_state(v1)), ("re-index", v2, final_state(v1, v2))):
                path = write_jsonl(root / f"{seed}-{phase}.jsonl", papers)
                res = crash_and_resume(env, path, len(papers), kills=rng.randint(1, 3), rng=rng)
                store = EdgeStore(s.qdrant_path)
                try:
                    a = audit(store, expected, s.chunk_words, s.chunk_overlap)
                finally:
                    store.close()
                final = res["final_run"]
                runs.append(
                    {
                        "seed": seed,
                        "phase": phase,
                        "papers": len(papers),
                        "killed_at": res["killed_at"],
                        "resumed_unchanged": final["papers_unchanged"],
                        "resumed_indexed": final["papers_indexed"],
                        "points": {"papers": a.papers, "chunks": a.chunks},
                        "seconds": round(res["seconds"], 1),
                        "exact": a.exact,
                        "problems": a.problems[:10],
                    }
                )
                if not args.json:
                    r = runs[-1]
                    print(
                        f"seed {seed:3d} {phase:9s} {len(papers):4d} papers  "
                        f"killed at {str(r['killed_at']):16s} resumed: "
                        f"{r['resumed_unchanged']:4d} skipped, {r['resumed_indexed']:4d} written  "
                        f"{a.papers:4d} papers / {a.chunks:5d} chunks  "
                        f"{'exact' if a.exact else 'WRONG: ' + '; '.join(a.problems[:3])}  ({r['seconds']}s)",
                        flush=True,
                    )
    kills = sum(len(r["killed_at"]) for r in runs)
    summary = {"runs": runs, "kills": kills, "exact": sum(r["exact"] for r in runs), "total": len(runs)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['exact']}/{summary['total']} runs exact after {kills} kill -9s "
            f"({args.seeds} seeds, {args.papers} papers, batches of {args.batch})"
        )
    return 0 if summary["exact"] == summary["total"] else 1


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)
    sys.exit(code)
