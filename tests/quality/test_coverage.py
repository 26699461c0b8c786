import json
import random

import pytest

from indexer.chunking import chunk_words
from indexer.papers import PaperIn
from indexer.quality.coverage import (
    Probe,
    Strategy,
    bucket_of,
    is_hit,
    parse_strategy,
    run_strategy,
    sample_probes,
    score_probes,
    sentences,
)

from support.papers import write_jsonl
from support.tiny_models import WORDS


def test_sentences_spans():
    words = "The cat sat. a dog ran far away. Birds fly high over the hills! Why (not)? End".split()
    # spans: (0, 3) "The cat sat.", (8, 14) "Birds ... hills!", (14, 16) "Why (not)?";
    # "a dog ran far away." starts lower case (not a sentence start); "End" has no end mark
    assert sentences(words, 2, 10) == [(0, 3), (8, 14), (14, 16)]
    assert sentences(words, 3, 10) == [(0, 3), (8, 14)]
    assert sentences(words, 1, 3) == [(0, 3), (14, 16)]
    assert sentences(words, 4, 10) == [(8, 14)]


def test_bucket_of():
    edges = [0, 300, 400, 512]
    assert [bucket_of(p, edges) for p in (0, 299, 300, 399, 400, 511, 512)] == [0, 0, 1, 1, 2, 2, None]


def test_parse_strategy():
    assert parse_strategy("truncate", 32) == Strategy("truncate")
    assert parse_strategy("mean:256", 32) == Strategy("mean", 256, 32)
    assert parse_strategy("multivector:64", 32) == Strategy(
        "multivector", 64, 16
    )  # overlap kept below a quarter window
    assert parse_strategy("multivector:384:64", 32) == Strategy("multivector", 384, 64)
    assert parse_strategy("multivector:384", 32).label == "multivector:384"
    assert parse_strategy("multivector:384:0", 32).label == "multivector:384:0"  # two overlaps of one window tell apart
    for bad in ("sum:128", "mean", "truncate:128", "mean:x", "mean:1:2:3"):
        with pytest.raises(ValueError):
            parse_strategy(bad, 32)


def text_of_sentences(n: int, seed: int, repeat: str | None = None) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        out.append(" ".join([words[0].capitalize(), *words[1:]]) + f" s{seed}x{i}.")
        if repeat and i % 7 == 3:
            out.append(repeat)
    return " ".join(out)


def test_sample_probes_lie_inside_their_chunk_and_bucket():
    repeat = "This exact sentence appears many times here."
    papers = [PaperIn(paper_id=f"p{i}", title="t", text=text_of_sentences(60, i, repeat)) for i in range(3)]
    edges = [0, 40, 80, 120]
    probes = sample_probes(papers, 120, 0, edges, per_bucket=5, seed=1, min_words=5, max_words=20)
    assert 12 <= len(probes) <= 15
    by_bucket = [sum(bucket_of(q.position, edges) == b for q in probes) for b in range(3)]
    assert all(n <= 5 for n in by_bucket)
    for q in probes:
        p = next(p for p in papers if p.paper_id == q.paper_id)
        words = p.text.split()
        c = chunk_words(p.text, 120, 0)[q.chunk_index]
        assert " ".join(words[q.word_start : q.word_end]) == q.text
        assert c.word_start <= q.word_start and q.word_end <= c.word_end
        assert q.position == q.word_start - c.word_start
        assert q.text != repeat  # not unique in the corpus: never a probe
    again = sample_probes(papers, 120, 0, edges, per_bucket=5, seed=1, min_words=5, max_words=20)
    assert again == probes
    assert sample_probes(papers, 120, 0, edges, per_bucket=5, seed=2, min_words=5, max_words=20) != probes


def test_sentence_in_chunk_overlap_is_one_probe_not_a_duplicate():
    paper = PaperIn(paper_id="p", title="t", text=text_of_sentences(40, 5))
    probes = sample_probes([paper], 100, 40, [0, 100], per_bucket=1000, seed=0, min_words=5, max_words=20)
    starts = [q.word_start for q in probes]
    assert len(starts) == len(set(starts))
    n_sentences = len(sentences(paper.text.split(), 5, 20))
    assert len(probes) == n_sentences  # sentences inside an overlap are kept (once) too


