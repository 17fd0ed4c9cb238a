"""Expert cache policy: which `(layer, expert)` keys hold which fast-tier slots. Pure bookkeeping:
no I/O, no weights; the engine moves bytes, this decides where.

An SLRU. A new entry starts in the probationary segment; a second access promotes it to the
protected segment, so experts used once (a rare topic, a stray token) churn through probation
without pushing out the ones used again and again. When protected outgrows its capacity, its least
recently used entry drops back to the most recent end of probation: it gets one more chance before
eviction. Victims come from probation, by least recent use ("lru") or by fewest accesses over the
whole run with least recent use as tie-break ("lfu"); only when every probation entry is pinned
does protected give up its least recently used unpinned entry. Pinned entries (the running layer's
experts) are never evicted.

The defaults, "lfu" with 75% protected and counts kept across evictions, had the best hit rate
of the variants measured on the bundled model's routing (tools/bench_cache_policy.py) at every
size from 10% to 75% of the experts. Counting only since insertion froze the cache near one
token's worth of slots (layers x top_k): a layer's expert comes back only after all the other
layers' ones, so new entries left probation before their second use; with run-long counts an
expert that was often useful wins its slot back at once.

Beside the cache slots lies a small staging pool for prefetches. A prefetch reads into a staging
slot; if the real gating then picks the expert, `admit` makes that slot the cache entry's and hands
the victim's slot (or a free cache slot) to the pool instead: slot ids swap, bytes never move. So
the ids of cache slots and staging slots mix over time, but there are always `slots` of one and
`staging` of the other.

Protected is an OrderedDict in recency order. Probation is kept in groups of equal rank, each in
probation order (oldest first): the rank is the access count under "lfu", 0 under "lru". An entry's
count cannot change while it sits in probation (an access promotes it out), so it stays in one
group, and the victim is the oldest unpinned entry of the lowest group: every operation is O(1)
but for sorting the distinct counts on an eviction (a few) and skipping pinned entries (at most
the running layer's). A plain scan of probation for the LFU victim cost 140 us per miss at
Qwen3-30B-A3B scale (384 probation entries); the groups about 5 us.
"""

from collections import OrderedDict


class CacheFull(Exception):
    """A slot is needed but every cached entry is pinned: a bug, or a cache smaller than top_k."""


