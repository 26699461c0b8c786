"""The index queue: a bounded queue of jobs and one worker thread that runs them through the Indexer.

One worker keeps writes ordered (a later post of a paper lands after an earlier one) and the model
busy with one batch at a time; searches run beside it in the request thread pool. The queue is
bounded so a burst of posts is answered with 429 instead of growing memory.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from indexer.papers import PaperIn
from indexer.pipeline import Indexer, IndexStats

from .errors import QueueFull, ShuttingDown, UnknownJob, classify
from .metrics import Metrics
from .schemas import IndexJob, JobCounts, PaperError

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Job:
    id: str
    papers: list[PaperIn]
    rejected: list[PaperError]
    received: int
    force: bool = False
    kind: str = "index"  # or "delete": deletes share the queue so writes land in the order they were posted
    delete_ids: list[str] = field(default_factory=list)
    deleted: int = 0
    status: str = "queued"
    submitted_at: datetime = field(default_factory=_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    indexed: int = 0
    unchanged: int = 0
    chunks: int = 0
    exc: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def view(self) -> IndexJob:
        counts = JobCounts(
            received=self.received, accepted=self.received - len(self.rejected), rejected=len(self.rejected),
            indexed=self.indexed, unchanged=self.unchanged, chunks=self.chunks, deleted=self.deleted,
        )
        error = classify(self.exc).detail if self.exc is not None else None
        return IndexJob(
            job_id=self.id, kind=self.kind, status=self.status, submitted_at=self.submitted_at,
            started_at=self.started_at, finished_at=self.finished_at, counts=counts, errors=self.rejected, error=error,  # type: ignore[arg-type]
        )

    async def wait(self, timeout: float) -> bool:
        """Wait without holding a thread; True when the job finished within `timeout` seconds."""
        ev = asyncio.Event()
        entry = (asyncio.get_running_loop(), ev)
        with self._lock:
            if self.done.is_set():
                return True
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(ev.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return self.done.is_set()
        finally:
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)

    def finish(self, status: str, exc: BaseException | None = None) -> None:
        self.status, self.exc, self.finished_at = status, exc, _now()
        self.papers = []  # the posted texts are not needed any more
        with self._lock:
            self.done.set()
            waiters, self._waiters = self._waiters, []
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that request's event loop is gone
                pass


class JobQueue:
    def __init__(
        self,
        indexer: Indexer,
        maxsize: int,
        metrics: Metrics,
        before_job: Callable[[], None] | None = None,
        history: int = 1000,
    ) -> None:
        self.indexer = indexer
        self.metrics = metrics
        self.before_job = before_job
        self.history = history
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=maxsize)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._seconds_per_job = 5.0  # moving average, for Retry-After
        metrics.queue_depth.set_function(self.depth)

    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="index-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running job (up to `timeout`), fail the queued ones, end the worker."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.finish("failed", ShuttingDown("the server shut down before this job ran; post the papers again"))
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, papers: list[PaperIn], rejected: list[PaperError], received: int, force: bool = False) -> Job:
        job = self._put(Job(uuid.uuid4().hex, papers, rejected, received, force))
        log.info("index job %s queued: %d papers (%d rejected)", job.id, len(papers), len(rejected))
        return job

    def submit_delete(self, paper_ids: list[str]) -> Job:
        return self._put(Job(uuid.uuid4().hex, [], [], 0, kind="delete", delete_ids=paper_ids))

    def _put(self, job: Job) -> Job:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.jobs.labels("rejected").inc()
            raise QueueFull(
                f"the index queue is full ({self._queue.maxsize} jobs waiting); retry later", self.retry_after()
            ) from None
        with self._lock:
            self._jobs[job.id] = job
            self._forget_old()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"no index job {job_id!r} (finished jobs are kept for the last {self.history} jobs, "
                             "and not across restarts)")
        return job

    def retry_after(self) -> int:
        return max(1, min(600, math.ceil(self._seconds_per_job * max(1, self.depth()))))

    def _forget_old(self) -> None:
        while len(self._jobs) > self.history:
            oldest = next(iter(self._jobs.values()))
            if not oldest.done.is_set():
                break
            self._jobs.popitem(last=False)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            self._run(job)
            if job.kind != "delete" and job.status == "done" and self._queue.empty():
                self._optimize()

    def _optimize(self) -> None:
        """Build HNSW graphs for what the last jobs wrote, once the queue is idle: the embedded engine
        optimizes only when asked (papers are searchable before this, by plain scan of new segments)."""
        try:
            self.indexer.store.finish_bulk()
        except Exception as exc:  # the data is written; a failed optimization is retried after the next job
            log.warning("index optimization failed: %s", exc)

    def _run(self, job: Job) -> None:
        job.status, job.started_at = "running", _now()
        t0 = time.perf_counter()

        def progress(stats: IndexStats) -> None:
            job.indexed, job.unchanged, job.chunks = stats.papers_indexed, stats.papers_unchanged, stats.chunks

        try:
            if self.before_job is not None:
                self.before_job()
            if job.kind == "delete":
                job.deleted = self.indexer.delete(job.delete_ids)
                self.metrics.papers_deleted.inc(job.deleted)
            else:
                stats = self.indexer.index(job.papers, force=job.force, on_batch=progress)
                progress(stats)
                self.metrics.papers_indexed.inc(stats.papers_indexed)
                self.metrics.papers_unchanged.inc(stats.papers_unchanged)
                self.metrics.chunks_indexed.inc(stats.chunks)
        except Exception as exc:
            m = classify(exc)
            log.error("%s job %s failed: %s", job.kind, job.id, m.detail, exc_info=m.code == "internal_error")
            self.metrics.jobs.labels("failed").inc()
            job.finish("failed", exc)
        else:
            log.info("%s job %s done in %.1fs: %d indexed, %d unchanged, %d chunks, %d deleted",
                     job.kind, job.id, time.perf_counter() - t0, job.indexed, job.unchanged, job.chunks, job.deleted)
            self.metrics.jobs.labels("done").inc()
            job.finish("done")
        finally:
            elapsed = time.perf_counter() - t0
            self.metrics.job_seconds.observe(elapsed)
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed
