import json
import math
import random

import pytest

from indexer.quality.eval import (
    BeirData,
    evaluate,
    latency_summary,
    load_beir,
    mrr_at_k,
    ndcg_at_k,
    open_setup,
    recall_at_k,
    reference_run,
    score_run,
)

from support.tiny_models import WORDS

# -- metrics against hand-computed values ----------------------------------------------------------

RANKED = ["d3", "d1", "d9", "d2"]
RELS = {"d1": 2, "d2": 1, "d7": 0}


def test_ndcg_hand_computed():
    # DCG = 2/log2(3) + 1/log2(5) = 1.261860 + 0.430677; ideal = 2/log2(2) + 1/log2(3) = 2 + 0.630930
    assert ndcg_at_k(RANKED, RELS, 10) == pytest.approx(1.692537 / 2.630930, abs=1e-6)
    # cut at 2: only d1 counts; the ideal still holds both relevant documents
    assert ndcg_at_k(RANKED, RELS, 2) == pytest.approx(1.261860 / 2.630930, abs=1e-6)
    assert ndcg_at_k(["d1", "d2"], RELS, 10) == pytest.approx(1.0)
    assert ndcg_at_k(RANKED, {"d7": 0}, 10) == 0.0


def test_recall_and_mrr_hand_computed():
    assert recall_at_k(RANKED, RELS, 1) == 0.0
    assert recall_at_k(RANKED, RELS, 2) == 0.5
    assert recall_at_k(RANKED, RELS, 10) == 1.0
    assert mrr_at_k(RANKED, RELS, 10) == 0.5
    assert mrr_at_k(RANKED, RELS, 1) == 0.0
    assert mrr_at_k(["d2", "d1"], RELS, 10) == 1.0  # any positive grade counts as relevant


def test_score_run_averages_over_judged_queries():
    qrels = {"a": {"x": 1}, "b": {"y": 1, "z": 1}, "c": {"w": 0}}  # c has no relevant document: not counted
    run = {"a": ["x"], "b": ["q", "y"]}
    m = score_run(run, qrels)
    assert m["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert m["recall@10"] == pytest.approx((1 + 0.5) / 2)
    # b: DCG = 1/log2(3); ideal = 1 + 1/log2(3)
    assert m["ndcg@10"] == pytest.approx((1 + (1 / math.log2(3)) / (1 + 1 / math.log2(3))) / 2, abs=1e-5)
    # a query the run lacks scores 0
    assert score_run({"a": ["x"]}, qrels)["recall@100"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        score_run(run, {"c": {"w": 0}})


def test_latency_summary():
    s = latency_summary([0.001 * i for i in range(1, 21)])  # 1..20 ms
    assert s == {"mean": 10.5, "p50": 10.0, "p95": 19.0, "max": 20.0}


# -- BEIR loading --------------------------------------------------------------------------------


def write_beir(root, corpus, queries, qrels, header=True):
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_load_beir(tmp_path):
    root = write_beir(
        tmp_path / "set",
        [{"_id": "d1", "title": "T", "text": "one"}, {"_id": "d2", "text": "two"}],
        [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}, {"_id": "q3", "text": "unjudged"}],
        [("q1", "d1", 1), ("q2", "d2", 2), ("q2", "d1", 0)],
    )
    data = load_beir(root)
    assert data.name == "set"
    assert data.corpus == {"d1": ("T", "one"), "d2": ("", "two")}
    assert data.queries == {"q1": "first", "q2": "second"}  # queries without judgements are left out
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "d1": 0}}
    assert load_beir(
        write_beir(tmp_path / "nohead", [], [{"_id": "q", "text": "x"}], [("q", "d", 1)], header=False)
    ).qrels == {"q": {"d": 1}}
    with pytest.raises(FileNotFoundError):
        load_beir(root, split="dev")
    (root / "qrels" / "test.tsv").write_text("q1\td1\n")
    with pytest.raises(ValueError):
        load_beir(root)


# -- end to end on tiny models -------------------------------------------------------------------


def tiny_beir(tmp_path, long_doc_words=0):
    """Short documents (one window each) and queries drawn from their words; judgements are arbitrary."""
    rng = random.Random(7)
    corpus = [
        {"_id": f"d{i}", "title": f"{WORDS[i]} {WORDS[i + 1]}", "text": " ".join(rng.choice(WORDS) for _ in range(20))}
        for i in range(14)
    ]
    if long_doc_words:
        corpus.append({"_id": "long", "title": "", "text": " ".join(rng.choice(WORDS) for _ in range(long_doc_words))})
    queries = [{"_id": f"q{i}", "text": " ".join(rng.sample(corpus[i]["text"].split(), 4))} for i in range(10)]
    qrels = [(f"q{i}", f"d{i}", 1) for i in range(10)] + [
        ("q0", "d5", 2),
        ("q3", "long" if long_doc_words else "d9", 1),
    ]
    return write_beir(tmp_path / "tiny", corpus, queries, qrels)


