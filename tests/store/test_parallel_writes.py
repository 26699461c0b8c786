"""Several chunk shards in the embedded store, each written by a process of its own while bulk
indexing (EdgeStore.parallel_writes). The shared read/write behaviour is the store contract
(test_store_contract.py runs it on a store of three chunk shards too)."""

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.errors import StoreUnavailable
from indexer.store import (
    EdgeStore,
    Layout,
    Point,
    SearchFilter,
    ShardWriters,
    StoreError,
    StoreOptions,
    chunk_point_id,
    chunk_points,
    chunk_shard,
    paper_point_id,
)
from indexer.store import shard as shard_module

from support.edge import DIM, chunks, entries, everything, paper_points, sharded


def test_parallel_writes_end_with_the_points_of_plain_writes(tmp_path):
    first, second = chunks(range(40)), chunks(range(30, 50), seed=1)  # p30-p39 written twice
    plain, par = sharded(tmp_path / "plain"), sharded(tmp_path / "par")
    for s, ctx in ((plain, None), (par, par.parallel_writes)):

        def write(s=s):
            s.upsert(s.chunks, first)
            s.upsert(s.papers, paper_points(range(40)))
            s.delete_papers(["p1", "p2"])
            s.delete_chunks([f"p{p}" for p in range(30, 40)])
            s.upsert(s.chunks, second)
            s.flush()

        if ctx is None:
            write()
        else:
            with ctx():
                write()
    assert par.count(par.chunks) == plain.count(plain.chunks) == 48 * 5
    assert par.count(par.papers) == plain.count(plain.papers) == 38
    q = np.random.default_rng(7).standard_normal(DIM).astype(np.float32)
    for flt in (None, SearchFilter(year_from=2002), SearchFilter(paper_ids=["p33", "p7"])):
        a, b = plain.search(plain.chunks, q, 20, flt), par.search(par.chunks, q, 20, flt)
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5)
    # every paper's chunks sit in the one shard its id names
    for i, shard in enumerate(par._shards[par.chunks]):
        recs, _ = shard.scroll(par.qe.ScrollRequest(limit=1000, with_payload=True, with_vector=False))
        assert recs and {chunk_shard(r.payload["paper_id"], 3) for r in recs} == {i}
    plain.close()
    par.close()


def test_papers_chunks_made_into_points_by_the_writer_processes_are_the_points_made_here(tmp_path):
    """upsert_chunks sends papers' chunks to the chunk shards' processes, which make the points (ids,
    payloads): the same points as chunk_points makes in this process, in the same order as the other
    writes (a paper written twice, its chunks deleted between, points and papers' chunks mixed)."""
    first, second = entries(range(12)), entries(range(6, 10), per_paper=3, seed=1)
    plain = sharded(tmp_path / "plain")
    par = sharded(tmp_path / "par", writer_message_points=3)  # messages of whole papers, 3 chunks or more
    for s in (plain, par):

        def write(s=s):
            s.upsert_chunks(first)
            s.delete_chunks(["p7"])
            s.upsert(s.chunks, chunks([7], per_paper=2, seed=2))  # points, between papers' chunks
            s.upsert_chunks(
                second + entries([20], per_paper=0)
            )  # p6-p9 again (3 chunks of 5 replaced), a paper without chunks
            s.upsert_chunks(entries([11], per_paper=2, seed=3))  # gathered (fewer than a message)...
            s.upsert(s.chunks, chunks([11], per_paper=3, seed=4))  # ...and written before these points
            s.upsert(s.papers, paper_points(range(12)))
            s.flush()

        if s is plain:
            s.upsert_chunks = lambda es, s=s: s.upsert(s.chunks, chunk_points(es))  # made here
            write()
        else:
            with s.parallel_writes():
                assert s._writers is not None
                write()
    want, got = everything(plain), everything(par)
    assert len(got) == 12 * 5 - 5 + 3 == len(want)  # p7: deleted, then 2 points, then 3 chunks
    assert set(got) == set(want)
    for pid, (payload, vec) in want.items():
        assert got[pid][0] == payload
        np.testing.assert_array_equal(got[pid][1], vec)
    p8 = {p["chunk_index"]: p for p, _ in (got[chunk_point_id("p8", c)] for c in range(5))}
    assert p8[0]["text"] == "p8 c0 seed 1" and p8[4]["text"] == "p8 c4 seed 0"
    assert p8[1] == {
        "paper_id": "p8",
        "paper_uuid": paper_point_id("p8"),
        "chunk_index": 1,
        "year": 2003,
        "text": "p8 c1 seed 1",
        "metadata": {
            "paper_id": "p8",
            "title": "title 8",
            "year": 2003,
            "chunk_index": 1,
            "word_start": 400,
            "word_end": 912,
            "venue": "v2",
        },
    }
    assert [got[chunk_point_id("p7", c)][0]["text"] for c in range(3)] == [
        f"p7 c{c} seed 1" for c in range(3)
    ]  # after the points
    assert chunk_point_id("p7", 3) not in got  # deleted
    assert [got[chunk_point_id("p11", c)][0]["text"] for c in range(5)] == [
        "p11 c0",
        "p11 c1",
        "p11 c2",
        "p11 c3 seed 0",
        "p11 c4 seed 0",
    ]
    plain.close()
    par.close()


