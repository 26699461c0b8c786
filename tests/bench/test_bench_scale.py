"""bench/scale.py (the 1.2 M-chunk benchmark, run on a GPU host): its brute-force recall against a
hand-worked case, the corpus it makes, and (slow) every phase at toy size on a CPU, so that a GPU run
does not die on a mistake the CPU could have shown."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from support import ROOT


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its corpus writers are pickled by name into worker processes
    spec.loader.exec_module(module)
    return module


def test_brute_force_recall_by_hand(scale):
    import torch

    # Chunk 0: windows e1 and e2 (MaxSim 1.0 for the query e1, mean 0.5); chunk 1: one window at 0.9;
    # chunk 2: one window at -1. Exact top 2: chunks 0 and 1. The mean prefetches chunk 1 first, so
    # K=1 keeps one of the two, K=2 both.
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.0, -1.0]])
    owner = torch.tensor([0, 0, 1, 2])
    q = torch.tensor([[1.0, 0.0]])
    engine = {"hits 0 and 2": np.array([[0, 2]]), "one hit": np.array([[1, -1]])}
    out = scale.brute_force(q, w, owner, 3, [1, 2, 3], engine, top=2, batch=1)
    assert out["brute_force"]["mean K=1"] == 0.5
    assert out["brute_force"]["mean K=2"] == 1.0
    assert out["brute_force"]["mean K=3"] == 1.0
    assert out["engine"]["hits 0 and 2"] == {"recall@10": 0.5, "within_margin_of_10th": 0.5}
    assert out["engine"]["one hit"] == {"recall@10": 0.5, "within_margin_of_10th": 0.5}  # no hit is not a near-tie
    assert out["close_chunks_median"] == 2  # chunks 0 and 1 score within the margin of the 2nd best


def test_ties_rank_alike_in_both_searches(scale):
    import torch

    # Every chunk has the window e1 (MaxSim 1 for the query e1: a six-way tie) and -0.1 c x e1, so the
    # mean prefetches them in order, 0 first; the tie goes to chunks 0 and 1 in both rankings (torch's
    # topk alone gave others: recall 0).
    w = torch.tensor([[1.0, 0.0]] * 6 + [[-0.1 * c, 0.0] for c in range(6)])
    owner = torch.tensor(list(range(6)) * 2)
    out = scale.brute_force(torch.tensor([[1.0, 0.0]]), w, owner, 6, [6], {}, top=2, batch=1)
    assert out["brute_force"] == {"mean K=6": 1.0, "normalised mean K=6": 1.0}
    assert out["close_chunks_median"] == 6


def test_corpus_has_the_chunks_asked_for(scale, tmp_path):
    from indexer.chunking import chunk_words

    pool = [" ".join(f"w{i}x{j}" for j in range(30)) for i in range(50)]
    words = scale.CHUNK_WORDS + 2 * (scale.CHUNK_WORDS - scale.CHUNK_OVERLAP)  # three chunks
    files = scale.write_corpus(tmp_path, pool, papers=7, words=words, part_papers=3, workers=2, seed=1)
    papers = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert [len(f.read_text().splitlines()) for f in files] == [3, 3, 1]
    assert len({p["paper_id"] for p in papers}) == 7
    assert {len(chunk_words(p["text"], scale.CHUNK_WORDS, scale.CHUNK_OVERLAP)) for p in papers} == {3}


def test_query_is_a_first_sentence(scale):
    assert scale.query_of("Return the sum of the items. Raise ValueError if empty.") == "Return the sum of the items."
    assert scale.query_of("See below. " + " ".join(f"w{i}" for i in range(40))).split() == ["See", "below."] + [
        f"w{i}" for i in range(18)
    ]  # too short: the first 20 words instead


@pytest.mark.slow
def test_every_phase_on_a_cpu(tmp_path):
    """prepare + index (three commands: the first takes no part, its time is up; the second one part;
    the third the rest, and builds), search, recall (the tiny passage model standing in for real
    weights; in the background, followed), report."""
    work, out = tmp_path / "work", tmp_path / "out"

    def run(*args: str) -> str:
        cmd = [
            sys.executable,
            str(ROOT / "bench" / "scale.py"),
            "--work",
            str(work),
            "--out",
            str(out),
            "--device",
            "cpu",
            *args,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    assert "3 of 3 parts left" in run(
        "--phase",
        "prepare",
        "index",
        "--papers",
        "12",
        "--chunks-per-paper",
        "2",
        "--part-papers",
        "4",
        "--tiny",
        "--prose",
        "stdlib",
        "--feed-s",
        "0.001",
    )
    assert "2 of 3 parts left" in run("--phase", "index", "--feed-s", "0", "--max-parts", "1")
    assert "every part is written" in run("--phase", "index", "--feed-s", "0")
    run("--phase", "search", "--queries", "5", "--requests", "5", "--warm-up", "1")
    model = json.loads((work / "scale.json").read_text())["prepare"]["models"]["passage_model"]
    # in a process of its own (as a GPU host's run longer than one command), followed to its end
    run(
        "--phase",
        "recall",
        "--recall-model",
        model,
        "--recall-queries",
        "8",
        "--prefetch",
        "2",
        "100",
        "--background",
        "--follow",
        "600",
    )
    table = run("--phase", "report")
    figures = json.loads((out / "scale.json").read_text())
    assert figures["index"]["chunks"] >= 24 and figures["index"]["build_s"] >= 0  # 12 x 2, and heads as passages
    assert all(r["errors"] == 0 and r["n"] == 5 for r in figures["search"]["rows"].values())
    assert figures["search"]["disk_gib"]["total"] >= 0 and figures["search"]["rss_mib"]["rss"] > 0
    assert figures["recall"]["chunks"] == figures["index"]["chunks"]  # every chunk written was seen
    assert figures["recall"]["brute_force"]["mean K=100"] == 1.0  # K above the chunks: exact
    assert "| **JSONL → searchable** |" in table and (out / "scale.md").read_text().strip() in table


@pytest.mark.gpu
def test_every_phase_on_a_gpu(tmp_path):
    """The GPU run's code paths (CUDA graphs, the service on the GPU, brute force in GPU memory) at toy
    size, a minute or two before the 1.2 M-chunk run: `python -m pytest tests/bench/test_bench_scale.py -m gpu`."""
    work = tmp_path / "work"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "scale.py"),
        "--work",
        str(work),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cuda",
        "--phase",
        "prepare",
        "index",
        "search",
        "--papers",
        "24",
        "--chunks-per-paper",
        "4",
        "--part-papers",
        "8",
        "--tiny",
        "--prose",
        "stdlib",
        "--queries",
        "10",
        "--requests",
        "10",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    model = json.loads((work / "scale.json").read_text())["prepare"]["models"]["passage_model"]
    cmd = [*cmd[:8], "--phase", "recall", "--recall-model", model, "--recall-queries", "20", "--prefetch", "5", "200"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads((work / "scale.json").read_text())
    assert all(r["errors"] == 0 for r in figures["search"]["rows"].values())
    assert figures["recall"]["device"].startswith("cuda") and figures["recall"]["brute_force"]["mean K=200"] == 1.0
