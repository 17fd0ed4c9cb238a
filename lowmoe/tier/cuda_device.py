"""The device the GPU expert slots (device_slots.py) run on, with CuPy: allocations, pinned host
memory, streams, events, host-to-device copies, and the expert sum over slots. The tests drive the
same slot code through a fake with these methods (tests/fake_device.py).

Compute runs on the stream the decoder's kernels use (the thread's current stream, the legacy
default stream unless changed); copies on non-blocking streams of their own (device_slots.py has
one for demand reads and one for hints), so that they never serialise with compute except where
an event says so.
"""

import time

import numpy as np

from .slots import ALIGN
from ..backend import cuda


class CupyDevice:
    def __init__(self):
        self.cp = cuda.cupy()
        self.compute = self.cp.cuda.get_current_stream()

    def empty(self, shape, dtype):
        return self.cp.empty(shape, dtype)

    def pinned(self, nbytes):
        """uint8[nbytes] of page-locked host memory at an ALIGN-aligned address (for O_DIRECT reads)."""
        import cupyx

        raw = cupyx.empty_pinned((nbytes + ALIGN,), np.uint8)
        start = -raw.ctypes.data % ALIGN
        return raw[start : start + nbytes]

    def stream(self):
        return self.cp.cuda.Stream(non_blocking=True)

    def copy(self, dst, src, stream):
        """Enqueues dst (device, contiguous) <- src (pinned host, same bytes) on `stream`."""
        rt = self.cp.cuda.runtime
        rt.memcpyAsync(dst.data.ptr, src.ctypes.data, src.nbytes, rt.memcpyHostToDevice, stream.ptr)

    def record(self, stream):
        event = self.cp.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        return event

    def wait(self, stream, event):
        stream.wait_event(event)

    def synchronize(self, event):
        event.synchronize()

    def done(self, event):
        return event.done

    def to_host(self, a):
        return self.cp.asnumpy(a)

    def expert_sum(self, slab, u, idx, w, rows, layout):
        return SlotSum(self.cp, slab, u, idx, w, layout)


class SlotSum:
    """A layer's routed experts from slots: cuda.expert_rows over slot ids, one launch per group
    (the slabs stand in for the layer's stacked experts), each output in its row of y; rows the CPU
    computed are uploaded into theirs; cuda.expert_combine sums them in rank order. Every group
    size gives the bits of the resident experts' kernels. u f32[T, D] and w f32[T, k] on the
    device, idx int64[T, k] expert ids on the host; `layout` the layer's (its formats)."""

    def __init__(self, cp, slab, u, idx, w, layout):
        self.cp, self.slab, self.u, self.idx, self.w, self.dtype = cp, slab, u, idx, w, layout.dtype
        self.y = cuda.buffer((idx.size, u.shape[1]))  # f32[T * k, D], row t * k + j

    def add(self, group):
        """group {expert: slot}: computes their rows."""
        slots = np.full(self.idx.shape, -1, np.int32)
        for e, s in group.items():
            slots[self.idx == e] = s
        sl = self.slab
        cuda.expert_rows(self.u, sl.gate, sl.up, sl.down, self.dtype, self.cp.asarray(slots), self.y)

    def add_rows(self, e, y):
        """y f32[n, D] on the host: expert e's output for the n tokens that chose it, in token order."""
        self.y[self.cp.asarray(np.flatnonzero(self.idx.reshape(-1) == e))] = self.cp.asarray(y)

    def result(self):
        out = cuda.buffer(self.u.shape)
        cuda.expert_combine(self.y, self.w, out)
        return out


def transfer_costs(dev, store, cfg, repeats=5):
    """(B: bytes/s of one expert from the slow tier through pinned staging to the device, as a miss
    moves it; C: bytes/s of the copy alone; r: seconds of a hidden state f32[1, D] to the host and
    back), medians of `repeats` after a warm-up, for hybrid's decisions. Reads experts 0.. of the
    first MoE layer."""
    cp, L = dev.cp, store.layout
    staging, dst = dev.pinned(L.block), cp.empty(L.block, np.uint8)
    stream = dev.stream()
    moves, copies = [], []
    for e in range(repeats + 1):
        t0 = time.perf_counter()
        store.read(cfg.moe_layers[0], e % cfg.num_experts, staging)
        t1 = time.perf_counter()
        dev.copy(dst, staging, stream)
        stream.synchronize()
        moves.append(time.perf_counter() - t0)
        copies.append(time.perf_counter() - t1)
    x = cp.zeros((1, cfg.hidden_size), np.float32)
    trips = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        x = cp.asarray(cp.asnumpy(x))
        cp.cuda.get_current_stream().synchronize()
        trips.append(time.perf_counter() - t0)
    return (L.nbytes / float(np.median(moves[1:])), L.nbytes / float(np.median(copies[1:])),
            float(np.median(trips[1:])))
