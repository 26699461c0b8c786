"""How writes reach the embedded store's chunk shards: gathered into messages of a set size for
each shard's writer process, in order with deletes, vectors carried apart from the pickled rest; a
busy writer holding up no other; where this process writes, short calls."""

import signal
import threading

import numpy as np
import pytest

from indexer.store import Point, chunk_point_id, chunk_shard, paper_point_id
from indexer.store import writers as writers_module

from support.edge import DIM, chunks, entries, paper_points, sharded


def test_a_busy_writer_does_not_hold_up_writes_to_the_others(tmp_path):
    """A write is handed to its shard's pipe and the caller goes on: while shard 0's process is
    busy (here: stopped), writes bigger than a default pipe (64 KiB) still reach shard 1 at once."""
    s = sharded(tmp_path / "idx", shards=2)
    papers = {i: [p for p in range(200) if chunk_shard(f"p{p}", 2) == i][:4] for i in (0, 1)}
    with s.parallel_writes():
        s.flush()  # both processes have opened their shards
        busy = s._writers._procs[0]
        busy.send_signal(signal.SIGSTOP)
        try:
            big = {i: chunks(papers[i], per_paper=20) for i in (0, 1)}
            for pt in big[0] + big[1]:
                pt.payload["text"] = "word " * 1000  # 80 chunks: ~400 KB a message
            sent = threading.Thread(target=lambda: (s.upsert(s.chunks, big[0]), s.upsert(s.chunks, big[1])))
            sent.start()
            sent.join(5)
            assert not sent.is_alive(), "a write to a stopped writer blocked the caller"
        finally:
            busy.send_signal(signal.SIGCONT)
        sent.join()
        s.upsert(s.papers, paper_points(papers[0] + papers[1]))
    assert s.count(s.chunks) == 8 * 20 and s.count(s.papers) == 8
    s.close()


def test_chunk_writes_are_gathered_into_messages_of_a_set_size(tmp_path, monkeypatch):
    """Points go to a shard's process writer_message_points at a time (each message costs the writer
    thread the interpreter lock twice); what is left over is sent when the block ends."""
    sizes = []
    real_pack = writers_module.pack

    def counting(points):
        sizes.append(len(points))
        return real_pack(points)

    monkeypatch.setattr(writers_module, "pack", counting)
    s = sharded(tmp_path / "idx", shards=2, writer_message_points=4)
    points = chunks(range(9))  # 45 points over two shards
    with s.parallel_writes():
        for p in points:  # one point a call, as a slow caller might
            s.upsert(s.chunks, [p])
    per_shard = [sum(chunk_shard(p.payload["paper_id"], 2) == i for p in points) for i in range(2)]
    assert sum(sizes) == 45 and max(sizes) == 4
    assert len(sizes) == sum(-(-n // 4) for n in per_shard)  # full messages, then one remainder a shard
    assert s.count(s.chunks) == 45
    s.close()


def test_gathered_chunk_writes_keep_their_order_with_deletes(tmp_path):
    """A delete is not sent ahead of writes gathered before it: deleted papers stay deleted, and
    chunks written after the delete are the ones kept."""
    s = sharded(tmp_path / "idx", shards=2, writer_message_points=1000)  # everything gathered until sent
    with s.parallel_writes():
        s.upsert(s.chunks, chunks(range(10)))
        s.delete_chunks([f"p{p}" for p in range(5)])
        s.upsert(s.chunks, chunks(range(3), seed=1))
    assert s.count(s.chunks) == 5 * 5 + 3 * 5
    stored = {p.id: p for page, _ in s.scroll(s.chunks) for p in page}
    expected = {
        p.id: p
        for p in chunks(range(3), seed=1)
        + [c for c in chunks(range(10)) if c.payload["paper_id"] in {f"p{i}" for i in range(5, 10)}]
    }
    assert set(stored) == set(expected)
    for pid, point in expected.items():
        np.testing.assert_allclose(stored[pid].vector, point.vector, rtol=1e-6)
    s.close()


def test_points_of_any_number_of_windows_arrive_as_they_were_sent(tmp_path):
    """A message carries its points' vectors in one array: each point gets its own rows back."""
    s = sharded(tmp_path / "idx", shards=2)
    rng = np.random.default_rng(3)
    points = [
        Point(
            chunk_point_id(f"p{p}", c),
            rng.standard_normal((1 + (p + c) % 4, DIM)).astype(np.float32),
            {"paper_id": f"p{p}", "paper_uuid": paper_point_id(f"p{p}"), "chunk_index": c, "text": f"p{p} c{c}"},
        )
        for p in range(12)
        for c in range(3)
    ]
    with s.parallel_writes():
        s.upsert(s.chunks, points)
    stored = {p.id: p for page, _ in s.scroll(s.chunks) for p in page}
    assert set(stored) == {p.id for p in points}
    for p in points:
        assert stored[p.id].payload["text"] == p.payload["text"]
        np.testing.assert_allclose(stored[p.id].vector, p.vector, rtol=1e-6)
    s.close()


def test_chunk_point_ids_are_the_uuid5_of_paper_and_chunk():
    """Ids of points already written must not change: the fast form is uuid5 exactly."""
    import uuid

    from indexer.store import NAMESPACE, chunk_point_id

    ids = ["p0", "arXiv:1706.03762", "doi:10.1000/xyz 123", "ünïcødé-论文", "x" * 500]
    for pid in ids:
        for i in (0, 1, 7, 12345):
            assert chunk_point_id(pid, i) == str(uuid.uuid5(NAMESPACE, f"{pid}:{i}"))


def test_messages_carry_arrays_apart_and_read_back_whole():
    import io

    from indexer.workers import frames, read_frames, write_frames

    vectors = np.arange(48 * 3 * 8, dtype=np.float32).reshape(-1, 8)
    message = ("upsert", ["a", "b"], vectors, [3, 0], [{"text": "ü" * 10}, {}])
    parts = frames(message)
    assert len(parts) == 3 and bytes(parts[2]) == vectors.tobytes()  # header, pickle, the array's bytes apart
    stream = io.BytesIO()
    write_frames(stream, parts)
    write_frames(stream, frames(("flush",)))
    stream.seek(0)
    op, ids, got, rows, payloads = read_frames(stream)
    assert (op, ids, rows, payloads) == message[:2] + message[3:] and np.array_equal(got, vectors)
    assert read_frames(stream) == ("flush",)
    with pytest.raises(EOFError):
        read_frames(stream)
    truncated = io.BytesIO(b"".join(bytes(p) for p in parts)[:-10])
    with pytest.raises(EOFError):
        read_frames(truncated)


def test_writes_in_this_process_go_in_short_calls(tmp_path):
    """Qdrant Edge holds the interpreter lock for a whole update: where this process writes (papers;
    chunks outside parallel_writes), it writes IN_PROCESS_UPSERT_POINTS points a call."""
    s = sharded(tmp_path / "idx", shards=1)
    calls: list = []

    class Counted:
        def __init__(self, shard):
            self._shard = shard

        def __getattr__(self, name):
            return getattr(self._shard, name)

        def update(self, op):
            calls.append(op)
            return self._shard.update(op)

    for name in (s.papers, s.chunks):
        s._shards[name] = [Counted(sh) for sh in s._shards[name]]
    s.upsert(s.papers, paper_points(range(40)))
    s.upsert_chunks(entries(range(7)))  # 35 chunks
    assert len(calls) == 3 + 3  # 40 papers: 16 + 16 + 8; 35 chunks: 16 + 16 + 3
    assert s.count(s.papers) == 40 and s.count(s.chunks) == 35
    s.close()
