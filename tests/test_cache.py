"""Cache policy: SlruCache against a plain reference model of the policy on random operation
sequences, plus the staging swap, CacheFull and misuse errors."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmoe.tier.cache import CacheFull, SlruCache

KEYS = [(layer, expert) for layer in range(3) for expert in range(4)]


class Entry:
    def __init__(self, key, slot, stamp, count):
        self.key, self.slot, self.segment, self.count, self.stamp = key, slot, "probation", count, stamp


class Reference:
    """The policy written the slow, obvious way: a list of entries, each with its segment, access
    count and a clock stamp (when it was last used, or when it entered probation); every choice is
    a linear scan. Slot ids are sets. Each method takes the implementation's outcome (a value or an
    exception type), asserts it is what the policy allows, and follows it."""

    def __init__(self, slots, staging, fraction, probation):
        self.capacity = min(slots - 1, math.floor(slots * fraction + 0.5))
        self.probation = probation
        self.entries = []
        self.seen = {}  # key -> accesses counted before its last eviction: counts last the whole run
        self.pins = {}
        self.clock = 0
        self.free = set(range(slots))
        self.pool = set(range(slots, slots + staging))
        self.taken = set()

    def tick(self):
        self.clock += 1
        return self.clock

    def find(self, key):
        return next((e for e in self.entries if e.key == key), None)

    def in_segment(self, segment):
        return [e for e in self.entries if e.segment == segment]

    def victim(self):
        candidates = [e for e in self.in_segment("probation") if not self.pins.get(e.key)]
        if candidates:
            order = (lambda e: (e.count, e.stamp)) if self.probation == "lfu" else (lambda e: e.stamp)
            return min(candidates, key=order)
        candidates = [e for e in self.in_segment("protected") if not self.pins.get(e.key)]
        return min(candidates, key=lambda e: e.stamp) if candidates else None

    def touch(self, key, got):
        e = self.find(key)
        if e is None:
            assert got is None
            return
        assert got == e.slot
        e.count += 1
        e.segment, e.stamp = "protected", self.tick()
        protected = self.in_segment("protected")
        if len(protected) > self.capacity:
            oldest = min(protected, key=lambda e: e.stamp)
            oldest.segment, oldest.stamp = "probation", self.tick()

    def take_cache_slot(self, got_slot, got_evicted):
        """A cache slot for a new entry: a free one (the implementation picks which) or the victim's."""
        if self.free:
            assert got_evicted is None and got_slot in self.free
            self.free.remove(got_slot)
            return got_slot
        victim = self.victim()
        assert victim is not None and got_evicted == victim.key and got_slot == victim.slot
        assert not self.pins.get(victim.key)
        self.seen[victim.key] = victim.count
        self.entries.remove(victim)
        return victim.slot

    def insert(self, key, got):
        if self.find(key):
            assert got is ValueError
        elif not self.free and self.victim() is None:
            assert got is CacheFull
        else:
            slot, evicted = got
            self.entries.append(Entry(key, self.take_cache_slot(slot, evicted), self.tick(), self.seen.get(key, 0) + 1))
            assert slot == self.entries[-1].slot

    def discard(self, key, got):
        e = self.find(key)
        if e is None:
            assert got is ValueError
            return
        assert got is None
        self.seen[e.key] = e.count
        self.entries.remove(e)
        self.free.add(e.slot)

    def pin(self, keys):
        for key in keys:
            self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, keys, got):
        for key in keys:
            if not self.pins.get(key):
                assert got is ValueError
                return
            self.pins[key] -= 1
        assert got is None

    def stage(self, got):
        if not self.pool:
            assert got is None
            return
        assert got in self.pool
        self.pool.remove(got)
        self.taken.add(got)

    def release(self, slot, got):
        if slot not in self.taken:
            assert got is ValueError
            return
        assert got is None
        self.taken.remove(slot)
        self.pool.add(slot)

    def admit(self, key, slot, got, given):
        """`given`: the slot the implementation added to the staging pool, None if none."""
        if self.find(key) or slot not in self.taken:
            assert got is ValueError
        elif not self.free and self.victim() is None:
            assert got is CacheFull
        else:
            self.take_cache_slot(given, got)
            self.taken.remove(slot)
            self.pool.add(given)
            self.entries.append(Entry(key, slot, self.tick(), self.seen.get(key, 0) + 1))


def outcome(fn, *args):
    try:
        return fn(*args)
    except (ValueError, CacheFull) as e:
        return type(e)


