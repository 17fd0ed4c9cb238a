"""The read scheduler: reader threads that move experts from the slow tier into slots.

Requests wait in a priority queue, in the order decode will need them: demand reads (decode is
waiting for them) before hints, and within each class by layer, then by the predictor's rank (a
hint of layer N+1 before one of N+2 however late it came, the most likely expert first); a
second request for an expert already queued or in flight merges with the first (and can raise
its priority); a queued hint that turned out unneeded is cancelled before it takes disk time.
A hint raised to demand while a reader has it keeps its new priority: the fill function looks
at it once the read has landed (`reading()`; the GPU tier then copies it on its demand stream).
Each request has a ready signal. A failed read is retried once; then its error surfaces at the
waiter. Waits have a timeout, so a stuck read is an error, never a hang. The
readers spend their time in `os.preadv`, which releases the GIL, so reads overlap the Numba
kernels (also GIL-free) that compute the experts already present. `timing` counts where the reads'
time goes: queued, in the fill, and the waiter's wake-up once a read it blocked on has landed.
"""

import heapq
import itertools
import threading
import time

from ..errors import LowmoeError, StorageError

DEMAND, HINT = 0, 1

_local = threading.local()  # .request: the Request the calling reader thread is reading


def reading():
    """The Request the calling reader thread is reading (for its fill function), else None."""
    return getattr(_local, "request", None)


class Request:
    def __init__(self, key, slot, priority, rank):
        self.key = key  # (layer, expert)
        self.slot = slot
        self.priority = priority  # DEMAND or HINT
        self.need = (key[0], rank)  # the order within a priority: layer, then the predictor's rank
        self.ready = threading.Event()
        self.error = None
        self.nbytes = 0
        self.taken = False  # a reader has started it
        self.queued_at = time.perf_counter()
        self.done_at = None  # when its read finished (perf_counter)


class ReadScheduler:
    """`fill(key, slot) -> bytes read` moves one expert from the slow tier into a slot (on the CPU a
    read into the host slab; on the GPU a read into pinned staging and a copy to the device)."""

    def __init__(self, fill, threads=2, timeout_s=30.0):
        self.fill = fill
        self.timeout_s = timeout_s
        self.queue = []  # heap of (priority, need, seq, Request); stale entries are skipped
        self.seq = itertools.count()
        self.pending = {}  # key -> Request, queued or in flight
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.closed = False
        self.bytes_read = 0
        self.retries = 0
        self.max_in_flight = 0
        # Where a read's time goes: queued (submit until a reader takes it), in the fill (the read
        # syscall, and on the GPU its copy), and the waiter's wake-up after the read finished.
        self.timing = dict.fromkeys(("reads", "queue_s", "fill_s", "wakes", "wake_s"), 0)
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"lowmoe-reader-{i}") for i in range(threads)]
        for t in self.threads:
            t.start()

    def submit(self, key, slot, priority=DEMAND, rank=0):
        """Queues a read of expert `key` into `slot`, the predictor's `rank`-th most likely of its
        layer; returns its Request (merged with a pending one)."""
        with self.lock:
            req = self.pending.get(key)
            if req is not None:
                if req.slot != slot:
                    raise ValueError(f"expert {key} is already being read into slot {req.slot}, not {slot}")
                self._raise(req, priority)
                return req
            req = Request(key, slot, priority, rank)
            self.pending[key] = req
            self.max_in_flight = max(self.max_in_flight, len(self.pending))
            heapq.heappush(self.queue, (priority, req.need, next(self.seq), req))
            self.wake.notify()
            return req

    def promote(self, req):
        """Raises a hint to demand priority (the gating chose it): a queued one is read before
        the other hints, one being read is a demand when its read lands (reading())."""
        with self.lock:
            self._raise(req, DEMAND)

    def _raise(self, req, priority):
        """Under self.lock: req's priority up to `priority`; a queued req moves up the queue."""
        if priority < req.priority:
            req.priority = priority
            if not req.taken:
                heapq.heappush(self.queue, (priority, req.need, next(self.seq), req))

    def cancel(self, req):
        """Drops a queued read that no one needs any more (a hint the gating did not choose), so
        the disk's time goes to reads that are needed. -> True if it was dropped before it
        started (its slot was never written), False if a reader has it or it finished."""
        with self.lock:
            if req.taken:
                return False
            req.taken = True  # its heap entries become stale
            del self.pending[req.key]
            return True

    def wait(self, req):
        """Blocks until `req` is read; raises StorageError on a failed or timed-out read.
        Returns the seconds spent waiting."""
        t0 = time.perf_counter()
        blocked = not req.ready.is_set()
        if not req.ready.wait(self.timeout_s):
            raise StorageError(f"read of expert {req.key} (layer, expert) did not finish within {self.timeout_s:g} s")
        t1 = time.perf_counter()
        if blocked:
            with self.lock:
                self.timing["wakes"] += 1
                self.timing["wake_s"] += t1 - req.done_at
        if req.error is not None:
            raise req.error
        return t1 - t0

    @property
    def in_flight(self):
        return len(self.pending)

    def _run(self):
        while True:
            with self.lock:
                while not self.closed and not self.queue:
                    self.wake.wait()
                if self.closed:
                    return
                req = heapq.heappop(self.queue)[-1]
                if req.taken:  # a stale entry left by a priority raise
                    continue
                req.taken = True
            _local.request = req
            t0 = time.perf_counter()
            self._read(req)
            req.done_at = time.perf_counter()
            with self.lock:
                del self.pending[req.key]
                self.bytes_read += req.nbytes
                self.timing["reads"] += 1
                self.timing["queue_s"] += t0 - req.queued_at
                self.timing["fill_s"] += req.done_at - t0
            req.ready.set()

    def _read(self, req):
        for attempt in range(2):
            try:
                req.nbytes = self.fill(req.key, req.slot)
                return
            except Exception as e:  # noqa: BLE001 - any failure is retried once, then reported
                if attempt == 0:
                    with self.lock:
                        self.retries += 1
                    continue
                req.error = e if isinstance(e, LowmoeError) else StorageError(
                    f"reading expert {req.key} (layer, expert) failed twice: {e}")

    def close(self):
        with self.lock:
            self.closed = True
            self.wake.notify_all()
        for t in self.threads:
            t.join()