@pytest.fixture(scope="module")
def spread_model(tmp_path_factory) -> str:
    """A tiny model with mean pooling: a random tiny model's CLS vectors are nearly all alike, so its
    scores tie at float rounding and rank by noise; mean-pooled vectors follow the words."""
    from support.tiny_models import build_mpnet

    return str(build_mpnet(tmp_path_factory.mktemp("mean"), pooling="mean"))


def test_eval_matches_plain_sentence_transformers(settings, tmp_path, spread_model):
    """Documents that fit one window: the pipeline must rank as encode + exact dot product does."""
    data = load_beir(tiny_beir(tmp_path))
    settings = settings.model_copy(update={"passage_model": spread_model})
    for long_chunk in ("truncate", "multivector"):
        setup = open_setup(settings.model_copy(update={"long_chunk": long_chunk}))
        try:
            report = evaluate(setup, data)
        finally:
            setup.cleanup()
        ref = reference_run(settings.passage_model, data, max_seq_length=512)
        for m in ("ndcg@10", "recall@10", "recall@100", "mrr@10"):
            assert report["dense"][m] == pytest.approx(ref[m], abs=1e-4), (long_chunk, m)
        assert report["index"]["chunks"] == report["documents"] == 14
        assert report["dense"]["recall@100"] == 1.0  # 14 documents: every one comes back
        assert report["dense"]["latency_ms"]["p50"] > 0


def test_long_document_is_chunked_but_returned_once(settings, tmp_path):
    data = load_beir(tiny_beir(tmp_path, long_doc_words=400))
    setup = open_setup(settings, tmp_path / "index")
    try:
        report = evaluate(setup, data)
        assert report["index"]["chunks"] > report["documents"]  # the long document spans several chunks
        groups = setup.searcher.grouped("protein folding retrieval", k=100, group_size=1)
        ids = [g.paper_id for g in groups]
        assert sorted(ids) == sorted(data.corpus)  # each document once, whatever its chunk count
    finally:
        setup.cleanup()
    assert (tmp_path / "index").is_dir()  # a named index folder is kept


def test_title_joins_text_unless_disabled(settings, tmp_path):
    data = BeirData("t", {"d": ("Some Title", "body words")}, {"q": "body"}, {"q": {"d": 1}})
    for with_title, expect in ((True, "Some Title body words"), (False, "body words")):
        setup = open_setup(settings)
        try:
            evaluate(setup, data, with_title=with_title)
            (hit,) = setup.searcher.passages("body", k=1)
        finally:
            setup.cleanup()
        assert hit.text == expect and hit.title == "Some Title"


def test_cli_eval_writes_report_with_rerank_and_reference(tiny_models, spread_model, tmp_path, monkeypatch, capsys):
    from indexer.cli import main

    for k, v in tiny_models.items():
        monkeypatch.setenv(f"PAPERINDEX_{k.upper()}", v)
    monkeypatch.setenv("PAPERINDEX_PASSAGE_MODEL", spread_model)
    root = tiny_beir(tmp_path)
    out = tmp_path / "report.json"
    rc = main(
        [
            "eval",
            str(root),
            "--long-chunk",
            "truncate",
            "--rerank",
            "--candidates",
            "20",
            "--reference",
            "--reference-max-seq-length",
            "512",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["dataset"] == "tiny" and report["queries"] == 10 and report["long_chunk"] == "truncate"
    for run in ("hybrid", "dense", "lexical", "rerank", "reference"):  # --mode all by default
        assert set(report[run]) >= {"ndcg@10", "recall@10", "recall@100", "mrr@10"}
        assert all(0.0 <= report[run][m] <= 1.0 for m in ("ndcg@10", "recall@10", "recall@100", "mrr@10"))
    assert report["dense"]["ndcg@10"] == pytest.approx(report["reference"]["ndcg@10"], abs=1e-4)
    assert report["rerank"]["candidates"] == 20 and report["rerank"]["latency_ms"]["p50"] > 0
    assert report["best_mode"] == max(("hybrid", "dense", "lexical"), key=lambda m: report[m]["ndcg@10"])
    assert "nDCG@10" in capsys.readouterr().out
    rc = main(["eval", str(root), "--mode", "lexical", "--prefetch", "7", "--out", str(out), "-q"])
    report = json.loads(out.read_text())
    assert rc == 0 and "lexical" in report and "dense" not in report and report["prefetch"] == 7
    assert main(["eval", str(tmp_path / "missing")]) == 1