def apply(cache, ref, op):
    name, args = op[0], op[1:]
    if name == "touch":
        ref.touch(args[0], outcome(cache.touch, args[0]))
    elif name == "insert":
        ref.insert(args[0], outcome(cache.insert, args[0]))
    elif name == "discard":
        ref.discard(args[0], outcome(cache.discard, args[0]))
    elif name == "pin":
        cache.pin(args[0])
        ref.pin(args[0])
    elif name == "unpin":
        ref.unpin(args[0], outcome(cache.unpin, args[0]))
    elif name == "stage":
        ref.stage(outcome(cache.stage))
    elif name == "release":  # an index into the taken slots; past the end, a slot never staged
        slot = sorted(ref.taken)[args[0]] if args[0] < len(ref.taken) else cache.slots + cache.staging + args[0]
        ref.release(slot, outcome(cache.release, slot))
    elif name == "admit":
        key, i = args
        slot = sorted(ref.taken)[i] if i < len(ref.taken) else next(iter(ref.free | ref.pool), -1)
        got = outcome(cache.admit, key, slot)
        given = set(cache._pool) - ref.pool
        assert len(given) <= 1
        ref.admit(key, slot, got, given.pop() if given else None)
    else:  # "layer": what the engine does for one MoE layer
        keys = args[0]
        apply(cache, ref, ("pin", keys))
        for key in keys:
            apply(cache, ref, ("touch" if key in cache else "insert", key))
        apply(cache, ref, ("unpin", keys))


def check(cache, ref, slots, staging):
    for key in KEYS:
        e = ref.find(key)
        assert cache.segment(key) == (e and e.segment)
        assert cache.lookup(key) == (e and e.slot)
        assert (key in cache) == (e is not None)
    assert len(cache) == len(ref.entries) <= slots
    assert len(ref.in_segment("protected")) <= cache.protected_capacity == ref.capacity
    assert set(cache._free) == ref.free and set(cache._pool) == ref.pool and cache._taken == ref.taken
    # every slot id is exactly one of: an entry's, a free cache slot, a free or taken staging slot
    parts = [e.slot for e in ref.entries] + list(cache._free) + list(cache._pool) + list(cache._taken)
    assert sorted(parts) == list(range(slots + staging))
    assert len(ref.entries) + len(ref.free) == slots and len(ref.pool) + len(ref.taken) == staging


key = st.sampled_from(KEYS)
keys = st.lists(key, max_size=3, unique=True)
index = st.integers(0, 2)  # into the taken staging slots; mostly valid
# Repeats weight the draw toward operations that fill the cache, so evictions, demotions and
# admissions that evict are common.
ops = st.lists(
    st.one_of(
        *[st.tuples(st.just("insert"), key)] * 3,
        *[st.tuples(st.just("layer"), keys)] * 3,
        *[st.tuples(st.just("admit"), key, index)] * 3,
        *[st.tuples(st.just("stage"))] * 2,
        *[st.tuples(st.just("touch"), key)] * 2,
        st.tuples(st.just("discard"), key),
        st.tuples(st.just("pin"), keys),
        st.tuples(st.just("unpin"), keys),
        st.tuples(st.just("release"), index),
    ),
    min_size=20,
    max_size=80,
)


@pytest.mark.parametrize("probation", ["lru", "lfu"])
@settings(max_examples=150, deadline=None)
@given(
    slots=st.integers(1, 6),
    staging=st.integers(0, 3),
    fraction=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    ops=ops,
)
def test_matches_reference(probation, slots, staging, fraction, ops):
    cache = SlruCache(slots, staging, fraction, probation)
    ref = Reference(slots, staging, fraction, probation)
    check(cache, ref, slots, staging)
    for op in ops:
        apply(cache, ref, op)
        check(cache, ref, slots, staging)


def test_protected_capacity_rounds_half_up_and_leaves_probation_a_slot():
    assert SlruCache(10).protected_capacity == 8  # 7.5 rounds up
    assert SlruCache(10, protected_fraction=0.5).protected_capacity == 5
    assert SlruCache(4, protected_fraction=1.0).protected_capacity == 3
    assert SlruCache(1).protected_capacity == 0


def test_second_access_promotes_and_protected_overflow_demotes_to_probation_mru():
    c = SlruCache(4, protected_fraction=0.5)  # protected holds 2
    for k in "abcd":
        c.insert(k)
    assert [c.segment(k) for k in "abcd"] == ["probation"] * 4
    c.touch("a"), c.touch("b"), c.touch("c")  # a, the least recent protected, drops back
    assert [c.segment(k) for k in "abcd"] == ["probation", "protected", "protected", "probation"]
    assert c.insert("e") == (3, "d")  # d is older in probation than the demoted a


def test_hot_expert_survives_a_scan_of_one_time_experts():
    c = SlruCache(4)
    c.insert("hot")
    c.touch("hot")
    for i in range(20):
        c.insert(i)
    assert "hot" in c and c.segment("hot") == "protected"


