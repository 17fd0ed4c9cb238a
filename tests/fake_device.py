"""A stand-in for the GPU (lowmoe/tier/cuda_device.py's CupyDevice) with NumPy arrays, so the GPU expert
slots run on any machine. Every stream, the compute stream and each copy stream, is a thread that
runs its operations in the order they were enqueued: a copy or a kernel after a random (seeded)
delay, a wait once its event is set; an event is set when its stream reaches it. A kernel
(FakeSum.add, with exact.expert_rows, the arithmetic of the GPU's expert kernels) reads the slots
when the compute thread runs it, not when it is enqueued, so a copy that does not wait for the
last kernel reading its slot overwrites the slot under it. The host sees a layer's output
(FakeSum.result, standing for the device-to-host copy of it) only once the compute stream has run
everything enqueued before.

Every group is checked when its kernel is enqueued:

- each slot it reads was last written by a copy that an event the compute stream has waited on
  covers (recorded after it on the same copy stream); else AssertionError, and without the wait
  the slot could still hold poison or an older expert;
- every event it waited on was recorded after copies into a slot it reads (no wait for an expert
  it does not need);

and when it runs: no copy has started into a slot it reads since the copy it was checked against
(before or while it reads), else AssertionError "overwrote". An error on a stream's thread is kept
and raised by the host's next synchronize on one of that stream's events, as CUDA reports an
asynchronous error at a later sync.

Device memory starts as all-ones bits (NaN in f32, f16 and bf16), so a slot read before its copy
poisons the output.
"""

import queue
import random
import threading
import time

import numpy as np

from lowmoe.backend import exact
from lowmoe.tier import cuda_device
from lowmoe.tier.experts import _expert_out
from lowmoe.tier.slots import aligned_empty


class Event:
    def __init__(self, stream, seq):
        self.flag = threading.Event()
        self.stream = stream
        self.seq = seq  # copies enqueued on its stream before it: it covers copies up to this one
        self.fills = ()  # addresses the recording thread copied to since its previous record

    @property
    def done(self):
        return self.flag.is_set()


class Stream:
    """Runs ("run", fn), ("wait", event) and ("record", event) in order on its own thread, each fn
    after a random delay of up to delay_s; keeps the first error an operation raised (`error`)."""

    def __init__(self, delay_s, seed):
        self.ops = queue.Queue()
        self.rng = random.Random(seed)
        self.delay_s = delay_s
        self.seq = 0  # copies enqueued so far
        self.pending = {}  # thread id -> addresses it copied to since its last record
        self.error = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            op, arg = self.ops.get()
            try:
                if op == "run":
                    time.sleep(self.rng.random() * self.delay_s)
                    arg()
                elif op == "wait":
                    assert arg.flag.wait(30), "stream: an event never completed"
                else:
                    arg.flag.set()
            except BaseException as e:  # noqa: BLE001 - kept for the host's next sync, as CUDA does
                self.error = self.error or e


def _address(a):
    return a.__array_interface__["data"][0]


