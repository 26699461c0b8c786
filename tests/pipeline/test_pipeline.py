import json
import os
import subprocess
import sys

import numpy as np
import pytest

from indexer.papers import BadRecord, PaperIn, read_papers
from indexer.runtime import build
from indexer.store import ClientStore, SearchFilter, chunk_point_id

from support.papers import make_paper, write_jsonl
from support.reliability import index_until_killed


@pytest.fixture(params=["edge", "memory"])
def rt(request, settings):
    store = ClientStore(location=":memory:") if request.param == "memory" else None
    r = build(settings, reranker=False, store=store)
    yield r
    r.close()


def papers(*specs):
    return [PaperIn(**make_paper(i, words=w)) for i, w in specs]


def chunk_ids(store, pid):
    return sorted(
        int(h.payload["chunk_index"])
        for h in store.search(
            store.chunks, np.ones(store_dim(store), dtype=np.float32), 1000, SearchFilter(paper_ids=[pid])
        )
    )


def store_dim(store):
    return store.layout().chunk_dim


def test_chunk_points_match_the_chunking(rt):
    stats = rt.indexer.index(papers((0, 300), (1, 0), (2, 120)))
    # chunk_words=120, overlap 20: 300 words -> 3 chunks; no body -> 0; 120 -> 1; and each paper's head (-1)
    assert stats.papers_indexed == 3 and stats.chunks == 4 + 3
    assert chunk_ids(rt.store, "p0000") == [-1, 0, 1, 2] and chunk_ids(rt.store, "p0002") == [-1, 0]
    assert chunk_ids(rt.store, "p0001") == [-1]  # a paper without a body is found by its title and abstract
    hit = rt.store.search(
        rt.store.chunks, np.ones(store_dim(rt.store), dtype=np.float32), 1, SearchFilter(paper_ids=["p0000"])
    )[0]
    meta = hit.payload["metadata"]
    spans = {-1: (0, 0), 0: (0, 120), 1: (100, 220), 2: (200, 300)}
    assert (meta["word_start"], meta["word_end"]) == spans[meta["chunk_index"]]
    assert meta["authors"] == ["Author 0"] and meta["title"].endswith("study 0") and hit.payload["year"] == 1990


def test_papers_prepared_in_worker_processes_give_the_same_points(settings):
    """Hashes, chunks and windows made by the tokenizer workers (papers split over three of them)
    give exactly the points of the same run in this process; a rerun finds every paper unchanged."""
    specs = [(i, w) for i, w in enumerate([300, 0, 520, 120, 90, 700, 260, 410, 30, 350, 220, 600])]
    runs = []
    for workers in (0, 3):
        r = build(
            settings.model_copy(
                update={"tokenizer_workers": workers, "qdrant_path": settings.qdrant_path / str(workers)}
            ),
            reranker=False,
        )
        try:
            r.indexer.passage_encoder.windows.min_chars_per_task = 1
            stats = r.indexer.index(papers(*specs))
            assert r.indexer.index(papers(*specs)).papers_unchanged == len(specs)
            got = r.store.get_papers([f"p{i:04d}" for i, _ in specs], with_vectors=True)
            hits = r.store.search(r.store.chunks, np.ones(store_dim(r.store), dtype=np.float32), 1000)
            runs.append(
                (
                    stats.chunks,
                    stats.windows,
                    {k: (v.payload["content_hash"], v.payload["n_chunks"]) for k, v in got.items()},
                    {(h.payload["paper_id"], h.payload["chunk_index"]): (h.payload["text"], h.score) for h in hits},
                    r.indexer.passage_encoder.windows._pool is not None,
                )
            )
        finally:
            r.close()
    (chunks0, windows0, papers0, hits0, pool0), (chunks3, windows3, papers3, hits3, pool3) = runs
    assert not pool0 and pool3
    assert (chunks0, windows0, papers0) == (chunks3, windows3, papers3) and chunks0 == len(hits0) > 20
    assert hits0.keys() == hits3.keys()
    for key, (text, score) in hits0.items():
        assert hits3[key][0] == text and hits3[key][1] == pytest.approx(score, rel=1e-4, abs=1e-4)