def test_chunk_reads_wait_for_the_end_of_parallel_writes(tmp_path):
    s = sharded(tmp_path / "idx")
    with s.parallel_writes():
        s.upsert(s.chunks, chunks(range(4)))
        s.upsert(s.papers, paper_points(range(4)))
        s.flush()
        assert s.committed(["p0", "p9"]) == {"p0": "h"}  # papers are read as usual
        with pytest.raises(StoreError, match="own processes"):
            s.search(s.chunks, np.ones(DIM, dtype=np.float32), 3)
    assert s.count(s.chunks) == 20
    s.close()


def test_paper_points_wait_for_their_chunks_without_holding_up_the_caller(tmp_path):
    """A paper point (the commit marker) is written once the chunk writes sent before it are done,
    by a later write call or flush; the caller does not wait for them meanwhile."""
    s = sharded(tmp_path / "idx", shards=2)
    written = []
    with s.parallel_writes():
        s.flush()  # both processes have opened their shards
        busy = s._writers._procs[0]
        busy.send_signal(signal.SIGSTOP)
        try:

            def batches():
                s.upsert(s.chunks, chunks(range(6)))
                s.upsert(s.papers, paper_points(range(6)))
                s.flush_soon(lambda: written.append(len(s.committed([f"p{p}" for p in range(6)]))))
                s.upsert(s.chunks, chunks(range(6, 8)))  # the next batch goes out meanwhile

            sent = threading.Thread(target=batches)
            sent.start()
            sent.join(5)
            assert not sent.is_alive(), "a paper point held up the caller until its chunks were written"
            time.sleep(0.3)
            s.upsert(s.chunks, [])
            assert s.committed([f"p{p}" for p in range(6)]) == {}  # shard 0 has not written its chunks
            assert written == []  # the caller's progress waits for the commit too
        finally:
            busy.send_signal(signal.SIGCONT)
        sent.join()
        s.flush()
        assert written == [6]  # called once, after that batch's paper points were written
        s.upsert(s.papers, paper_points(range(6, 8)))
    assert s.count(s.papers) == 8 and s.count(s.chunks) == 40
    s.close()