def test_lfu_evicts_least_used_probation_entry_then_least_recent():
    c = SlruCache(3, protected_fraction=0.0, probation="lfu")  # no protected: all in probation
    for k in "abc":
        c.insert(k)
    c.touch("a"), c.touch("a"), c.touch("b")
    assert c.insert("d") == (2, "c")  # c: 1 access
    assert c.insert("e") == (2, "d")  # d: 1 access, e not yet there
    c.touch("e")
    assert c.insert("f") == (1, "b")  # a: 3, b: 2, e: 2 but more recent


def test_lfu_counts_accesses_made_in_protected():
    c = SlruCache(4, protected_fraction=0.25, probation="lfu")  # protected holds 1
    for k in "abcd":
        c.insert(k)
    c.touch("a"), c.touch("a")  # a: 3 accesses
    c.touch("b")  # b: 2, a drops back to probation
    c.touch("c")  # c: 2, b drops back, after a
    c.touch("d")  # d: 2, c drops back
    assert [c.segment(k) for k in "abcd"] == ["probation"] * 3 + ["protected"]
    assert c.insert("e") == (1, "b")  # b and c have 2 accesses to a's 3; b is older


def test_pinned_entries_are_skipped_and_protected_gives_way_when_probation_is_pinned():
    c = SlruCache(3, protected_fraction=0.5)  # protected holds 2
    c.insert("a"), c.insert("b"), c.insert("c")
    c.touch("a"), c.touch("b")
    c.pin(["c"])
    assert c.insert("d") == (0, "a")  # c pinned: protected's least recent goes
    c.pin(["d"])
    assert c.insert("e") == (1, "b")
    c.unpin(["c"])
    assert c.insert("f") == (2, "c")


def test_pins_are_counted():
    c = SlruCache(1)
    c.insert("a")
    c.pin(["a"]), c.pin(["a"])
    c.unpin(["a"])
    with pytest.raises(CacheFull):
        c.insert("b")
    c.unpin(["a"])
    assert c.insert("b") == (0, "a")
    with pytest.raises(ValueError):
        c.unpin(["a"])


def test_admit_swaps_slot_ids_without_copying():
    c = SlruCache(2, staging=1)
    c.insert("a"), c.insert("b")
    s = c.stage()
    assert s == 2 and c.stage() is None
    assert c.admit("c", s) == "a"
    assert c.lookup("c") == 2 and c.segment("c") == "probation"
    assert c._pool == [0]  # a's old slot is now the staging slot
    assert c.stage() == 0


def test_admit_with_a_free_cache_slot_evicts_nothing_and_grows_the_pool_back():
    c = SlruCache(2, staging=1)
    c.insert("a")
    s = c.stage()
    assert c.admit("b", s) is None
    assert c.lookup("b") == 2 and c._free == [] and c._pool == [1]


def test_release_returns_the_staging_slot():
    c = SlruCache(2, staging=2)
    s = c.stage()
    c.release(s)
    assert sorted(c._pool) == [2, 3] and not c._taken
    with pytest.raises(ValueError):
        c.release(s)  # twice
    with pytest.raises(ValueError):
        c.release(0)  # a cache slot


def test_cache_full_when_everything_is_pinned_changes_nothing():
    c = SlruCache(2, staging=1)
    c.insert("a"), c.insert("b")
    c.pin(["a", "b"])
    with pytest.raises(CacheFull):
        c.insert("c")
    s = c.stage()
    with pytest.raises(CacheFull):
        c.admit("c", s)
    assert "c" not in c and len(c) == 2 and c._taken == {s}
    c.release(s)
    c.unpin(["a", "b"])
    assert c.insert("c") == (0, "a")


def test_misuse_is_a_value_error():
    c = SlruCache(2, staging=1)
    c.insert("a")
    with pytest.raises(ValueError):
        c.insert("a")
    s = c.stage()
    with pytest.raises(ValueError):
        c.admit("a", s)  # already cached
    with pytest.raises(ValueError):
        c.admit("b", 1)  # never staged
    with pytest.raises(ValueError):
        c.unpin(["b"])
    for bad in [dict(slots=0), dict(slots=2, staging=-1), dict(slots=2, protected_fraction=1.5),
                dict(slots=2, probation="mru")]:
        with pytest.raises(ValueError):
            SlruCache(**bad)


def test_discard_frees_the_slot_and_keeps_pins():
    c = SlruCache(1)
    c.pin(["a"])
    c.insert("a")
    c.discard("a")
    assert "a" not in c and c._free == [0]
    assert c.insert("a") == (0, None)
    with pytest.raises(CacheFull):
        c.insert("b")  # a is still pinned
    with pytest.raises(ValueError):
        c.discard("b")


def test_touch_and_lookup_on_a_miss_change_nothing():
    c = SlruCache(2)
    assert c.touch("x") is None and c.lookup("x") is None and c.segment("x") is None
    assert len(c) == 0 and "x" not in c
