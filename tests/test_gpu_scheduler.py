"""The GPU expert slots (device_slots.py) on a fake device (tests/fake_device.py): copies and
kernels run after random delays on their streams' threads, and every group's waits are checked.
Outputs must be bit-identical to the CPU path computing experts in the GPU's arithmetic
(exact.expert_rows, as CPU-MoE on device 'cuda' does) at every budget, predictor and miss policy;
hints never evict; memory is the planned slots; the compute stream waits on exactly the events of
the slots it reads; a copy waits for the kernels still reading its slot; demand copies never
queue behind hint copies."""

import threading
import time

import numpy as np
import pytest

import lowmoe
from lowmoe.backend import exact
from lowmoe.tier.device_slots import ROLES, DeviceSlots, device_experts, ring_entries
from lowmoe.errors import StorageError
from lowmoe.tier.experts import OffloadedExperts
from lowmoe.tier.prefetch import DEMAND, HINT, ReadScheduler
from lowmoe.tier.slots import aligned_empty

from fake_device import FakeDevice

PROMPT = [5, 17, 300, 42, 9, 77, 1000, 3, 12, 250, 8, 64]
NEW = 16


class SlowStore:
    """A store whose reads take a random few milliseconds; `fail` makes every read raise."""

    def __init__(self, store, seed, fail=False):
        self.store, self.layout, self.fail = store, store.layout, fail
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()

    def read(self, layer, expert, dest):
        with self.lock:
            delay = self.rng.random() * 0.002
        time.sleep(delay)
        if self.fail:
            raise OSError(5, "Input/output error (injected)")
        return self.store.read(layer, expert, dest)


class Wrong:
    """Ranks the next layer's experts in reverse: mostly wrong hints."""

    def __init__(self, inner):
        self.inner = inner

    def predict(self, layer, h, chosen):
        return [(later, ranked[::-1]) for later, ranked in self.inner.predict(layer, h, chosen)]


def on_fake_gpu(engine, dev, seed=0, fail=False, cpu_misses=False):
    """Swaps the engine's CPU expert cache for the same plan in device slots on `dev`."""
    cpu = engine.model.experts
    cpu.close()
    store = SlowStore(cpu.tier.store, seed, fail)
    o = engine.options
    engine.model.experts = device_experts(store, engine.config, cpu.plan, dev, o.readers, o.read_timeout_s, cpu_misses)
    return engine


def in_gpu_arithmetic(engine):
    """Swaps the engine's CPU expert cache for the same plan computing with exact.expert_rows."""
    cpu = engine.model.experts
    cpu.close()
    o = engine.options
    engine.model.experts = OffloadedExperts(cpu.tier.store, engine.config, cpu.plan, o.readers, o.read_timeout_s,
                                            kernel=exact.expert_rows)
    return engine


def run(engine):
    gen = engine.generate(PROMPT, NEW, stop_at_eos=False)
    return gen.tokens, engine.logits(PROMPT + gen.tokens[:4]), gen.stats


@pytest.fixture(scope="module")
def reference():
    with in_gpu_arithmetic(lowmoe.Engine.from_pretrained(expert_cache="100%")) as e:
        return run(e)[:2]


@pytest.mark.parametrize("budget,predictor,lookahead,readers", [
    ("min", "none", 1, 1), ("min", "wrong", 1, 2), ("10%", "history", 1, 1), ("25%", "nextgate", 2, 2),
    ("25%", "wrong", 1, 1), ("50%", "nextgate", 1, 1)])
def test_outputs_bit_identical_to_the_cpu_path(budget, predictor, lookahead, readers, reference):
    options = dict(expert_cache=budget, lookahead=lookahead, readers=readers,
                   predictor="nextgate" if predictor == "wrong" else predictor)
    with in_gpu_arithmetic(lowmoe.Engine.from_pretrained(**options)) as e:
        cpu_tokens, cpu_logits, _ = run(e)
    dev = FakeDevice(seed=10 * lookahead + readers)
    with on_fake_gpu(lowmoe.Engine.from_pretrained(**options), dev, seed=lookahead) as e:
        if predictor == "wrong":
            e.model.predictor = Wrong(e.model.predictor)
        tokens, logits, stats = run(e)
    assert tokens == cpu_tokens == reference[0]
    assert np.array_equal(logits, cpu_logits) and np.array_equal(logits, reference[1])
    assert dev.groups > 0
    if predictor in ("nextgate", "history"):
        assert stats["prefetched"] > 0


def _cache_states(engine):
    """The cache's {key: segment} after every decode step; asserts that no hint changes it."""
    experts = engine.model.experts
    cache, hint = experts.cache, experts.hint

    def snapshot():
        return {k: cache.segment(k) for k in list(cache._prob) + list(cache._prot)}

    def checked_hint(layer, ranked, distance=1):
        before = snapshot()
        hint(layer, ranked, distance)
        assert snapshot() == before, "a hint changed the cache"

    experts.hint = checked_hint
    return [snapshot() for _ in engine.stream(PROMPT, NEW, stop_at_eos=False)]


