"""The read engine: a pool of threads issuing O_DIRECT reads of expert extents into slots.

A request is split into chunks that are in flight together, so one large
extent keeps several reads queued at the device. Demand reads go ahead of
prefetches, and a prefetch that a reader starts waiting for is promoted. A
prefetch starts only while no demand read is in flight, and in smaller chunks
(`prefetch_chunk_bytes`): a demand read that arrives while prefetches are being
read waits for their chunks under way, not for whole experts.
A request that has not started can be cancelled; once any chunk has started
it runs to the end, so a cancelled request never writes into memory that has
been handed to someone else. Failed reads (EIO and the like) are retried a
bounded number of times, then reported on the request. `os.preadv` releases
the GIL, so reads overlap with compute in the calling thread.

The engine knows nothing of experts or caches: it reads byte ranges into
buffers and calls back when a request is complete.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mer.errors import ExpertReadError
from mer.io.direct import DirectReader

DEMAND, PREFETCH = 0, 1


@dataclass(eq=False)
class ReadRequest:
    dest: memoryview
    offset: int
    priority: int
    what: str  # named in errors, e.g. "expert (layer 3, expert 5)"
    on_done: Callable[[ReadRequest], None] | None = None
    error: BaseException | None = None
    cancelled: bool = False
    started: bool = False
    chunks_left: int = 0
    seconds: float = 0.0  # from submit to completion
    submitted: float = field(default_factory=time.perf_counter)
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        """Block until complete; raise the read's error if it failed."""
        self._done.wait()
        if self.error is not None:
            raise self.error

    def wait_quietly(self) -> None:
        """Block until complete, whatever the outcome."""
        self._done.wait()


@dataclass(eq=False)
class _Chunk:
    request: ReadRequest
    start: int  # within the request
    end: int
    taken: bool = False
    demand: bool = False  # taken as a demand read


@dataclass
class EngineStats:
    requests: int = 0
    bytes_read: int = 0
    busy_seconds: float = 0.0  # wall time with at least one read in flight
    cancelled: int = 0
    retries: int = 0


class ReadEngine:
    def __init__(
        self,
        reader: DirectReader,
        threads: int = 4,
        chunk_bytes: int = 8 << 20,
        retries: int = 2,
        read: Callable[[DirectReader, memoryview, int], None] | None = None,
        prefetch_chunk_bytes: int = 1 << 20,
    ) -> None:
        if threads < 1:
            raise ValueError("the read engine needs at least one thread")
        self.reader = reader
        self.chunk_bytes = chunk_bytes
        self.prefetch_chunk_bytes = min(prefetch_chunk_bytes, chunk_bytes)
        self.retries = retries
        self._read = read or (lambda r, buf, off: r.read_into(buf, off))
        self.stats = EngineStats()
        self._heap: list[tuple[int, int, _Chunk]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._in_flight = 0
        self._demand_in_flight = 0  # a prefetch chunk starts only while this is 0
        self._busy_since = 0.0
        self._threads = [
            threading.Thread(target=self._worker, name=f"mer-read-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    @property
    def threads(self) -> int:
        return len(self._threads)

    def submit(
        self,
        dest: memoryview,
        offset: int,
        priority: int = DEMAND,
        what: str = "read",
        on_done: Callable[[ReadRequest], None] | None = None,
    ) -> ReadRequest:
        req = ReadRequest(dest, offset, priority, what, on_done)
        n = len(dest)
        step = self.chunk_bytes if priority == DEMAND else self.prefetch_chunk_bytes
        bounds = list(range(0, n, step)) + [n]
        chunks = [_Chunk(req, a, b) for a, b in itertools.pairwise(bounds)]
        req.chunks_left = len(chunks)
        with self._cv:
            if self._closed:
                raise RuntimeError("read engine is closed")
            self.stats.requests += 1
            for c in chunks:
                heapq.heappush(self._heap, (priority, next(self._seq), c))
            self._cv.notify(len(chunks))
        return req

    def promote(self, req: ReadRequest) -> None:
        """Make a queued prefetch a demand read: its untaken chunks jump the queue."""
        with self._cv:
            if req.priority == DEMAND or req.done:
                return
            req.priority = DEMAND
            for _, _, c in list(self._heap):
                if c.request is req and not c.taken:
                    heapq.heappush(
                        self._heap, (DEMAND, next(self._seq), _Chunk(req, c.start, c.end))
                    )
                    c.taken = True  # the old entry is skipped when popped
            self._cv.notify_all()

    def cancel(self, req: ReadRequest) -> bool:
        """Cancel a request none of whose chunks has started. True if it will never write."""
        with self._cv:
            if req.started or req.done:
                return req.cancelled
            req.cancelled = True
            self.stats.cancelled += 1
        req._done.set()
        return True

    def _take(self, finished: list[ReadRequest]) -> _Chunk | None:
        """Pop the next chunk worth reading (lock held); requests completed by dropping
        chunks of failed requests go to `finished`. None: nothing runnable now. A prefetch
        waits while a demand read is in flight: it only uses bandwidth demand leaves."""
        while self._heap:
            if self._heap[0][0] != DEMAND and self._demand_in_flight:
                return None
            priority, _, c = heapq.heappop(self._heap)
            if c.taken:  # superseded by a promoted copy
                continue
            c.taken = True
            if c.request.cancelled or c.request.error is not None:
                if self._chunk_finished(c.request):
                    finished.append(c.request)
                continue
            c.request.started = True
            c.demand = priority == DEMAND
            self._demand_in_flight += c.demand
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
            return c
        return None

    def _worker(self) -> None:
        while True:
            finished: list[ReadRequest] = []
            with self._cv:
                while (c := self._take(finished)) is None and not finished:
                    if self._closed:
                        return
                    self._cv.wait()
            for req in finished:  # callbacks run outside the lock
                self._finish(req)
            if c is None:
                continue
            req = c.request
            error = None
            for attempt in range(self.retries + 1):
                try:
                    self._read(self.reader, req.dest[c.start : c.end], req.offset + c.start)
                    error = None
                    break
                except (OSError, ExpertReadError) as e:
                    error = e
                    if attempt < self.retries:
                        with self._cv:
                            self.stats.retries += 1
            with self._cv:
                self._in_flight -= 1
                if c.demand:
                    self._demand_in_flight -= 1
                    if not self._demand_in_flight and self._heap:
                        self._cv.notify_all()  # prefetches may start now
                if self._in_flight == 0:
                    self.stats.busy_seconds += time.perf_counter() - self._busy_since
                if error is None:
                    self.stats.bytes_read += c.end - c.start
                elif req.error is None:
                    req.error = ExpertReadError(
                        f"{self.reader.path}: reading {req.what} at offset {req.offset} failed "
                        f"after {self.retries + 1} attempts ({error})"
                    )
                complete = self._chunk_finished(req)
            if complete:
                self._finish(req)

    @staticmethod
    def _chunk_finished(req: ReadRequest) -> bool:
        """Count one chunk read or dropped (lock held); True when that completes the request.

        A failed request completes only when none of its chunks is still being read, so
        its buffer is quiet by the time anyone hears of the failure.
        """
        req.chunks_left -= 1
        return req.chunks_left == 0 and not req.cancelled

    def _finish(self, req: ReadRequest) -> None:
        """Run the request's callback (which may fail it, e.g. on a bad checksum), then wake
        its waiters. The callback also runs for failed requests, to clean up."""
        if req.on_done is not None:
            try:
                req.on_done(req)
            except BaseException as e:
                req.error = req.error or e
        req.seconds = time.perf_counter() - req.submitted
        req._done.set()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
