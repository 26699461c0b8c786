"""Where an indexing run's time went, from a result file of bench/index_throughput.py.

Each row's `timeline.spans` holds every stage call (plan, tokenize, encode, write) with its thread
and its start and end in seconds from the run's start. Per row this prints, for each GPU (its two
encoder threads, `encode-2g` and `encode-2g+1` with the default two per GPU), the share of the run
with no thread, one or both encoding; then second by second how many threads of each stage were busy;
and when each encoder thread started its first group and ended its last (the run's fill and drain).

    python bench/timeline.py bench/results/h100_x4_in_flight.json [--row 1] [--per-gpu 2]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

# The stages as results from before their renaming call them.
OLD_NAMES = {"plan": "select", "tokenize": "prepare"}


def busy_counts(spans: list, t: np.ndarray) -> np.ndarray:
    """How many of `spans` ((stage, thread, start, end)) run at each time of `t`."""
    c = np.zeros_like(t)
    for _, _, a, b in spans:
        c[(t >= a) & (t < b)] += 1
    return c


def report(row: dict, per_gpu: int, step: float = 0.01) -> str:
    spans = row.get("timeline", {}).get("spans")
    if not spans:
        return f"{row['run']}: no spans (a result from before they were recorded)"
    t = np.arange(0.0, row["seconds"], step)
    by_stage = defaultdict(list)
    for s in spans:
        by_stage[OLD_NAMES.get(s[0], s[0])].append(s)
    enc = by_stage["encode"]
    threads = sorted({s[1] for s in enc}, key=lambda n: int(n.rsplit("-", 1)[1]))
    lines = [f"{row['run']}: {row['chunks_s']:,.0f} chunks/s over {row['seconds']:.1f} s"]
    for g in range(0, len(threads), per_gpu):
        names = set(threads[g : g + per_gpu])
        c = busy_counts([s for s in enc if s[1] in names], t)
        shares = ", ".join(f"{k} encoding {np.mean(c == k):.0%}" for k in range(per_gpu + 1))
        lines.append(f"  GPU {g // per_gpu}: {shares}")
    counts = {stage: busy_counts(by_stage[stage], t) for stage in ("select", "prepare", "encode", "write")}
    lines.append("  second   " + "  ".join(f"{stage:>8}" for stage in counts))
    for a in range(int(np.ceil(row["seconds"]))):
        m = (t >= a) & (t < a + 1)
        lines.append(f"  {a:5d}    " + "  ".join(f"{c[m].mean():8.1f}" for c in counts.values()))
    first = sorted(min(s[2] for s in enc if s[1] == n) for n in threads)
    last = sorted(max(s[3] for s in enc if s[1] == n) for n in threads)
    lines.append(
        f"  encoder threads' first group from {first[0]:.2f} to {first[-1]:.2f} s; "
        f"last group ended from {last[0]:.2f} to {last[-1]:.2f} s"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result", help="a JSON file written by bench/index_throughput.py")
    ap.add_argument("--row", type=int, nargs="*", help="rows to show (from 0; default: all)")
    ap.add_argument("--per-gpu", type=int, default=2, help="encoder threads per GPU in that run")
    args = ap.parse_args()
    with open(args.result) as f:
        data = json.load(f)
    # a file of one run, or of several (before/after: {"runs": {name: run}})
    rows = data["rows"] if "rows" in data else [r for run in data["runs"].values() for r in run["rows"]]
    for i in args.row if args.row is not None else range(len(rows)):
        print(report(rows[i], args.per_gpu), end="\n\n")


if __name__ == "__main__":
    main()