class SlruCache:
    def __init__(self, slots, staging=0, protected_fraction=0.75, probation="lfu"):
        if slots < 1 or staging < 0:
            raise ValueError(f"need slots >= 1 and staging >= 0, got slots={slots}, staging={staging}")
        if not 0.0 <= protected_fraction <= 1.0:
            raise ValueError(f"protected_fraction must be in [0, 1], got {protected_fraction}")
        if probation not in ("lru", "lfu"):
            raise ValueError(f"probation must be 'lru' or 'lfu', got {probation!r}")
        self.slots = slots
        self.staging = staging
        self.probation = probation
        # Rounded half up, and at most slots - 1 so new entries always have a probation place to
        # churn through instead of displacing protected ones. 0 makes the whole cache one LRU.
        self.protected_capacity = min(slots - 1, int(slots * protected_fraction + 0.5))
        self._prob = {}  # key -> slot
        self._groups = {}  # rank -> {key: None} in probation order
        self._prot = OrderedDict()  # key -> slot, least recent first
        self._count = {}  # key -> accesses over the run, kept across evictions (the LFU order)
        self._pins = {}  # key -> pin count > 0; a key may be pinned before it is inserted
        self._free = list(range(slots - 1, -1, -1))  # free cache slots (popped from the end: 0 first)
        self._pool = list(range(slots + staging - 1, slots - 1, -1))  # free staging slots
        self._taken = set()  # staging slots handed out by stage()

    def __len__(self):
        return len(self._prob) + len(self._prot)

    def __contains__(self, key):
        return key in self._prob or key in self._prot

    def lookup(self, key):
        """The slot holding `key`, or None; records nothing."""
        slot = self._prob.get(key)
        return self._prot.get(key) if slot is None else slot

    def segment(self, key):
        if key in self._prob:
            return "probation"
        return "protected" if key in self._prot else None

    def touch(self, key):
        """A hit: promote from probation, or refresh in protected. Returns the slot; None on a miss."""
        slot = self._prot.get(key)
        if slot is not None:
            self._prot.move_to_end(key)
            self._count[key] += 1
        elif key in self._prob:
            slot = self._prot[key] = self._leave_probation(key)  # leaves the group of its old count
            self._count[key] += 1
            if len(self._prot) > self.protected_capacity:
                self._enter_probation(*self._prot.popitem(last=False))
        return slot

    def insert(self, key):
        """A demand miss: a cache slot for `key` -> (slot, evicted key or None)."""
        if key in self:
            raise ValueError(f"{key} is already cached")
        evicted, slot = (None, self._free.pop()) if self._free else self._evict()
        self._add(key, slot)
        return slot, evicted

    def discard(self, key):
        """Drops `key` whose slot holds no valid expert (its read failed); the slot becomes free.
        Pins on `key` stay: they count for the key, not the entry."""
        if key in self._prob:
            slot = self._leave_probation(key)
        elif key in self._prot:
            slot = self._prot.pop(key)
        else:
            raise ValueError(f"{key} is not cached")
        self._free.append(slot)

    def pin(self, keys):
        for key in keys:
            self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, keys):
        """Undoes one pin of each key; a key not pinned is a ValueError (earlier keys stay unpinned)."""
        for key in keys:
            n = self._pins.get(key)
            if n is None:
                raise ValueError(f"{key} is not pinned")
            if n == 1:
                del self._pins[key]
            else:
                self._pins[key] = n - 1

    def stage(self):
        """A free staging slot for a prefetch, or None when the pool is empty."""
        if not self._pool:
            return None
        slot = self._pool.pop()
        self._taken.add(slot)
        return slot

    def release(self, slot):
        """Returns a staged slot whose prefetch was not needed (or failed)."""
        if slot not in self._taken:
            raise ValueError(f"slot {slot} was not taken with stage()")
        self._taken.remove(slot)
        self._pool.append(slot)

    def admit(self, key, slot):
        """The gating chose a staged expert: `slot` (from stage()) becomes `key`'s cache slot.
        A free cache slot, or else the victim's, joins the staging pool. Returns the evicted key or None."""
        if key in self:
            raise ValueError(f"{key} is already cached")
        if slot not in self._taken:
            raise ValueError(f"slot {slot} was not taken with stage()")
        # _evict raises CacheFull before anything has changed
        evicted, given = (None, self._free.pop()) if self._free else self._evict()
        self._taken.remove(slot)
        self._pool.append(given)
        self._add(key, slot)
        return evicted

    def _add(self, key, slot):
        self._count[key] = self._count.get(key, 0) + 1
        self._enter_probation(key, slot)

    def _rank(self, key):
        return self._count[key] if self.probation == "lfu" else 0

    def _enter_probation(self, key, slot):
        self._prob[key] = slot
        self._groups.setdefault(self._rank(key), {})[key] = None

    def _leave_probation(self, key):
        rank = self._rank(key)
        group = self._groups[rank]
        del group[key]
        if not group:
            del self._groups[rank]
        return self._prob.pop(key)

    def _evict(self):
        """Removes the victim -> (its key, its slot)."""
        pins = self._pins
        for rank in sorted(self._groups):
            key = next((k for k in self._groups[rank] if k not in pins), None)
            if key is not None:
                slot = self._leave_probation(key)
                break
        else:
            key = next((k for k in self._prot if k not in pins), None)
            if key is None:
                raise CacheFull(f"all {len(self)} cached experts are pinned")
            slot = self._prot.pop(key)
        return key, slot
