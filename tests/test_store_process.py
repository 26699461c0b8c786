"""Qdrant Edge in a child process (bulk indexing): ordering, failed writes, a dying parent.
The Store contract itself runs in test_store_contract.py."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.store import EdgeStore, Layout, Point, StoreError, chunk_point_id, paper_point_id
from indexer.store_process import StoreProcess

ROOT = Path(__file__).resolve().parent.parent
DIM = 4


def chunk(pid, ci):
    return Point(chunk_point_id(pid, ci), np.ones(DIM, np.float32), {"paper_id": pid, "chunk_index": ci, "year": 2020})


def paper(pid):
    return Point(paper_point_id(pid), np.ones(DIM, np.float32), {"paper_id": pid, "content_hash": "h"})


def test_writes_are_applied_in_order_before_any_answer(tmp_path):
    s = StoreProcess(tmp_path)
    s.create(Layout(DIM, DIM, False))
    for i in range(50):
        s.upsert(s.chunks, [chunk(f"p{i}", c) for c in range(3)])
        s.upsert(s.papers, [paper(f"p{i}")])
    s.delete_papers(["p0", "p1"])
    assert s.count(s.chunks) == 48 * 3 and s.count(s.papers) == 48
    assert set(s.committed(["p0", "p2"])) == {"p2"}
    s.close()
    again = EdgeStore(tmp_path)  # closed: the lock is free and everything was flushed
    assert again.count(again.papers) == 48
    again.close()


def test_a_failed_write_stops_later_writes_and_the_next_call_raises(tmp_path):
    s = StoreProcess(tmp_path)
    s.create(Layout(DIM, DIM, False))
    s.upsert(s.chunks, [chunk("a", 0)])
    s.upsert(s.chunks, [Point(chunk_point_id("a", 1), np.ones(DIM + 3, np.float32), {"paper_id": "a"})])  # wrong size
    s.upsert(s.papers, [paper("a")])  # must not land: its chunks failed
    with pytest.raises(StoreError, match="upsert"):
        s.count(s.papers)
    assert s.count(s.papers) == 0 and s.count(s.chunks) == 1  # reported once; the store goes on
    s.close()


def test_errors_of_waiting_calls_keep_their_type(tmp_path):
    s = StoreProcess(tmp_path)
    s.create(Layout(DIM, DIM, False))
    with pytest.raises(StoreError, match="built with"):
        s.create(Layout(DIM, DIM + 1, False))
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.count(s.chunks)


def test_killed_parent_leaves_complete_writes_and_frees_the_store(tmp_path):
    """kill -9 of the indexing process: the child applies what it was sent, closes, and a new run
    can open the same folder at once (waiting for the lock if the child is still closing)."""
    script = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        from indexer.store import Layout, Point, chunk_point_id, paper_point_id
        from indexer.store_process import StoreProcess
        s = StoreProcess({str(tmp_path)!r})
        s.create(Layout({DIM}, {DIM}, False))
        for i in range(100000):
            s.upsert(s.chunks, [Point(chunk_point_id(f"p{{i}}", 0), np.ones({DIM}, np.float32), {{"paper_id": f"p{{i}}"}})])
            s.upsert(s.papers, [Point(paper_point_id(f"p{{i}}"), np.ones({DIM}, np.float32), {{"paper_id": f"p{{i}}"}})])
            if i == 200:
                print("going", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "going"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    s = StoreProcess(tmp_path)
    papers, chunks = s.count(s.papers), s.count(s.chunks)
    assert 200 <= papers < 100000
    assert chunks in (papers, papers + 1)  # every paper point after its chunk: a prefix of the writes
    s.close()


def test_a_second_store_waits_for_the_first_to_close(tmp_path):
    first = StoreProcess(tmp_path)
    first.create(Layout(DIM, DIM, False))
    threading.Timer(1.0, first.close).start()
    t0 = time.monotonic()
    second = StoreProcess(tmp_path)
    assert time.monotonic() - t0 >= 0.5
    assert second.layout() == Layout(DIM, DIM, False)
    second.close()