def test_flush_writes_each_paper_point_once_its_own_chunks_are_written(tmp_path):
    """At a run's end, `flush` writes each waiting paper point once the chunk writes sent before it
    are done, not once every shard has written everything: the progress shown, and what a killed
    run keeps, follow the writes."""
    s = sharded(tmp_path / "idx", shards=2)
    written = []
    with s.parallel_writes():
        s.flush()  # both processes have opened their shards
        procs = s._writers._procs
        procs[1].send_signal(signal.SIGSTOP)
        try:
            s.upsert(s.chunks, chunks(range(6)))
            s.upsert(s.papers, paper_points(range(6)))
            s.flush_soon(lambda: written.append("first"))
            ticket = s._commits[-1][0]  # the writes sent before the callback
            deadline = time.monotonic() + 30
            while s._writers._done[0] < ticket[0] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert s._writers._done[0] >= ticket[0]
            procs[0].send_signal(signal.SIGSTOP)  # shard 0 is done with the first batch, not the second
            s.upsert(s.chunks, chunks(range(6, 12), seed=1))
            s.upsert(s.papers, paper_points(range(6, 12)))
            s.flush_soon(lambda: written.append("second"))
            flushing = threading.Thread(target=s.flush)
            flushing.start()
            procs[1].send_signal(signal.SIGCONT)  # the first batch's chunks are all written now
            while written != ["first"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert written == ["first"], "flush held the paper points back until every shard had written everything"
            assert set(s.committed([f"p{p}" for p in range(12)])) == {f"p{p}" for p in range(6)}
        finally:
            for p in procs:
                p.send_signal(signal.SIGCONT)
        flushing.join(30)
        assert written == ["first", "second"]
    assert s.count(s.papers) == 12 and s.count(s.chunks) == 60
    s.close()


def test_a_paper_deleted_after_its_write_stays_deleted(tmp_path):
    """delete_papers writes the paper points still waiting for their chunks first: one written
    after the delete would bring the paper back without its chunks."""
    s = sharded(tmp_path / "idx", shards=2)
    with s.parallel_writes():
        s.upsert(s.chunks, chunks(range(4)))
        s.upsert(s.papers, paper_points(range(4)))
        s.delete_papers(["p0", "p3"])
    assert sorted(p.payload["paper_id"] for page, _ in s.scroll(s.papers) for p in page) == ["p1", "p2"]
    assert s.count(s.chunks) == 10
    s.close()


def test_a_failed_chunk_write_keeps_its_paper_uncommitted(tmp_path):
    """Chunk writes are not waited for, but a paper point (the commit marker) waits for them: if
    one failed, the marker is not written, and the error surfaces."""
    s = sharded(tmp_path / "idx")
    bad = [
        Point(chunk_point_id("p0", 0), np.zeros((2, DIM + 1), dtype=np.float32), {"paper_id": "p0"})
    ]  # wrong dimension
    with pytest.raises(StoreError, match="chunk shard"):
        with s.parallel_writes():
            s.upsert(s.chunks, bad)
            s.upsert(s.papers, paper_points([0]))
    assert s.count(s.papers) == 0 and s.count(s.chunks) == 0
    s.upsert(s.chunks, chunks([0]))  # the shards are back in this process and writable
    assert s.count(s.chunks) == 5
    s.close()


def test_a_dead_writer_process_is_a_clear_error(tmp_path):
    s = sharded(tmp_path / "idx", shards=2)
    with pytest.raises(StoreError, match="exited"):
        with s.parallel_writes():
            for p in s._writers._procs:
                p.kill()
                p.wait()
            s.upsert(s.chunks, chunks(range(6)))
            s.flush()
    s.upsert(s.chunks, chunks([1]))
    assert s.count(s.chunks) == 5
    s.close()


def test_an_index_of_one_chunk_shard_is_written_by_a_process_too(tmp_path):
    s = sharded(tmp_path / "idx", shards=1)
    with s.parallel_writes():
        assert s._writers is not None and len(s._writers._procs) == 1
        s.upsert(s.chunks, chunks(range(3)))
    assert s.count(s.chunks) == 15
    s.close()
    again = EdgeStore(
        tmp_path / "idx", options=StoreOptions(chunk_shards=4)
    )  # an index keeps the shards it was made with
    assert again.chunk_shards == 1 and again.count(again.chunks) == 15
    again.close()


def test_the_layout_is_known_while_the_writers_hold_the_chunk_shards(tmp_path, monkeypatch):
    """An indexing run starts by making sure the collections exist: inside parallel_writes that
    must find them, not create them again, and without waiting for the writers to open them (their
    configs are on disk already)."""
    s = sharded(tmp_path / "idx")
    waits, real_wait = [], ShardWriters.wait
    monkeypatch.setattr(ShardWriters, "wait", lambda self, *a: waits.append(a) or real_wait(self, *a))
    with s.parallel_writes():
        assert s.layout() == Layout(DIM, DIM, True) and waits == []
        s.create(Layout(DIM, DIM, True))
        s.upsert(s.chunks, chunks(range(2)))
    assert s.count(s.chunks) == 10 and s.chunk_shards == 3
    s.close()


def test_a_shard_the_writers_cannot_open_fails_the_run_without_holding_it_up(tmp_path, monkeypatch):
    """The writer processes open their shards while the caller goes on; a shard another process
    holds (here: this one, after the wait runs out) is a clear error at the next write, and no
    paper is committed."""
    monkeypatch.setattr(shard_module, "OPEN_WAIT_S", 0.5)
    s = sharded(tmp_path / "idx", shards=2)
    with s.parallel_writes():  # a first run: the shards exist and are closed in this process
        pass
    held = shard_module.load_shard(s.qe, str(tmp_path / "idx" / "chunks.1"))
    t, entered = time.perf_counter(), []
    with pytest.raises(StoreError, match="chunk shard 1: cannot open"):
        with s.parallel_writes():
            entered.append(time.perf_counter() - t)
            s.upsert(s.chunks, chunks(range(8)))
            s.upsert(s.papers, paper_points(range(8)))
    held.close()
    assert entered and entered[0] < 0.5  # the run went on while the writers opened (and waited)
    # no paper marked done (a rerun redoes them all), and no chunk written: the writes wait until
    # every shard is open
    assert s.count(s.papers) == 0
    assert s.count(s.chunks) == 0 and sum(chunk_shard(f"p{p}", 2) == 0 for p in range(8)) > 0
    s.close()


def test_a_new_index_gets_its_chunk_shards_from_the_writer_processes(tmp_path):
    """Inside parallel_writes, `create` makes the papers shard here and hands the new chunk shards
    to their writer processes, which create them side by side, with the config and payload indexes
    of shards created in this process."""
    options = StoreOptions(chunk_shards=3, bulk_load=True, quantization="int8")
    here = EdgeStore(tmp_path / "here", options=options)
    here.create(Layout(DIM, DIM, True))
    s = EdgeStore(tmp_path / "idx", options=options)
    with s.parallel_writes():
        s.create(Layout(DIM, DIM, True))
        assert s.chunks not in s._shards and s._writers is not None and s.chunk_shards == 3
        assert s.layout() == Layout(DIM, DIM, True)  # waits for the processes' shards
        s.create(Layout(DIM, DIM, True))  # a second run's check finds them
        s.upsert(s.chunks, chunks(range(12)))
        s.upsert(s.papers, paper_points(range(12)))
    for i, name in enumerate(["chunks", "chunks.1", "chunks.2"]):
        made, expected = (
            json.loads((p / name / "edge_config.json").read_text()) for p in (tmp_path / "idx", tmp_path / "here")
        )
        assert made == expected and made["hnsw_config"]["m"] == 0
        assert set(s._shard_list(s.chunks)[i].info().payload_schema) == {
            "paper_id",
            "paper_uuid",
            "year",
            "chunk_index",
        }
    assert s.count(s.chunks) == 60 and s.count(s.papers) == 12
    assert {
        h.payload["paper_id"]
        for h in s.search(s.chunks, np.ones(DIM, dtype=np.float32), 60, SearchFilter(year_from=2003))
    } == {f"p{p}" for p in range(12) if 2000 + p % 5 >= 2003}
    s.close()
    here.close()


def test_a_new_index_whose_chunk_shard_cannot_be_created_gets_no_chunk(tmp_path):
    """A writer process that cannot create its shard fails the run; the other shards got no write,
    and are removed, so the next run creates the collection whole."""
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "chunks.1").write_text("in the way")
    s = EdgeStore(tmp_path / "idx", options=StoreOptions(chunk_shards=3))
    with pytest.raises(StoreError, match="chunk shard 1: cannot create"):
        with s.parallel_writes():
            s.create(Layout(DIM, DIM, True))
            s.upsert(s.chunks, chunks(range(12)))
            s.upsert(s.papers, paper_points(range(12)))
            s.flush()
    assert s.count(s.papers) == 0 and s.layout() is None
    assert not (tmp_path / "idx" / "chunks").exists() and not (tmp_path / "idx" / "chunks.2").exists()
    (tmp_path / "idx" / "chunks.1").unlink()
    with s.parallel_writes():
        s.create(Layout(DIM, DIM, True))
        s.upsert(s.chunks, chunks(range(12)))
        s.upsert(s.papers, paper_points(range(12)))
    assert s.count(s.chunks) == 60 and s.count(s.papers) == 12 and s.chunk_shards == 3
    s.close()