@pytest.mark.parametrize("predictor", ["nextgate", "wrong"])
def test_hints_never_evict(predictor):
    with on_fake_gpu(lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="none"), FakeDevice()) as e:
        reactive = _cache_states(e)
    with on_fake_gpu(lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="nextgate"), FakeDevice(seed=1)) as e:
        if predictor == "wrong":
            e.model.predictor = Wrong(e.model.predictor)
        assert _cache_states(e) == reactive


@pytest.mark.parametrize("budget", ["min", "25%"])
def test_memory_is_the_planned_slots_and_the_ring(budget):
    dev = FakeDevice()
    with on_fake_gpu(lowmoe.Engine.from_pretrained(expert_cache=budget, readers=2), dev) as e:
        ex, cfg = e.model.experts, e.config
        plan, layout = ex.plan, ex.slab.layout
        planned = (plan.slots + plan.staging) * 3 * layout.part
        assert dev.device_bytes == ex.slab.nbytes == planned
        assert dev.pinned_bytes == ring_entries(2, cfg.top_k) * layout.block
        run(e)
        assert dev.device_bytes == planned  # nothing allocated per expert
        assert len(ex.cache) <= plan.slots


def test_compute_waits_once_per_expert_it_reads():
    """Every group waits on one event per expert it sums (FakeDevice.check_group checks they are
    the right ones and no others), so the waits add up to the distinct experts of each forward."""
    dev = FakeDevice()
    with on_fake_gpu(lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="nextgate"), dev) as e:
        inner, expected = e.model.experts.forward, []

        def forward(layer, u, idx, w):
            expected.append(len(np.unique(idx)))
            return inner(layer, u, idx, w)

        e.model.experts.forward = forward
        run(e)
    assert dev.waits == sum(expected)


def test_the_fake_device_catches_a_compute_that_does_not_wait():
    dev = FakeDevice()
    real_wait = dev.wait
    dev.wait = lambda stream, event: None if stream == dev.compute else real_wait(stream, event)
    with on_fake_gpu(lowmoe.Engine.from_pretrained(expert_cache="min", predictor="none"), dev) as e:
        with pytest.raises(AssertionError, match="without waiting"):
            run(e)


def test_the_fake_device_catches_a_copy_that_does_not_wait_for_the_slots_last_reader():
    """With slow kernels, instant copies and the fewest slots (a prefill's groups of experts take
    turns in them), a copy that skips its wait for the last kernel reading its slot overwrites the
    slot before that queued kernel has read it."""
    dev = FakeDevice(delay_s=0, compute_delay_s=0.02)
    real_wait = dev.wait

    def wait(stream, event):  # every wait but a copy stream's on a compute event (read_by)
        if stream is dev.compute or event.stream is not dev.compute:
            real_wait(stream, event)

    dev.wait = wait
    with on_fake_gpu(lowmoe.Engine.from_pretrained(expert_cache="min", predictor="none"), dev) as e:
        with pytest.raises(AssertionError, match="overwrote"):
            run(e)


class HeldStore:
    """`store` whose read of expert `key` starts (sets `started`), then waits for `go`."""

    def __init__(self, store, key):
        self.store, self.layout, self.key = store, store.layout, key
        self.started, self.go = threading.Event(), threading.Event()

    def read(self, layer, expert, dest):
        if (layer, expert) == self.key:
            self.started.set()
            assert self.go.wait(5)
        return self.store.read(layer, expert, dest)


@pytest.mark.parametrize("promoted", [False, True], ids=["demand", "promoted-hint"])
def test_a_demand_copy_does_not_queue_behind_hint_copies(promoted):
    """Four hints' copies (up to 0.1 s each, 12 of them) are queued; a demand read (or a hint
    promoted while it is being read, as the gating does) lands after them, and its copy completes
    while the hints' last one is still pending."""
    dev = FakeDevice(delay_s=0, seed=4)
    with lowmoe.Engine.from_pretrained(expert_cache="min", predictor="none") as e:
        store = HeldStore(e.model.experts.tier.store, (1, 0))
        tier = DeviceSlots(dev, store, 8, ring=8)
        tier.hint_stream.delay_s = 0.1
        reader = ReadScheduler(tier.fill, threads=1)
        for req in [reader.submit((0, x), x, HINT) for x in range(4)]:
            reader.wait(req)
        if promoted:
            req = reader.submit((1, 0), 4, HINT)
            assert store.started.wait(5)
            reader.promote(req)
        else:
            req = reader.submit((1, 0), 4, DEMAND)
        store.go.set()
        reader.wait(req)
        dev.synchronize(tier.filled[4])
        assert not dev.done(tier.filled[3]), "the demand copy completed only after the hint copies"
        reader.close()
        tier.close()