def test_reindex_replaces_exactly_no_orphans_no_duplicates(rt):
    rt.indexer.index(papers((0, 500), (1, 200)))
    assert chunk_ids(rt.store, "p0000") == [-1, 0, 1, 2, 3, 4]
    before = rt.store.count(rt.store.chunks)
    again = rt.indexer.index(papers((0, 500), (1, 200)))
    assert again.papers_unchanged == 2 and again.papers_indexed == 0 and rt.store.count(rt.store.chunks) == before
    shorter = rt.indexer.index(papers((0, 150)))  # the paper got shorter: its tail chunks must go
    assert shorter.papers_indexed == 1
    assert chunk_ids(rt.store, "p0000") == [-1, 0, 1]
    assert rt.store.count(rt.store.papers) == 2 and rt.store.get_papers(["p0000"])["p0000"].payload["n_chunks"] == 3
    assert chunk_ids(rt.store, "p0001") == [-1, 0, 1]  # the other paper untouched


def test_paper_without_abstract_uses_the_first_words_of_its_body(rt):
    with_abs = PaperIn(paper_id="a", title="T", abstract=None, text="protein folding " * 200)
    explicit = PaperIn(paper_id="b", title="T", abstract=" ".join(("protein folding " * 200).split()[:300]), text="x")
    rt.indexer.index([with_abs, explicit])
    got = rt.store.get_papers(["a", "b"], with_vectors=True)
    np.testing.assert_allclose(got["a"].vector, got["b"].vector, atol=1e-5)


def test_delete_removes_paper_and_chunks(rt):
    rt.indexer.index(papers((0, 300), (1, 300)))
    assert rt.indexer.delete(["p0000", "ghost"]) == 1
    assert rt.store.count(rt.store.papers) == 1 and chunk_ids(rt.store, "p0000") == []


def test_max_chunks_cap_is_counted(settings):
    r = build(settings.model_copy(update={"max_chunks_per_paper": 2}), reranker=False)
    try:
        stats = r.indexer.index(papers((0, 1000), (1, 100)))
        assert stats.papers_capped == 1 and chunk_ids(r.store, "p0000") == [-1, 0, 1]  # the head besides the cap
    finally:
        r.close()


def test_settings_change_reindexes(settings, tmp_path):
    r = build(settings, reranker=False)
    r.indexer.index(papers((0, 300)))
    r.close()
    r2 = build(settings.model_copy(update={"chunk_words": 200, "chunk_overlap": 10}), reranker=False)
    try:
        stats = r2.indexer.index(papers((0, 300)))
        assert stats.papers_indexed == 1 and chunk_ids(r2.store, "p0000") == [-1, 0, 1]
    finally:
        r2.close()


def test_bad_records_are_reported_with_file_and_line_and_skipped(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'{"paper_id": "ok1", "title": "fine"}\n'
        b'{"title": "no id"}\n'
        b"\n"
        b'{"paper_id": "x", "title": "t", "year": "soon"}\n'
        b'{"paper_id": "ok1", "title": "again"}\n'
        b'{"paper_id": "bin", "title": "caf\xe9"}\n'
        b"[1, 2]\n"
        b'{"paper_id": "ok2", "title": "fine too", "authors": "not a list"}\n'
        b'{"paper_id": "ok3", "title": "fine", "doi": "10.1/x"}\n'
    )
    recs = list(read_papers([path]))
    good = [r for r in recs if isinstance(r, PaperIn)]
    bad = {r.line: r for r in recs if isinstance(r, BadRecord)}
    assert [p.paper_id for p in good] == ["ok1", "ok3"] and good[1].metadata() == {"doi": "10.1/x"}
    assert set(bad) == {2, 4, 5, 6, 7, 8}
    assert "paper_id" in bad[2].error and "year" in bad[4].error and "duplicate" in bad[5].error
    assert "UTF-8" in bad[6].error and "object" in bad[7].error and "authors" in bad[8].error
    assert str(bad[4]).startswith(f"{path}:4 (x): ")


