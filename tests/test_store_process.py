"""The embedded store run by a child process (bulk indexing): what differs from running it in-process.
The shared behaviour is the store contract (test_store_contract.py runs it on this backend too)."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from indexer.store import EdgeStore, Layout, Point, StoreError, StoreUnavailable, chunk_point_id, paper_point_id
from indexer.store_process import StoreProcess

DIM = 768


def chunks(n, windows=3, seed=0):
    rng = np.random.default_rng(seed)
    text = " ".join(f"word{i}" for i in rng.integers(0, 5000, 500))
    return [Point(chunk_point_id(f"p{i // 10}", i % 10), rng.standard_normal((windows, DIM)).astype(np.float32),
                  {"paper_id": f"p{i // 10}", "paper_uuid": paper_point_id(f"p{i // 10}"), "chunk_index": i % 10, "year": 2020, "text": text})
            for i in range(n)]


def test_errors_come_back_with_their_type_and_message(tmp_path):
    s = StoreProcess(tmp_path / "idx")
    with pytest.raises(StoreError, match="index some papers first"):
        s.search(s.chunks, np.zeros(DIM, dtype=np.float32), 3)
    s.create(Layout(DIM, DIM, True))
    with pytest.raises(StoreError, match="was built with"):
        s.create(Layout(DIM, 384, True))
    assert s.count(s.chunks) == 0  # still serving after errors
    s.close()


def test_an_unreadable_index_fails_at_open(tmp_path):
    (tmp_path / "idx" / "chunks").mkdir(parents=True)
    (tmp_path / "idx" / "chunks" / "edge_config.json").write_text("not json")
    with pytest.raises(StoreUnavailable, match="cannot open"):
        StoreProcess(tmp_path / "idx")


def test_close_flushes_and_ends_the_child(tmp_path):
    s = StoreProcess(tmp_path / "idx")
    s.create(Layout(DIM, DIM, True))
    s.upsert(s.chunks, chunks(30))
    s.close()
    assert s._proc.poll() == 0
    s.close()  # a second close does nothing
    with pytest.raises(StoreError, match="closed"):
        s.count(s.chunks)
    again = EdgeStore(tmp_path / "idx")
    assert again.count(again.chunks) == 30
    again.close()


def test_a_dead_child_is_a_clear_error(tmp_path):
    s = StoreProcess(tmp_path / "idx")
    s.create(Layout(DIM, DIM, True))
    s._proc.kill()
    s._proc.wait()
    with pytest.raises(StoreError, match="exited"):
        s.upsert(s.chunks, chunks(3))
    s.close()


def test_ctrl_c_is_left_to_the_parent(tmp_path):
    s = StoreProcess(tmp_path / "idx")
    s.create(Layout(DIM, DIM, True))
    os.kill(s._proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    time.sleep(0.2)
    s.upsert(s.chunks, chunks(5))
    s.close()
    assert EdgeStore(tmp_path / "idx").count("chunks") == 5


def test_writes_cost_the_calling_thread_a_fraction_of_in_process_writes(tmp_path):
    """The point of the child: the caller's thread (which holds the interpreter lock while it runs)
    only pickles. Thread CPU time, not wall time, so a busy machine does not change the verdict."""
    points = chunks(400)

    def caller_cpu(store) -> float:
        store.create(Layout(DIM, DIM, True))
        t = time.thread_time()
        for i in range(0, len(points), 16):
            store.upsert(store.chunks, points[i : i + 16])
        store.flush()
        spent = time.thread_time() - t
        assert store.count(store.chunks) == len(points)
        store.close()
        return spent

    inside = caller_cpu(EdgeStore(tmp_path / "a"))
    child = caller_cpu(StoreProcess(tmp_path / "b"))
    assert child < inside / 3, (child, inside)


def test_open_waits_for_a_closing_store_process(tmp_path):
    """After a crash, the crashed run's store process may still be closing the shards when the
    rerun opens them: the rerun waits for it (and only a few seconds for a store held for good)."""
    first = StoreProcess(tmp_path / "idx")
    first.create(Layout(DIM, DIM, True))
    first.upsert(first.chunks, chunks(10))
    threading.Timer(1.0, first.close).start()
    t = time.monotonic()
    second = StoreProcess(tmp_path / "idx")
    assert time.monotonic() - t >= 0.9
    assert second.count(second.chunks) == 10
    second.close()


def test_a_store_held_by_another_process_is_a_clear_error(tmp_path):
    held = EdgeStore(tmp_path / "idx")
    held.create(Layout(DIM, DIM, True))
    t = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot open"):
        StoreProcess(tmp_path / "idx", open_wait_s=0.5)
    assert time.monotonic() - t < 5
    held.close()