def test_hits_and_scores():
    q_early = Probe("p", 0, 10, 20, 10, "x")
    q_late = Probe("p", 1, 500, 510, 450, "y")
    own = {"word_start": 0, "word_end": 512}
    late_chunk = {"word_start": 50, "word_end": 562}
    assert is_hit("p", own, q_early) and not is_hit("other", own, q_early)
    assert is_hit("p", late_chunk, q_late) and not is_hit("p", late_chunk, q_early)
    assert not is_hit("p", {"word_start": 0, "word_end": 505}, q_late)  # the sentence must fit wholly
    hits = [
        [("p", own)],  # early: found at rank 1
        [("other", own)] * 3 + [("p", late_chunk)],  # late: found at rank 4
    ]
    s = score_probes([q_early, q_late], hits, [0, 300, 512])
    assert s["0-300"] == {"r@1": 1.0, "r@10": 1.0, "n": 1}
    assert s["300-512"] == {"r@1": 0.0, "r@10": 1.0, "n": 1}
    assert s["all"] == {"r@1": 0.5, "r@10": 1.0, "n": 2}


def test_run_strategy_end_to_end(settings):
    papers = [PaperIn(paper_id=f"p{i}", title=f"paper {i}", text=text_of_sentences(30, i)) for i in range(4)]
    edges = [0, 40, 80, 120]
    probes = sample_probes(papers, settings.chunk_words, 0, edges, per_bucket=4, seed=0, min_words=5, max_words=20)
    s = settings.model_copy(update={"chunk_overlap": 0})
    n_chunks = sum(len(chunk_words(p.text, s.chunk_words, 0)) for p in papers)
    trunc = run_strategy(s, Strategy("truncate"), papers, probes, edges)
    multi = run_strategy(s, Strategy("multivector", 48, 8), papers, probes, edges)
    for r in (trunc, multi):
        assert r.chunks == n_chunks
        assert r.recall["all"]["n"] == len(probes)
        assert sum(r.recall[b]["n"] for b in ("0-40", "40-80", "80-120")) == len(probes)
        assert all(0 <= r.recall[b][m] <= 1 for b in r.recall for m in ("r@1", "r@10"))
        assert r.latency_ms["p50"] > 0 and r.disk_bytes > 0
    assert trunc.vectors == n_chunks  # one vector per chunk
    assert multi.vectors > n_chunks  # 48-token windows: several per chunk
    assert multi.vector_bytes == multi.vectors * 32 * 4
    assert multi.tokens > trunc.tokens  # overlapping windows re-encode some tokens; truncate drops none here


def test_cli_coverage(tiny_models, tmp_path, monkeypatch, capsys):
    from indexer.cli import main

    for k, v in tiny_models.items():
        monkeypatch.setenv(f"PAPERINDEX_{k.upper()}", v)
    papers = write_jsonl(
        tmp_path / "long.jsonl",
        [{"paper_id": f"p{i}", "title": "t", "text": text_of_sentences(25, i)} for i in range(3)],
    )
    out = tmp_path / "cov.json"
    rc = main(
        [
            "coverage",
            str(papers),
            "--strategies",
            "truncate,mean:48,multivector:48",
            "--chunk-words",
            "120",
            "--chunk-overlap",
            "0",
            "--buckets",
            "0,60,120",
            "--per-bucket",
            "3",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["strategy"] for r in report["results"]] == ["truncate", "mean:48", "multivector:48"]
    assert report["probes"] == 6 and report["chunk_overlap"] == 0
    table = capsys.readouterr().out
    assert "| truncate |" in table and "R@1 60-120" in table
    assert main(["coverage", str(papers), "--buckets", "0,400,300"]) == 1
    assert main(["coverage", str(papers), "--strategies", "sum:10"]) == 1