class FakeDevice:
    """delay_s: the longest delay of a copy; compute_delay_s: of a kernel."""

    def __init__(self, delay_s=0.001, seed=0, compute_delay_s=0.001):
        self.delay_s, self.seed = delay_s, seed
        self.compute = Stream(compute_delay_s, 100 * seed)
        self.streams = 0
        self.device_bytes = 0  # every device allocation, for the memory checks
        self.pinned_bytes = 0
        self.lock = threading.Lock()
        self.last_copy = {}  # device array address -> (stream, seq) of the copy last enqueued into it
        self.landed = {}  # device array address -> (stream, seq) of the copy that last started into it
        self.waited = set()  # events the compute stream waited on since its last group
        self.waits = 0
        self.groups = 0

    def empty(self, shape, dtype):
        a = np.empty(shape, dtype)
        a.view(np.uint8).fill(0xFF)
        self.device_bytes += a.nbytes
        return a

    def pinned(self, nbytes):
        self.pinned_bytes += nbytes
        return aligned_empty(nbytes)

    def stream(self):
        self.streams += 1
        return Stream(self.delay_s, 100 * self.seed + self.streams)

    def copy(self, dst, src, stream):
        assert dst.flags.c_contiguous and dst.shape == src.shape and dst.dtype == src.dtype
        a = _address(dst)

        def land():
            self.landed[a] = copy
            np.copyto(dst, src)

        with self.lock:  # the order of the queue is the order of seq
            stream.seq += 1
            copy = (stream, stream.seq)
            self.last_copy[a] = copy
            stream.pending.setdefault(threading.get_ident(), []).append(a)
            stream.ops.put(("run", land))

    def record(self, stream):
        with self.lock:
            event = Event(stream, stream.seq)
            event.fills = tuple(stream.pending.pop(threading.get_ident(), ()))
            stream.ops.put(("record", event))
        return event

    def wait(self, stream, event):
        stream.ops.put(("wait", event))
        if stream is self.compute:
            self.waited.add(event)
            self.waits += 1

    def synchronize(self, event):
        assert event.flag.wait(30), "an event never completed"
        if event.stream.error is not None:
            raise event.stream.error

    def done(self, event):
        return event.done

    def to_host(self, a):
        return a.copy()

    def expert_sum(self, slab, u, idx, w, rows, layout):
        return FakeSum(self, slab, u, idx, w, rows, layout)

    def check_group(self, slab, group):
        """The enqueue checks of the module docstring, for one group {expert: slot}; clears the
        waits. -> {address: (slot, copy)}: the copy each address read must hold when the kernel runs."""
        reads = {}
        with self.lock:
            for e, s in group.items():
                for a in map(_address, (slab.gate[s], slab.up[s], slab.down[s])):
                    copy = self.last_copy.get(a)
                    assert copy is not None, f"expert {e}: slot {s} was never filled"
                    assert any(ev.stream is copy[0] and ev.seq >= copy[1] for ev in self.waited), \
                        f"expert {e}: slot {s} read without waiting on its copy's event"
                    reads[a] = (s, copy)
        for ev in self.waited:
            assert reads.keys() & set(ev.fills), "the compute stream waited on an event of a slot it does not read"
        self.waited = set()
        self.groups += 1
        return reads

    def check_landed(self, reads):
        """The run check of the module docstring, for check_group's `reads`."""
        for a, (s, copy) in reads.items():
            assert self.landed[a] is copy, f"slot {s}: a copy overwrote it before the kernel reading it was done"


class FakeSum:
    """cuda_device.SlotSum's contract on the host: each expert's output in its row (token t's j-th
    choice), every row written exactly once, the rows summed in rank order. Kernels and the CPU's
    rows (an upload) are enqueued on the compute stream."""

    def __init__(self, dev, slab, u, idx, w, rows, layout):
        self.dev, self.slab, self.u, self.idx, self.w, self.rows, self.layout = dev, slab, u, idx, w, rows, layout
        self.y = np.full(idx.shape + u.shape[1:], np.nan, np.float32)  # f32[T, k, D]
        self.host_rows = 0  # experts whose rows came from the CPU

    def add(self, group):
        reads = self.dev.check_group(self.slab, group)
        group = dict(group)
        self.dev.compute.ops.put(("run", lambda: self._kernel(group, reads)))

    def _kernel(self, group, reads):
        """On the compute thread: the group's rows from what its slots hold now."""
        self.dev.check_landed(reads)
        for e, s in group.items():
            self._put(e, _expert_out(exact.expert_rows, self.slab.ffn(s, self.layout), self.u, self.rows[e]))
        self.dev.check_landed(reads)  # and no copy started into them while it read them

    def add_rows(self, e, y):
        self.dev.compute.ops.put(("run", lambda: self._put(e, y)))
        self.host_rows += 1

    def _put(self, e, y):
        t, j = np.nonzero(self.idx == e)
        assert np.isnan(self.y[t, j]).all(), f"expert {e}: its rows were written twice"
        self.y[t, j] = y

    def result(self):
        self.dev.synchronize(self.dev.record(self.dev.compute))  # the host's copy waits for the kernels
        assert not np.isnan(self.y).any(), "a chosen expert's row was never written"
        return exact.combine(self.y, self.w)


class KernelDevice(FakeDevice):
    """A FakeDevice whose expert sums run the real CUDA kernels: cuda_device.SlotSum over the CuPy
    stand-in `cp` (tests/host_cupy.py). Those run at once on the calling thread, so a wait of the
    compute stream blocks the caller here, as on a GPU it holds back the kernels enqueued after it."""

    def __init__(self, cp, **options):
        super().__init__(**options)
        self.cp = cp

    def wait(self, stream, event):
        super().wait(stream, event)
        if stream is self.compute:
            self.synchronize(event)

    def expert_sum(self, slab, u, idx, w, rows, layout):
        return cuda_device.SlotSum(self.cp, slab, u, idx, w, layout)