def test_after_parallel_writes_the_chunk_shards_open_on_first_use(tmp_path, monkeypatch):
    """A bulk run ends without opening the chunk shards again in-process; the first read opens them,
    and finish_bulk opens them once, with the graph settings it restores."""
    s = EdgeStore(tmp_path / "idx", options=StoreOptions(chunk_shards=2, bulk_load=True))
    s.create(Layout(DIM, DIM, True))
    loads = []
    real_load = s.qe.EdgeShard.load
    monkeypatch.setattr(
        s.qe.EdgeShard, "load", lambda path, *cfg: loads.append((Path(path).name, bool(cfg))) or real_load(path, *cfg)
    )
    with s.parallel_writes():
        s.upsert(s.chunks, chunks(range(6)))
        s.upsert(s.papers, paper_points(range(6)))
    assert s.chunk_shards == 2 and loads == []
    s.finish_bulk()
    assert sorted(loads) == [("chunks", True), ("chunks.1", True), ("papers", True)]
    assert s.hnsw_m(s.chunks) == s.options.hnsw_m > 0
    assert len(s.search(s.chunks, np.ones(DIM, dtype=np.float32), 5)) == 5 and s.count(s.chunks) == 30
    s.close()
    again = EdgeStore(tmp_path / "idx")
    with again.parallel_writes():
        again.upsert(again.chunks, chunks([9]))
    assert again.count(again.chunks) == 35  # read after the second run: opened then
    again.close()


def test_a_shard_that_cannot_be_opened_is_a_clear_error(tmp_path):
    s = sharded(tmp_path / "idx", shards=2)
    with s.parallel_writes():
        s.upsert(s.chunks, chunks(range(4)))
    (tmp_path / "idx" / "chunks.1" / "edge_config.json").write_text("{not json")
    with pytest.raises(StoreUnavailable, match="cannot open embedded collection"):
        s.count(s.chunks)  # opened on first use after parallel_writes
    s.close()
    with pytest.raises(StoreUnavailable, match="cannot open embedded collection"):
        EdgeStore(tmp_path / "idx")
