"""Expert slots on the GPU: the tier `OffloadedExperts` uses with device="cuda" and a VRAM budget.

Memory: one preallocated device slab per weight role, gate and up [n, I, D] and down [n, D, I] in
the stored dtype; a slot id indexes all three. Nothing is allocated or freed per expert: the SLRU
policy (cache.py) decides which key a slot holds, and an eviction only hands its slot id on.

A transfer (one per read the scheduler hands a reader thread): the slow tier reads the expert's
block into a free entry of a small pinned host ring, the three parts are copied to the slot on a
dedicated copy stream, and one event is recorded after them. The ring entry is reused only once
that event has completed (the copy has read it). The copy stream first waits for the event
recorded after the last compute that read the slot, so a new expert never overwrites one that a
queued kernel still has to read.

Compute: a layer's experts are summed by the device in groups (all of a layer's experts at once
unless a prefill routes to more experts than there are slots). Before a group's kernel the compute
stream waits on the transfer event of each slot the group reads, and of no other slot: a hint still
copying for a later layer never delays this one.

`dev` is the device: backend/cuda_device.py's CupyDevice, or a fake in the tests with the same
methods (empty, pinned, stream, compute, copy, record, wait, synchronize, expert_sum).
"""

import queue
import threading

from .experts import OffloadedExperts
from .slots import ALIGN, _NP

ROLES = ("gate", "up", "down")


class DeviceSlab:
    """n slots as three device arrays: gate, up f32/u16[n, I, D], down [n, D, I]."""

    def __init__(self, dev, layout, n):
        self.layout = layout
        self.n = n
        I, D, dt = layout.inter, layout.hidden, _NP[layout.dtype]
        self.gate = dev.empty((n, I, D), dt)
        self.up = dev.empty((n, I, D), dt)
        self.down = dev.empty((n, D, I), dt)

    @property
    def nbytes(self):
        return 3 * self.n * self.layout.part


class StagingRing:
    """`n` pinned host buffers of one slot block each (ALIGN-aligned, as O_DIRECT reads need); an
    entry is handed out again only after the copy that last read it has completed."""

    def __init__(self, dev, layout, n):
        self.dev = dev
        buf = dev.pinned(n * layout.block).reshape(n, layout.block)
        assert buf.ctypes.data % ALIGN == 0 and layout.block % ALIGN == 0
        self.nbytes = buf.nbytes
        self.free = queue.Queue()  # (entry uint8[block], event of its last copy or None)
        for i in range(n):
            self.free.put((buf[i], None))

    def take(self):
        entry, event = self.free.get()
        if event is not None:
            self.dev.synchronize(event)
        return entry

    def give(self, entry, event):
        self.free.put((entry, event))


class _DeviceLayer:
    """One MoE layer's experts on the device: slots collected per group, summed by one kernel
    per group after the compute stream has waited on exactly those slots' transfers."""

    def __init__(self, tier, u, idx, w, rows):
        self.tier = tier
        self.acc = tier.dev.expert_sum(tier.slab, u, idx, w, rows)
        self.group = {}  # expert -> slot

    def add(self, e, slot):
        self.group[e] = slot

    def flush(self):
        t, dev = self.tier, self.tier.dev
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
    """n device slots behind a pinned ring of `ring` entries (at least one per reader thread)."""

    def __init__(self, dev, store, n, ring):
        self.dev = dev
        self.store = store
        self.slab = DeviceSlab(dev, store.layout, n)
        self.ring = StagingRing(dev, store.layout, ring)
        self.copy_stream = dev.stream()
        self.lock = threading.Lock()  # filled / read_by are written by reader threads and decode
        self.filled = [None] * n  # slot -> event after the copies that last filled it
        self.read_by = [None] * n  # slot -> event after the last compute that read it

    def fill(self, key, slot):
        """Reader thread: expert `key` into `slot` through the ring -> bytes read from the slow tier."""
        dev, L = self.dev, self.slab.layout
        entry = self.ring.take()
        try:
            nbytes = self.store.read(*key, entry)
        except BaseException:
            self.ring.give(entry, None)  # nothing was copied from it
            raise
        p, dt = L.part, _NP[L.dtype]
        with self.lock:
            last_read = self.read_by[slot]
        if last_read is not None:
            dev.wait(self.copy_stream, last_read)
        for i, role in enumerate(ROLES):
            dst = getattr(self.slab, role)[slot]
            dev.copy(dst, entry[i * p : (i + 1) * p].view(dt).reshape(dst.shape), self.copy_stream)
        event = dev.record(self.copy_stream)
        with self.lock:
            self.filled[slot] = event
        self.ring.give(entry, event)
        return nbytes

    def layer(self, u, idx, w, rows):
        return _DeviceLayer(self, u, idx, w, rows)

    @property
    def nbytes(self):
        """Device bytes (the slab); the ring is host memory."""
        return self.slab.nbytes

    def close(self):
        self.dev.synchronize(self.dev.record(self.copy_stream))  # no copy may outlive the slab


def ring_entries(readers, top_k):
    """Pinned ring entries: one per reader in flight and one per expert whose copy may still be
    pending while the next reads land (a layer's top-k), so a reader rarely waits for a copy."""
    return readers + top_k



def device_experts(store, cfg, plan, dev, readers=1, timeout_s=30.0):
    """OffloadedExperts (the CPU path's policy, unchanged) with plan.slots + plan.staging slots on `dev`."""
    tier = DeviceSlots(dev, store, plan.slots + plan.staging, ring_entries(readers, cfg.top_k))
    return OffloadedExperts(store, cfg, plan, readers, timeout_s, tier)
