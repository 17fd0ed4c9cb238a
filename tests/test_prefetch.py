"""The read scheduler: reads go in need order (demand, then hints by layer and rank), duplicate requests merge, ready signals fire."""

import threading

import numpy as np

from lowmoe.tier.prefetch import DEMAND, HINT, ReadScheduler
from lowmoe.tier.slots import ExpertLayout, Slab


class GatedStore:
    """Records the order of reads; the first read blocks until `gate` is set, so the queue fills."""

    layout = ExpertLayout("f32", 4, 8)

    def __init__(self):
        self.gate = threading.Event()
        self.order = []

    def read(self, layer, expert, dest):
        if not self.order:
            self.order.append((layer, expert))
            self.gate.wait(5)
        else:
            self.order.append((layer, expert))
        dest[:] = layer * 16 + expert
        return dest.size


def _blocked_reader():
    """A one-thread scheduler whose reader has taken a first hint and blocks on it, so that later
    requests queue: (store, slab, scheduler, that first request)."""
    store = GatedStore()
    slab = Slab(store.layout, 8)
    r = ReadScheduler(lambda key, slot: store.read(*key, slab.block(slot)), threads=1, timeout_s=5)
    first = r.submit((0, 0), 0, HINT)  # taken by the one reader, which then blocks
    while not store.order:
        pass
    return store, slab, r, first


def test_demand_before_hints_merging_and_ready_signals():
    store, slab, r, first = _blocked_reader()
    hints = [r.submit((1, e), 1 + e, HINT) for e in range(3)]
    demand = r.submit((2, 0), 5, DEMAND)
    assert r.submit((2, 0), 5, HINT) is demand  # merged
    raised = r.submit((1, 2), 3, DEMAND)  # a queued hint raised to demand
    assert raised is hints[2]
    assert r.in_flight == 5
    store.gate.set()
    for req in [first, *hints, demand]:
        r.wait(req)
        assert np.all(slab.block(req.slot) == req.key[0] * 16 + req.key[1])
    assert store.order == [(0, 0), (1, 2), (2, 0), (1, 0), (1, 1)]  # demands by layer, then hints
    assert r.in_flight == 0 and r.bytes_read == 5 * store.layout.block
    r.close()


def test_reads_go_in_need_order():
    """Demand first, then hints by the layer that will need them, then by the predictor's rank,
    whatever the order they came in: N+2's hints, then N+1's refined ones, then a demand."""
    store, slab, r, first = _blocked_reader()
    reqs = [r.submit((3, 5), 1, HINT, 0), r.submit((3, 6), 2, HINT, 1),
            r.submit((2, 7), 3, HINT, 1), r.submit((2, 4), 4, HINT, 0), r.submit((1, 3), 5, DEMAND)]
    store.gate.set()
    for req in [first, *reqs]:
        r.wait(req)
    assert store.order == [(0, 0), (1, 3), (2, 4), (2, 7), (3, 5), (3, 6)]
    r.close()


def test_cancel_drops_only_reads_not_yet_started():
    store, slab, r, first = _blocked_reader()
    queued = [r.submit((1, e), 1 + e, HINT) for e in range(3)]
    slab.block(2)[:] = 255
    assert not r.cancel(first)  # in flight: it will finish
    assert r.cancel(queued[1]) and not r.cancel(queued[1])
    assert r.in_flight == 3
    again = r.submit((1, 1), 6, DEMAND)  # a later request for the cancelled expert is a new read
    assert again is not queued[1]
    store.gate.set()
    for req in [first, queued[0], queued[2], again]:
        r.wait(req)
    assert store.order == [(0, 0), (1, 1), (1, 0), (1, 2)]
    assert np.all(slab.block(2) == 255)  # the cancelled read never wrote its slot
    assert r.bytes_read == 4 * store.layout.block
    r.close()


def test_read_timing_adds_up():
    """Each read's time is counted once: queued, then in the fill; a wait that blocked counts its
    wake-up after the read finished, a wait on a finished read none."""
    import threading
    import time

    from lowmoe.tier.prefetch import ReadScheduler

    gate = threading.Event()

    def fill(key, slot):
        gate.wait()
        time.sleep(0.01)
        return 100

    reader = ReadScheduler(fill, threads=1)
    try:
        reqs = [reader.submit((0, e), e) for e in range(3)]
        time.sleep(0.02)
        gate.set()
        reader.wait(reqs[0])  # blocks
        time.sleep(0.05)
        reader.wait(reqs[2])  # finished by now
        t = reader.timing
        assert t["reads"] == 3 and t["wakes"] == 1
        # one reader: read 0 is taken at once and waits for the gate (>= 0.02 s) in its fill; read 1
        # is queued until read 0 is done (>= 0.03 s), read 2 until read 1 is (>= 0.04 s)
        assert t["fill_s"] >= 0.02 + 3 * 0.01 and t["queue_s"] >= 0.03 + 0.04
        assert 0 <= t["wake_s"] < 0.05
    finally:
        reader.close()
