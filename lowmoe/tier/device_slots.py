"""Expert slots on the GPU: the tier `OffloadedExperts` uses with device="cuda" and a VRAM budget.

Memory: one preallocated device slab per weight role, gate and up [n, I, D] and down [n, D, I] in
the stored dtype (a GGUF block format: its bytes, each role as large as the largest layer's, an
expert in a smaller one packed from the slot's start); a slot id indexes all three. Nothing is
allocated or freed per expert: the SLRU policy (cache.py) decides which key a slot holds, and an
eviction only hands its slot id on.

A transfer (one per read the scheduler hands a reader thread): the slow tier reads the expert's
block into a free entry of a small pinned host ring, the three parts are copied to the slot on a
copy stream, and one event is recorded after them. There are two copy streams: one for demand
reads (decode is waiting for them), one for hints, so a demand copy never queues behind hint
copies (nor behind a hint's wait for a kernel still reading its slot). The stream is chosen once
the read has landed: a hint the gating chose meanwhile (promoted) is a demand by then. The ring
entry is reused only once that event has completed (the copy has read it). The copy stream first
waits for the event recorded after the last compute that read the slot, so a new expert never
overwrites one that a queued kernel still has to read, and for the slot's previous copy, which
may be on the other stream, so an older expert's copy never lands over the new one.

Compute: a layer's experts are computed by the device in groups (all of a layer's experts at once
unless a prefill routes to more experts than there are slots), each expert's output into its own
row, and the rows are summed in rank order at the end. Before a group's kernel the compute stream
waits on the transfer event of each slot the group reads, and of no other slot: a hint still
copying for a later layer never delays this one.

Misses on the CPU (`cpu_misses`, from --miss-policy): in decode, an expert whose read has landed in
the ring but whose copy is still in flight is computed by the CPU from the ring entry (held out of
the ring meanwhile), with exact.expert_rows, while the device computes the others; its row is
uploaded. That kernel computes the device kernels' exact bits, so which experts went where never
changes the output.

`dev` is the device: cuda_device.py's CupyDevice, or a fake in the tests with the same
methods (empty, pinned, stream, compute, copy, record, wait, synchronize, done, to_host,
expert_sum).
"""

import collections
import threading

import numpy as np

from ..backend import exact
from .experts import OffloadedExperts, _expert_out
from .prefetch import HINT, reading
from ..load.weights import FFN
from .slots import ALIGN, block_ffn, element_dtype

ROLES = ("gate", "up", "down")


