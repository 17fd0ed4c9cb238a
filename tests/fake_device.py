"""A stand-in for the GPU (lowmoe/tier/cuda_device.py's CupyDevice) with NumPy arrays, so the GPU expert
slots run on any machine: the copy stream is a thread that runs its copies in order, each after a
random delay, and events are set when the stream reaches them. Compute runs on the calling thread,
with exact.expert_rows (the arithmetic of the GPU's expert kernels) and exact.combine, and checks
every group it computes:

- each slot it reads was last written by a copy that an event the compute stream has waited on
  covers (recorded after it on the copy stream); else AssertionError, and without the wait the
  slot could still hold poison or an older expert;
- every event it waited on was recorded after copies into a slot it reads (no wait for an expert
  it does not need).

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
from lowmoe.load.weights import FFN


class Event:
    def __init__(self, seq=0):
        self.flag = threading.Event()
        self.seq = seq  # operations enqueued on its stream before it: it covers copies up to this one
        self.fills = ()  # addresses the recording thread copied to since its previous record

    @property
    def done(self):
        return self.flag.is_set()


class Stream:
    """Runs ("copy", dst, src), ("wait", event) and ("record", event) in order on its own thread."""

    def __init__(self, delay_s, seed):
        self.ops = queue.Queue()
        self.rng = random.Random(seed)
        self.delay_s = delay_s
        self.seq = 0  # operations enqueued so far
        self.pending = {}  # thread id -> addresses it copied to since its last record
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            op, *args = self.ops.get()
            if op == "copy":
                time.sleep(self.rng.random() * self.delay_s)
                np.copyto(*args)
            elif op == "wait":
                assert args[0].flag.wait(30), "copy stream: an event never completed"
            else:
                args[0].flag.set()


def _address(a):
    return a.__array_interface__["data"][0]


class FakeDevice:
    def __init__(self, delay_s=0.001, seed=0):
        self.delay_s, self.seed = delay_s, seed
        self.compute = "compute"  # runs synchronously on the caller's thread
        self.streams = 0
        self.device_bytes = 0  # every device allocation, for the memory checks
        self.pinned_bytes = 0
        self.lock = threading.Lock()
        self.last_copy = {}  # device array address -> seq of the copy that last wrote it
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
        with self.lock:  # the order of the queue is the order of seq
            stream.seq += 1
            self.last_copy[_address(dst)] = stream.seq
            stream.pending.setdefault(threading.get_ident(), []).append(_address(dst))
            stream.ops.put(("copy", dst, src))

    def record(self, stream):
        if stream == self.compute:
            event = Event()
            event.flag.set()
            return event
        with self.lock:
            event = Event(stream.seq)
            event.fills = tuple(stream.pending.pop(threading.get_ident(), ()))
            stream.ops.put(("record", event))
        return event

    def wait(self, stream, event):
        if stream != self.compute:
            stream.ops.put(("wait", event))
            return
        assert event.flag.wait(30), "compute stream: an event never completed"
        self.waited.add(event)
        self.waits += 1

    def synchronize(self, event):
        assert event.flag.wait(30), "an event never completed"

    def done(self, event):
        return event.done

    def to_host(self, a):
        return a.copy()

    def expert_sum(self, slab, u, idx, w, rows):
        return FakeSum(self, slab, u, idx, w, rows)

    def check_group(self, slab, group):
        """The checks of the module docstring, for one group {expert: slot}; clears the waits."""
        reads = set()
        with self.lock:
            for e, s in group.items():
                for a in map(_address, (slab.gate[s], slab.up[s], slab.down[s])):
                    seq = self.last_copy.get(a)
                    assert seq is not None, f"expert {e}: slot {s} was never filled"
                    assert any(ev.seq >= seq for ev in self.waited), \
                        f"expert {e}: slot {s} read without waiting on its copy's event"
                    reads.add(a)
        for ev in self.waited:
            assert reads & set(ev.fills), "the compute stream waited on an event of a slot it does not read"
        self.waited = set()
        self.groups += 1


class FakeSum:
    """cuda_device.SlotSum's contract on the host: each expert's output in its row (token t's j-th
    choice), every row written exactly once, the rows summed in rank order."""

    def __init__(self, dev, slab, u, idx, w, rows):
        self.dev, self.slab, self.u, self.idx, self.w, self.rows = dev, slab, u, idx, w, rows
        self.y = np.full(idx.shape + u.shape[1:], np.nan, np.float32)  # f32[T, k, D]
        self.host_rows = 0  # experts whose rows came from the CPU

    def add(self, group):
        self.dev.check_group(self.slab, group)
        sl = self.slab
        for e, s in group.items():
            ffn = FFN(sl.gate[s], sl.up[s], sl.down[s], sl.layout.dtype)
            self._put(e, _expert_out(exact.expert_rows, ffn, self.u, self.rows[e]))

    def add_rows(self, e, y):
        self._put(e, y)
        self.host_rows += 1

    def _put(self, e, y):
        t, j = np.nonzero(self.idx == e)
        assert np.isnan(self.y[t, j]).all(), f"expert {e}: its rows were written twice"
        self.y[t, j] = y

    def result(self):
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

    def expert_sum(self, slab, u, idx, w, rows):
        return cuda_device.SlotSum(self.cp, slab, u, idx, w)
