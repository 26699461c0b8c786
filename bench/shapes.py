"""The CUDA graph shapes an indexing run meets, and when it captures them: no GPU needed.

    python bench/shapes.py --papers 8000 --gpus 1 4
    python bench/shapes.py --papers 8000 --gpus 1 4 --share off on --capture-after 2 3 --heads-rows 16 32
    python bench/shapes.py --papers 8000 --gpus 1 4 --windows sorted unpadded
    python bench/shapes.py --papers 3000 --gpus 1 4 --windows unpadded --pieces 64 128 256   # the pieces' size

Each (rows, width, padded) batch shape an encoder meets is captured as a CUDA graph the second time
it comes (`runner.CAPTURE_AFTER`), and a capture holds its GPU's work back for ~0.2-0.35 s. This
replays the batch plans of a run on the throughput corpus (bench/corpus.py, the benchmark's own
WordPiece vocabularies, as bench/index_throughput.py builds them) without running a model: the groups
of papers as the pipeline cuts them (`grouping.groups`), dealt to the GPUs in turn, each group's paper
heads (`PaperEncoder`, one per GPU) and passage windows (`PassageEncoder`: one set of graphs per GPU,
shared by its encoder threads) cut into batches as the encoders cut them. It counts, per encoder, the
shapes met, the captures, and the captures in the second half of the run (where a long run should
have none left), the batches run eagerly before their shape was captured, and the heads' padded
tokens per head token.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import weakref
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def lengths_of(papers: list[dict], window: int, overlap: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per paper: its head's token count (≤ 512, special tokens in) and its windows' widths."""
    import models
    from tokenizers import processors

    from indexer.chunking import chunk_words, window_spans

    sample = [p["text"] for p in papers[:200]]
    passage = models.passage_wordpiece(sample)
    paper = models.paper_wordpiece(sample)
    paper.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", paper.token_to_id("[CLS]")), ("[SEP]", paper.token_to_id("[SEP]"))],
    )
    heads = [
        min(512, len(e.ids))
        for e in paper.encode_batch([p["title"] + "[SEP]" + (p.get("abstract") or "") for p in papers])
    ]
    windows = []
    for p in papers:
        chunks = [c.text for c in chunk_words(p["text"], 512, 50)]
        ws = []
        for e in passage.encode_batch(chunks, add_special_tokens=False):
            width, starts = window_spans(len(e.ids), window, overlap)
            ws += [width + 2] * len(starts)
        windows.append(np.array(ws, dtype=np.int64))
    return [np.array([h]) for h in heads], windows


def window_plans() -> dict[str, dict]:
    """The passage batch plans to compare (BatchRunner's `unpadded`, `pieces`, `row_step`): one
    length-sorted run, rows in powers of two (sorted: before), or batching.WINDOW_BATCHES (unpadded: now)."""
    from indexer.encode.batching import WINDOW_BATCHES

    return {"sorted": dict(unpadded=False, pieces=None, row_step=None), "unpadded": WINDOW_BATCHES}


def plan_windows(encoders, name: str) -> None:
    """Passage encoders (their batch runners) cut their batches by window_plans()[name] from now on."""
    for enc in encoders:
        for k, v in window_plans()[name].items():
            setattr(enc.run, k, v)


# Each paper encoder's head runners by plan name, kept here rather than on the encoder.
_HEAD_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_heads(encoders, name: str) -> list:
    """Paper encoders run their heads packed (as now) or padded (batching.HEAD_BATCHES: before) from
    now on. Each keeps both runners, and with them their CUDA graphs; the runners of `name` come back."""
    out = []
    for enc in encoders:
        runs = _HEAD_RUNS.setdefault(enc, {"packed" if enc.run.packed else "padded": enc.run})
        if name not in runs:
            runs[name] = enc.heads_runner(name == "packed", enc.run.budget, enc.run.graphs)
        enc.run = runs[name]
        out.append(enc.run)
    return out


def plan_keys(
    lengths: np.ndarray,
    budget: int,
    preferred,
    min_fill: float,
    row_step,
    unpadded: bool = False,
    pieces: int | None = None,
) -> list[tuple[int, int, bool]]:
    """The (rows, width, padded) graph shape of each batch the encoders cut `lengths` into."""
    from indexer.encode.batching import bucket_batches, graph_shape

    keys = []
    for idx, w in bucket_batches(lengths, budget, preferred, min_fill=min_fill, unpadded=unpadded, pieces=pieces):
        rows, padded = graph_shape(lengths[idx], w, budget, None if row_step == "pow2" else row_step)
        keys.append((rows, w, padded))
    return keys