def test_json_array_and_folder_input(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps([make_paper(1), {"paper_id": "z"}]))
    write_jsonl(tmp_path / "d" / "b.jsonl", [make_paper(2)])
    recs = list(read_papers([tmp_path / "d"]))
    assert [getattr(r, "paper_id", None) for r in recs] == ["p0001", "z", "p0002"]
    assert isinstance(recs[1], BadRecord) and recs[1].line == 2
    with pytest.raises(FileNotFoundError):
        list(read_papers([tmp_path / "missing.jsonl"]))


def test_json_lines_are_read_a_line_at_a_time(tmp_path):
    """A big JSONL file takes the memory of a few records, not of the file (corpora of millions of
    papers come as one file), and the first paper is out before the rest is read."""
    import tracemalloc

    rec = json.dumps(make_paper(0, words=2000))  # ~13 KB a line
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(2500):  # ~33 MB
            f.write(rec.replace('"p0000"', f'"p{i:05d}"') + "\n")
    tracemalloc.start()
    try:
        it = read_papers([path])
        first = next(it)
        _, peak_first = tracemalloc.get_traced_memory()
        n = 1 + sum(1 for _ in it)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.paper_id == "p00000" and n == 2500
    assert peak_first < 2_000_000 and peak < 5_000_000, (peak_first, peak)


def test_shards_split_papers_disjointly(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [make_paper(i, words=5) for i in range(40)])
    parts = [{p.paper_id for p in read_papers([path], shard=(i, 3))} for i in range(3)]
    assert sum(map(len, parts)) == 40 and set().union(*parts) == {f"p{i:04d}" for i in range(40)}
    assert all(parts) and not (parts[0] & parts[1] or parts[1] & parts[2] or parts[0] & parts[2])


def _env(settings):
    env = dict(os.environ)
    for k, v in settings.model_dump().items():
        if v is not None and not isinstance(v, list):
            env[f"PAPERINDEX_{k.upper()}"] = str(v)
    env["PAPERINDEX_PAPERS_PER_BATCH"] = "2"
    return env