def test_a_copy_waits_for_the_slots_previous_copy_on_the_other_stream():
    """A hint no one chose frees its slot once read, its copies still queued on the slow hint
    stream; a demand read of another expert into that slot copies on the fast demand stream, yet
    the slot ends up holding the demanded expert."""
    dev = FakeDevice(delay_s=0, seed=5)
    with lowmoe.Engine.from_pretrained(expert_cache="min", predictor="none") as e:
        store = e.model.experts.tier.store
        tier = DeviceSlots(dev, store, 1, ring=2)
        tier.hint_stream.delay_s = 0.1
        reader = ReadScheduler(tier.fill, threads=1)
        reader.wait(reader.submit((0, 1), 0, HINT))
        reader.wait(reader.submit((0, 2), 0, DEMAND))
        reader.close()
        tier.close()
        want = aligned_empty(store.layout.block)
        store.read(0, 2, want)
    p = store.layout.part
    for i, role in enumerate(ROLES):
        assert getattr(tier.slab, role)[0].tobytes() == want[i * p : (i + 1) * p].tobytes(), role


def test_a_failing_read_is_a_clear_error_and_frees_its_ring_entry():
    dev = FakeDevice()
    with on_fake_gpu(lowmoe.Engine.from_pretrained(expert_cache="min"), dev, fail=True) as e:
        with pytest.raises(StorageError, match="failed twice"):
            e.generate(PROMPT, 4)
    ring = e.model.experts.tier.ring  # the readers have stopped: every entry is back
    assert len(ring.free) == ring_entries(1, e.config.top_k)


def test_one_ring_entry_and_slow_copies_still_give_the_cpu_output(reference):
    """A ring entry is read again only after its copy has completed: with one entry and copies
    slower than reads, every read waits for the previous copy, and the output stays exact."""
    dev = FakeDevice(delay_s=0.005, seed=3)
    with lowmoe.Engine.from_pretrained(expert_cache="25%", predictor="nextgate") as e:
        cpu = e.model.experts
        cpu.close()
        plan = cpu.plan
        tier = DeviceSlots(dev, cpu.tier.store, plan.slots + plan.staging, ring=1)
        e.model.experts = OffloadedExperts(cpu.tier.store, e.config, plan, tier=tier)
        tokens, logits, _ = run(e)
    assert tokens == reference[0] and np.array_equal(logits, reference[1])


@pytest.mark.parametrize("budget,predictor", [("min", "none"), ("25%", "nextgate"), ("25%", "wrong")])
def test_misses_computed_on_the_cpu_give_the_same_bits(budget, predictor, reference):
    """--miss-policy cpu: with copies slower than reads, landed misses are computed on the CPU from
    their ring entry while the device computes the rest; tokens and logits stay bit-identical, every
    row is written once (FakeSum), and every ring entry comes back."""
    dev = FakeDevice(delay_s=0.02, seed=5)
    options = dict(expert_cache=budget, predictor="nextgate" if predictor == "wrong" else predictor)
    with on_fake_gpu(lowmoe.Engine.from_pretrained(**options), dev, seed=2, cpu_misses=True) as e:
        if predictor == "wrong":
            e.model.predictor = Wrong(e.model.predictor)
        tier = e.model.experts.tier
        tokens, logits, _ = run(e)
    assert tokens == reference[0] and np.array_equal(logits, reference[1])
    assert tier.on_cpu > 0 and dev.groups > 0
    assert len(tier.ring.free) == tier.ring.n


def test_a_ring_entry_is_held_only_while_it_holds_the_slot():
    """hold(slot) finds the free entry with the slot's bytes, never a stale one of an expert the
    slot held before, and nothing once a reader has taken the entry again."""
    from lowmoe.tier.device_slots import StagingRing
    from lowmoe.tier.slots import ExpertLayout

    ring = StagingRing(FakeDevice(), ExpertLayout("f32", 4, 8), 3)
    a, b = ring.take(), ring.take()
    ring.give(a, None, slot=5)  # slot 5 held expert X (entry a)
    ring.give(b, None, slot=5)  # then expert Y (entry b)
    entry, _ = ring.hold(5)
    assert entry is b and ring.hold(5) is None
    ring.give(b, None, slot=5)
    for _ in range(3):
        ring.take()
    assert ring.hold(5) is None


def test_a_read_takes_a_ring_entry_whose_copy_is_done():
    """A reader is handed a free ring entry whose last copy has completed before an older one whose
    copy is still running (a slow hint copy), so it does not wait for that copy."""
    from fake_device import Event

    from lowmoe.tier.device_slots import StagingRing
    from lowmoe.tier.slots import ExpertLayout

    dev = FakeDevice()
    ring, stream = StagingRing(dev, ExpertLayout("f32", 4, 8), 2), dev.stream()
    a, b = ring.take(), ring.take()
    slow, done = Event(stream, 0), Event(stream, 0)
    done.flag.set()
    ring.give(a, slow, slot=1)  # its copy still running
    ring.give(b, done, slot=2)
    threading.Timer(0.5, slow.flag.set).start()  # so that a ring taking `a` waits, rather than hangs
    assert ring.take() is b
    assert ring.take() is a