class DeviceSlab:
    """n slots as three device arrays: gate, up [n, I, row], down [n, D, row], a row D or I weights
    (f32 / u16), or in a block format the bytes of the largest layer's row (layout.role_sizes)."""

    def __init__(self, dev, layout, n):
        self.layout = layout
        self.n = n
        self.rows = (layout.inter, layout.inter, layout.hidden)
        self.dtypes = tuple(np.dtype(element_dtype(f)) for f in layout.formats)
        for role, rows, dt, size in zip(ROLES, self.rows, self.dtypes, layout.role_sizes):
            setattr(self, role, dev.empty((n, rows, size // rows // dt.itemsize), dt))

    def ffn(self, slot, layout):
        """Views of the expert in `slot`, held in its layer's `layout`: as block_ffn's of a host block."""
        views = [getattr(self, role)[slot].reshape(-1)[: size // dt.itemsize].reshape(rows, -1)
                 for role, rows, dt, size in zip(ROLES, self.rows, self.dtypes, layout.sizes)]
        return FFN(*views, layout.dtype)

    @property
    def nbytes(self):
        return self.n * sum(self.layout.role_sizes)


class StagingRing:
    """`n` pinned host buffers of one slot block each (ALIGN-aligned, as O_DIRECT reads need); an
    entry is handed out again only after the copy that last read it has completed. A free entry
    remembers the slot whose bytes it holds, so a miss can be computed from it (hold)."""

    def __init__(self, dev, layout, n):
        self.dev = dev
        buf = dev.pinned(n * layout.block).reshape(n, layout.block)
        assert buf.ctypes.data % ALIGN == 0 and layout.block % ALIGN == 0
        self.nbytes = buf.nbytes
        self.n = n
        self.cond = threading.Condition()
        self.free = collections.deque((buf[i], None, None) for i in range(n))  # (entry, event of its last copy, slot)

    def take(self):
        """A free entry: the oldest whose last copy has completed, so that a read never waits for
        a slow copy (a hint's, say) while another entry is ready; else the oldest, once its copy is."""
        with self.cond:
            while not self.free:
                self.cond.wait()
            i = next((i for i, (_, ev, _) in enumerate(self.free) if ev is None or self.dev.done(ev)), 0)
            entry, event, _ = self.free[i]
            del self.free[i]
        if event is not None:
            self.dev.synchronize(event)
        return entry

    def give(self, entry, event, slot=None):
        """Returns `entry`; `slot`: the slot its bytes were copied to (they are that slot's now)."""
        with self.cond:
            if slot is not None:  # an older entry of the slot holds an expert the slot no longer has
                self.free = collections.deque((en, ev, None if s == slot else s) for en, ev, s in self.free)
            self.free.append((entry, event, slot))
            self.cond.notify()

    def hold(self, slot):
        """(entry, event) of the free entry holding `slot`'s bytes, out of the ring until given back;
        None once a reader has taken it for another read."""
        with self.cond:
            for i, (entry, event, s) in enumerate(self.free):
                if s == slot:
                    del self.free[i]
                    return entry, event
        return None


class _DeviceLayer:
    """One MoE layer's experts on the device: slots collected per group, computed by one kernel
    per group after the compute stream has waited on exactly those slots' transfers."""

    def __init__(self, tier, u, idx, w, rows, layout):
        self.tier, self.u, self.rows, self.layout = tier, u, rows, layout
        self.acc = tier.dev.expert_sum(tier.slab, u, idx, w, rows, layout)
        self.group = {}  # expert -> slot
        self.u_host = None  # u f32[1, D] on the host, once a miss is computed there

    def add(self, e, slot, just_read=False):
        t = self.tier
        held = t.in_flight(slot) if just_read and t.cpu_misses and self.u.shape[0] == 1 else None
        if held is None:
            self.group[e] = slot
            return
        if self.u_host is None:
            self.u_host = t.dev.to_host(self.u)
        self.flush()  # the device starts on what it has while the CPU computes this one
        entry, event = held
        try:
            y = _expert_out(exact.expert_rows, block_ffn(self.layout, entry), self.u_host, self.rows[e])
        finally:
            t.ring.give(entry, event, slot)
        self.acc.add_rows(e, y)
        t.on_cpu += 1

    def flush(self):
        t, dev = self.tier, self.tier.dev
        if not self.group:
            return
        for slot in self.group.values():
            event = t.filled[slot]
            if event is not None:
                dev.wait(dev.compute, event)
        self.acc.add(self.group)
        done = dev.record(dev.compute)
        with t.lock:
            for slot in self.group.values():
                t.read_by[slot] = done
        self.group = {}

    def result(self):
        return self.acc.result()


class DeviceSlots:
    """n device slots behind a pinned ring of `ring` entries (at least one per reader thread);
    cpu_misses: compute decode misses whose copy is still in flight on the CPU (module docstring)."""

    def __init__(self, dev, store, n, ring, cpu_misses=False):
        self.dev = dev
        self.cpu_misses = cpu_misses
        self.on_cpu = 0  # experts computed on the CPU so far
        self.store = store
        self.slab = DeviceSlab(dev, store.layout, n)
        self.ring = StagingRing(dev, store.layout, ring)
        self.demand_stream = dev.stream()
        self.hint_stream = dev.stream()
        self.lock = threading.Lock()  # filled / read_by are written by reader threads and decode
        self.filled = [None] * n  # slot -> event after the copies that last filled it
        self.read_by = [None] * n  # slot -> event after the last compute that read it

    def fill(self, key, slot):
        """Reader thread: expert `key` into `slot` through the ring -> bytes read. The copies go on
        the hint stream if the scheduler's request is still a hint once the read has landed."""
        dev, L = self.dev, self.slab.layout.of(key[0])
        entry = self.ring.take()
        try:
            nbytes = self.store.read(*key, entry)
        except BaseException:
            self.ring.give(entry, None)  # nothing was copied from it
            raise
        req = reading()
        stream = self.hint_stream if req is not None and req.priority == HINT else self.demand_stream
        with self.lock:
            after = self.read_by[slot], self.filled[slot]  # the slot's last reader and last copy
        for event in after:
            if event is not None:
                dev.wait(stream, event)
        dst, src = self.slab.ffn(slot, L), block_ffn(L, entry)
        for role in ROLES:
            dev.copy(getattr(dst, role), getattr(src, role), stream)
        event = dev.record(stream)
        with self.lock:
            self.filled[slot] = event
        self.ring.give(entry, event, slot)
        return nbytes

    def in_flight(self, slot):
        """(ring entry, event) holding `slot`'s bytes while its copy is still running, taken out of
        the ring (give it back); None when the copy is done or the entry was reused."""
        with self.lock:
            event = self.filled[slot]
        if event is None or self.dev.done(event):
            return None
        return self.ring.hold(slot)

    def layer(self, u, idx, w, rows, layout):
        """A layer's experts, in `layout` (its layer's: slab.layout.of)."""
        return _DeviceLayer(self, u, idx, w, rows, layout)

    @property
    def nbytes(self):
        """Device bytes (the slab); the ring is host memory."""
        return self.slab.nbytes

    def close(self):
        for stream in (self.demand_stream, self.hint_stream):  # no copy may outlive the slab
            self.dev.synchronize(self.dev.record(stream))


def ring_entries(readers, top_k):
    """Pinned ring entries: one per reader in flight and one per expert whose copy may still be
    pending while the next reads land (a layer's top-k), so a reader rarely waits for a copy."""
    return readers + top_k



def device_experts(store, cfg, plan, dev, readers=1, timeout_s=30.0, cpu_misses=False):
    """OffloadedExperts (the CPU path's policy, unchanged) with plan.slots + plan.staging slots on `dev`."""
    tier = DeviceSlots(dev, store, plan.slots + plan.staging, ring_entries(readers, cfg.top_k), cpu_misses)
    return OffloadedExperts(store, cfg, plan, readers, timeout_s, tier)