def test_resume_after_kill_9_ends_with_exactly_the_right_points(settings, tmp_path):
    n, words = 60, lambda i: 100 + 6 * i
    corpus = write_jsonl(tmp_path / "c.jsonl", [make_paper(i, words=words(i)) for i in range(n)])
    env = _env(settings)
    cmd = [sys.executable, "-m", "indexer.cli", "index", str(corpus)]
    # Killed by progress, not by time: 0.1 s after a third of the papers are done, at the latest at half.
    killed_at = index_until_killed(cmd, env, at_papers=n // 3, jitter_s=0.1, last_papers=n // 2)
    assert killed_at is not None, "the run finished before it was killed; nothing was resumed"

    from indexer.chunking import chunk_words
    from indexer.store import EdgeStore

    s = EdgeStore(settings.qdrant_path)
    interrupted_at = s.count(s.papers)
    s.close()
    assert killed_at <= interrupted_at < n  # progress is shown once a batch is committed

    done = subprocess.run(cmd + ["--json", "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["papers_unchanged"] == interrupted_at and summary["papers_indexed"] == n - interrupted_at

    # each paper's chunks and its head (chunk -1)
    expected = {f"p{i:04d}": 1 + len(chunk_words(make_paper(i, words=words(i))["text"], 120, 20)) for i in range(n)}
    s = EdgeStore(settings.qdrant_path)
    try:
        assert s.count(s.papers) == n and s.count(s.chunks) == sum(expected.values())
        seen = set()
        for points, _ in s.scroll(s.chunks, batch=500, with_vectors=False):
            for p in points:
                key = (p.payload["paper_id"], p.payload["chunk_index"])
                assert key not in seen and p.id == chunk_point_id(*key)
                seen.add(key)
        assert seen == {(pid, c) for pid, k in expected.items() for c in range(-1, k - 1)}
        assert {pid: p.payload["n_chunks"] for pid, p in s.get_papers(list(expected)).items()} == expected
    finally:
        s.close()


def test_retry_backs_off_on_transient_failures_only(monkeypatch):
    from indexer.pipeline import retry
    from indexer.store import StoreError, StoreUnavailable

    sleeps = []
    monkeypatch.setattr("indexer.pipeline.time.sleep", sleeps.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise StoreUnavailable("Qdrant is unreachable: connection refused")
        return "done"

    assert retry(flaky) == "done" and len(calls) == 3 and sleeps == [0.5, 1.0]

    def broken():
        raise StoreError("layout mismatch")

    with pytest.raises(StoreError, match="layout"):
        retry(broken)
    assert len(sleeps) == 2  # no retry for a permanent error
    with pytest.raises(TimeoutError):
        retry(lambda: (_ for _ in ()).throw(TimeoutError("slow")), attempts=3)
    assert len(sleeps) == 4


def test_first_and_last_groups_are_small_so_the_gpu_starts_early_and_the_run_ends_soon(settings, monkeypatch):
    import indexer.grouping as grouping

    monkeypatch.setattr(grouping, "FIRST_PAPERS", 2)
    r = build(
        settings.model_copy(update={"papers_per_batch": 8}), reranker=False, store=ClientStore(location=":memory:")
    )
    try:
        groups = {}
        for n in (21, 14, 15):
            done = []
            stats = r.indexer.index(
                papers(*[(i, 30) for i in range(n)]),
                force=True,
                on_batch=lambda s, done=done: done.append(s.papers_indexed),
            )
            assert stats.papers_indexed == n
            groups[n] = np.diff([0, *done]).tolist()
    finally:
        r.close()
    assert groups[21] == [
        2,
        3,
        4,
        6,
        3,
        3,
    ]  # 2, then 1.5 times the last, then the 6 left in halves down to 2 × FIRST_PAPERS
    assert groups[14] == [2, 3, 4, 2, 3]  # the input ends within a group: what is left is cut in halves too
    assert groups[15] == [2, 3, 4, 3, 3]  # it ends with a full group: that one is cut in halves too


def test_each_group_is_flushed_once_written(settings):
    r = build(settings.model_copy(update={"papers_per_batch": 2}), reranker=False)  # Qdrant Edge
    flushed = []
    flush = r.store.flush
    r.store.flush = lambda: (flushed.append(True), flush())[1]
    try:
        at_batch = []
        r.indexer.index(
            papers(*[(i, 30) for i in range(5)]), on_batch=lambda s: at_batch.append((s.papers_indexed, len(flushed)))
        )
    finally:
        r.close()
    # groups of 2, 2, 1 (FIRST_PAPERS is more than 2): every group flushed before it is reported
    assert at_batch == [(2, 1), (4, 2), (5, 3)]


@pytest.mark.parametrize("twice", [True, False])
def test_a_group_waits_only_for_earlier_groups_with_one_of_its_papers(settings, monkeypatch, twice):
    """Two tokenizing lanes: the first group is held back while the next is prepared and encoded.
    That group is written at once, unless it lists a paper of the first again (then after it, so
    the paper ends with its last version); either way every group is reported once."""
    import threading

    import indexer.grouping as grouping

    monkeypatch.setattr(grouping, "FIRST_PAPERS", 2)
    r = build(settings.model_copy(update={"papers_per_batch": 2, "tokenizer_workers": 2}), reranker=False)
    try:
        r.indexer.passage_encoder.windows.set_lanes(2)
        r.indexer.passage_encoder.windows.min_chars_per_task = 1
        held = threading.Event()
        inner_prepare, inner_write, written = r.indexer.prepare, r.indexer.write, []

        def prepare(b):
            if "p0001" in {p.paper_id for p in b.papers}:
                held.wait(5)  # the first group: the second lane prepares the next meanwhile
            inner_prepare(b)

        def write(b, *a):
            written.append([p.paper_id for p in b.papers])
            held.set()  # the first group goes on once a group was written (or after 5 s)
            inner_write(b, *a)

        r.indexer.prepare, r.indexer.write = prepare, write
        second = PaperIn(**{**make_paper(0 if twice else 3, words=60), "title": "the newer version"})
        done = []
        stats = r.indexer.index(
            [*papers((0, 200), (1, 150)), second, *papers((2, 90))], on_batch=lambda s: done.append(s.papers_indexed)
        )
        first_id, second_ids = ["p0000", "p0001"], [second.paper_id, "p0002"]
        assert written == ([first_id, second_ids] if twice else [second_ids, first_id])
        assert stats.papers_indexed == 4 and done == [2, 4]
        got = r.store.get_papers(["p0000", "p0001", "p0002", "p0003"])
        assert got[second.paper_id].payload["title"] == "the newer version" and len(got) == (3 if twice else 4)
        assert chunk_ids(r.store, second.paper_id) == [-1, 0] and chunk_ids(r.store, "p0001") == [-1, 0, 1]
    finally:
        r.close()


def test_groups_ramp_once_per_gpu_and_cut_the_tail_finer_on_several(monkeypatch):
    """Each ramp size once per GPU (every GPU starts on a small group), then groups of `most`; where
    the input ends, the held groups and the last one are cut into a 2 × gpus-th of what is left each."""
    import indexer.grouping as grouping

    monkeypatch.setattr(grouping, "FIRST_PAPERS", 2)
    got = list(grouping.groups(range(100), most=8, gpus=3, hold=6))
    assert [p for g in got for p in g] == list(range(100))  # every paper once, in input order
    ramp = [2, 2, 2, 3, 3, 3, 4, 4, 4, 6, 6, 6]
    # 55 papers after the ramp: three groups of 8 handed on (each held one longer than the last), three
    # held and 7 more when the input ends: 31 left, cut 31 // 6 = 5, 26 // 6 = 4, ... at least 2, the last 4 whole
    assert [len(g) for g in got] == [*ramp, 8, 8, 8, 5, 4, 3, 3, 2, 2, 2, 2, 2, 2, 4]
    # one GPU: the ramp once, one group held, the rest in halves (as the run's test above sees it)
    assert [len(g) for g in grouping.groups(range(21), most=8)] == [2, 3, 4, 6, 3, 3]


def test_groups_hand_on_ramp_groups_at_once_and_hold_full_ones_back(monkeypatch):
    """A ramp group goes on as soon as the next paper shows the input goes on (the GPUs start
    early); groups of `most` wait longer, one more each time one goes on, up to hold - 1 (the tail
    can be cut finer, and the reading ahead does not come in one go)."""
    import indexer.grouping as grouping

    monkeypatch.setattr(grouping, "FIRST_PAPERS", 2)
    read = []

    def papers():
        for i in range(60):
            read.append(i)
            yield i

    seen = [(len(g), len(read)) for g in grouping.groups(papers(), most=4, gpus=2, hold=3)]
    # ramp 2, 2, 3, 3 (10 papers): each handed on when the paper after it is read
    assert seen[:4] == [(2, 3), (2, 5), (3, 8), (3, 11)]
    # groups of 4 from paper 10: the first goes on when paper 14 is read, the second when 22 is
    # (one more held), the third when 30 is (two held: hold - 1), and from then on one group apart
    assert seen[4:8] == [(4, 15), (4, 23), (4, 31), (4, 35)]


def test_each_group_goes_to_the_gpu_with_the_fewest_in_work(settings, encoders, tmp_path, monkeypatch):
    """Three "GPUs" (CPU encoder replicas labelled as devices) with two threads each, each group
    taking them a while: the first three groups go to the three GPUs, the next three to each of them
    again, so that every GPU starts on a small group; the index is the one a single encoder writes."""
    import time

    import torch

    import indexer.grouping as grouping
    from indexer.grouping import Handout
    from indexer.pipeline import Indexer
    from indexer.store import EdgeStore

    monkeypatch.setattr(grouping, "FIRST_PAPERS", 2)
    paper_enc, passage_enc = encoders

    class OnDevice:  # a replica that says it sits on `device`
        def __init__(self, enc, device):
            self._enc, self.device = enc, device

        def __getattr__(self, name):
            return getattr(self._enc, name)

    def on(device, enc):
        replica = OnDevice(enc.replicate("cpu"), device)
        inner = replica._enc.encode_windows

        def encode_windows(w, cancel=None):
            time.sleep(0.5)  # a busy GPU: the next groups are ready before it is done
            return inner(w, cancel=cancel)

        replica.encode_windows = encode_windows
        return replica

    taken: list[int] = []  # the GPU of each group taken, in order
    sizes: list[int] = []  # and its papers
    get = Handout.get

    def logged(self, gpu):
        item = get(self, gpu)
        if item is not None:
            taken.append(gpu)
            sizes.append(len(item[1].papers))
        return item

    monkeypatch.setattr(Handout, "get", logged)
    # "cuda" is the current GPU (cuda:0 here): the same GPU as "cuda:0"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    pairs = [(paper_enc, on(d, passage_enc)) for d in ("cuda", "cuda:0", "cuda:1", "cuda:1", "cuda:2", "cuda:2")]
    docs = [PaperIn(**make_paper(i, words=60 + 37 * (i % 7))) for i in range(40)]
    idx = Indexer(
        EdgeStore(tmp_path / "three"),
        pairs[0][0],
        pairs[0][1],
        chunk_size=120,
        chunk_overlap=20,
        papers_per_batch=8,
        replicas=pairs[1:],
    )
    assert idx.gpus == 3 and idx.gpu_of == [0, 0, 1, 1, 2, 2]
    stats = idx.index(docs)
    assert sorted(taken[:3]) == sorted(taken[3:6]) == [0, 1, 2]  # one group per GPU, then one more each
    assert sizes[:6] == [2, 2, 2, 3, 3, 3]  # the ramp, once per GPU
    one = EdgeStore(tmp_path / "one")
    Indexer(one, paper_enc, passage_enc, chunk_size=120, chunk_overlap=20, papers_per_batch=8).index(docs)
    for collection in ("papers", "chunks"):
        a = {p.id: p.payload for batch, _ in idx.store.scroll(collection) for p in batch}
        b = {p.id: p.payload for batch, _ in one.scroll(collection) for p in batch}
        assert a == b and len(a) >= 40
    assert stats.papers_indexed == 40


def test_handout_gives_each_group_to_the_least_busy_gpu_then_ends():
    """Two threads on GPU 0, one on GPU 1: GPU 0 has a group in work, so the next goes to GPU 1,
    even while only GPU 0's second thread asks; once GPU 1 has one too, GPU 0 takes the next."""
    import threading

    from indexer.grouping import Handout

    stop = threading.Event()
    h = Handout([0, 0, 1], size=4, stop=stop)
    assert h.put("a") and h.get(0) == "a"
    got: list = []
    late = threading.Thread(target=lambda: got.append(h.get(0)))
    late.start()  # GPU 0's thread (back early) waits: "b" is GPU 1's
    assert h.put("b")
    late.join(0.3)
    assert late.is_alive() and got == []
    assert h.get(1) == "b"
    h.put("c")  # both GPUs have one in work, GPU 1 no thread free: GPU 0's waiting thread takes it
    late.join(5)
    assert got == ["c"]
    h.done(1)
    h.leave(1)  # GPU 1's thread ended: GPU 0 takes what comes
    h.done(0)
    h.put("d")
    assert h.get(0) == "d"
    h.close()
    assert h.get(0) is None  # closed and empty
    two = Handout([0], size=4, stop=stop, producers=2)  # two tokenizing threads put items
    two.close()
    ender = threading.Thread(target=lambda: got.append(two.get(0)))
    ender.start()
    ender.join(0.3)
    assert ender.is_alive()  # one producer may still put
    two.put("e")
    ender.join(5)
    assert got[-1] == "e"
    two.done(0)
    two.close()
    assert two.get(0) is None  # both done and nothing left
    stopped = Handout([0], size=1, stop=stop)
    assert stopped.put("x")
    stop.set()
    assert stopped.put("y") is False and stopped.get(0) is None  # a stopping run takes and gives nothing