def simulate(
    heads,
    windows,
    gpus: int,
    threads: int,
    most: int,
    budget: int,
    window: int,
    head_rows,
    capture_after: int,
    share: bool,
    window_plan: dict,
) -> dict:
    """`share`: a GPU's encoder threads share one set of passage graphs (else each has its own);
    `window_plan`: one of window_plans()."""
    from indexer.chunking import WIDTH_STEP
    from indexer.grouping import groups

    n = len(heads)
    full = window + 2
    widths = (*range(full, full // 2, -WIDTH_STEP), 512)
    seen: dict = {}  # (encoder, key) -> sightings
    captured: list[tuple[str, int]] = []  # (encoder kind, paper index where captured)
    eager: Counter = Counter()  # batches run before their shape was captured
    head_real = head_run = 0
    window_real = window_run = window_padded = 0  # positions: of the windows, run, run in batches with a padding mask
    at = 0
    for k, group in enumerate(groups(range(n), most, gpus, threads if gpus > 1 else 1)):
        gpu, thread = k % gpus, (k // gpus) % threads
        h = np.concatenate([heads[i] for i in group])
        for key in plan_keys(h, budget, (512,), 0.8, head_rows):
            head_run += key[0] * key[1]
            seen[("heads", gpu, key)] = s = seen.get(("heads", gpu, key), 0) + 1
            if s == capture_after:
                captured.append(("heads", at))
            eager["heads"] += s < capture_after
        head_real += int(h.sum())
        w = np.concatenate([windows[i] for i in group])
        window_real += int(w.sum())
        for key in plan_keys(
            w, budget, widths, 0.0, window_plan["row_step"] or "pow2", window_plan["unpadded"], window_plan["pieces"]
        ):
            window_run += key[0] * key[1]
            window_padded += key[0] * key[1] if key[2] else 0
            name = ("passage", gpu, 0 if share else thread, key)
            seen[name] = s = seen.get(name, 0) + 1
            if s == capture_after:
                captured.append(("passage", at))
            eager["passage"] += s < capture_after
        at += len(group)
    out = {}
    for kind, encoders in (("heads", gpus), ("passage", gpus * (1 if share else threads))):
        caps = [i for c, i in captured if c == kind]
        out[kind] = dict(
            encoders=encoders,
            shapes_met=sum(1 for key in seen if key[0] == kind),
            captures=len(caps),
            captures_in_second_half=sum(1 for i in caps if i >= n // 2),
            eager_batches=eager[kind],
        )
    out["heads"]["padded_per_head_token"] = round(head_run / head_real, 3)
    out["passage"].update(
        run_per_window_position=round(window_run / window_real, 4),
        in_padded_batches=round(window_padded / window_run, 3),
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--papers", type=int, default=16000)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=2, help="encoder threads per GPU")
    ap.add_argument(
        "--heads-rows", nargs="+", default=["16"], help="heads' graph rows: multiples of N (16: as now), or pow2"
    )
    ap.add_argument(
        "--share",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="a GPU's encoder threads share one set of passage graphs (on: as now), or each has its own (off: as "
        "before)",
    )
    ap.add_argument(
        "--windows",
        nargs="+",
        choices=["sorted", "unpadded"],
        default=["unpadded"],
        help="passage batches cut from one length-sorted run, rows in powers of two (sorted: as before), or as "
        "batching.WINDOW_BATCHES has them (unpadded: as now)",
    )
    ap.add_argument(
        "--pieces",
        type=int,
        nargs="+",
        help="with --windows unpadded: pieces of N × 2^k rows (each a row; default: batching.WINDOW_BATCHES's)",
    )
    ap.add_argument(
        "--capture-after",
        type=int,
        nargs="+",
        help="a shape is captured the n-th time it comes (default: as the encoders do)",
    )
    ap.add_argument("--budget", type=int, default=262144)
    ap.add_argument("--window", type=int, default=254)
    ap.add_argument("--overlap", type=int, default=16)
    args = ap.parse_args()

    import corpus

    from indexer.encode.runner import CAPTURE_AFTER

    path = corpus.write(Path(tempfile.mkdtemp()) / "corpus.jsonl", args.papers, 8000)
    papers = [json.loads(line) for line in path.open()]
    heads, windows = lengths_of(papers, args.window, args.overlap)
    print(
        f"{args.papers} papers, {sum(len(w) for w in windows)} windows; heads {np.mean([h[0] for h in heads]):.0f} "
        "tokens on average"
    )
    print(
        "| GPUs | passage graphs shared | passage batches | capture at sighting | heads' rows | head captures (2nd "
        "half) | head eager batches "
        "| passage captures (2nd half) | passage eager batches | all captures | head padded / head tokens "
        "| passage positions run / window positions | in padded batches |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    plans = {name: plan for name, plan in window_plans().items() if name != "unpadded"}
    for p in args.pieces or [window_plans()["unpadded"]["pieces"]]:
        plans["unpadded" if not args.pieces else f"unpadded, pieces of {p}"] = dict(
            window_plans()["unpadded"], pieces=p
        )
    chosen = [name for name in plans if name.split(",")[0] in args.windows]
    for gpus in args.gpus:
        most = 128 if gpus > 2 else 256  # as plan.group_papers has it
        for share, plan, after, rows in [
            (sh, pl, a, r)
            for sh in args.share
            for pl in chosen
            for a in (args.capture_after or [CAPTURE_AFTER])
            for r in args.heads_rows
        ]:
            r = simulate(
                heads,
                windows,
                gpus,
                args.threads,
                most,
                args.budget,
                args.window,
                rows if rows == "pow2" else int(rows),
                after,
                share == "on",
                plans[plan],
            )
            h, p = r["heads"], r["passage"]
            print(
                f"| {gpus} | {share} | {plan} | {after} | {rows} | {h['captures']} ({h['captures_in_second_half']}) | "
                f"{h['eager_batches']} | "
                f"{p['captures']} ({p['captures_in_second_half']}) | {p['eager_batches']} | "
                f"{h['captures'] + p['captures']} | "
                f"{h['padded_per_head_token']} | {p['run_per_window_position']} | {p['in_padded_batches']:.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
