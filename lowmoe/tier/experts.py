"""Routed experts: where their weights live and the weighted sum of their outputs.

`ResidentExperts` reads every expert into one slab at load. `OffloadedExperts` keeps a budget of
slots managed by the SLRU policy (`cache.py`), reads misses from the slow tier (`store.py`)
through the read scheduler (`prefetch.py`), and computes the experts already present while the
missing ones stream in. Both sum expert outputs in the same fixed order (each token's router
rank, as the GPU's moe_combine_f32), so the result does not depend on which experts were cached or
when reads finished.

`kernel` computes one expert's rows: cpu.expert_ffn (fastest on the CPU), or exact.expert_rows
where the CPU stands in for the GPU (CPU-MoE on device 'cuda'), whose arithmetic it matches bit
for bit.

Where the slots live is a tier: `HostSlots` here (a host slab, Numba kernels), or
`device_slots.DeviceSlots` (a device slab per weight role, filled through pinned staging on a copy
stream). The policy (cache, hints, stats, errors) is the same code for both.

`ops` is the backend holding the layer's activations u and weights w (model.py): experts computed
on the host take them from it and give the sum back to it (CPU-MoE on device 'cuda' moves u
f32[T, D] and w f32[T, k] to the host and the sum back; on the CPU nothing moves).
"""


import numpy as np

from ..backend import cpu, exact
from .cache import SlruCache
from ..errors import StorageError
from .prefetch import DEMAND, HINT, ReadScheduler
from .slots import Slab
from ..trace import LayerEvent

RANK_PRECISION = 0.8  # see OffloadedExperts.hint_width


def _expert_out(kernel, ffn, u, rows):
    """One expert applied to the token rows that chose it: f32[len(rows), D]."""
    y = np.empty((len(rows), u.shape[1]), np.float32)
    kernel(np.ascontiguousarray(u[rows]), ffn.gate, ffn.up, ffn.down, ffn.dtype, y)
    return y


def _combine(u, idx, w, outputs):
    """out f32[T, D] = each token's chosen experts' weight * output, summed in rank order
    (exact.combine). outputs: {expert: (rows, y f32[len(rows), D])}."""
    T, k = idx.shape
    y = np.empty((T, k, u.shape[1]), np.float32)
    for e, (rows, ye) in outputs.items():
        t, j = np.nonzero(idx[rows] == e)
        y[rows[t], j] = ye[t]
    return exact.combine(y, w)


def _token_rows(idx):
    """{expert: token rows that chose it} for idx int64[T, k]."""
    return {int(e): np.nonzero((idx == e).any(1))[0] for e in np.unique(idx)}


class LayerStats:
    """Counters of one MoE layer. Every chosen expert is a hit (cached), prefetched (a hint had
    staged it or had its read in flight) or a miss (a demand read)."""

    FIELDS = ("hits", "prefetched", "misses", "bytes_read", "wasted_bytes", "stall_s", "predictions",
              "recall_k", "recall_2k", "recall_early")

    def __init__(self):
        for f in self.FIELDS:
            setattr(self, f, 0)

    def add(self, other):
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def as_dict(self):
        used = self.hits + self.prefetched + self.misses
        n = self.predictions
        return {"hits": self.hits, "prefetched": self.prefetched, "misses": self.misses,
                "cache_hit_rate": self.hits / used if used else 0.0,
                "prefetch_hit_rate": self.prefetched / used if used else 0.0,
                "topk_recall": self.recall_k / n if n else 0.0, "recall_at_2k": self.recall_2k / n if n else 0.0,
                "early_topk_recall": self.recall_early / n if n else 0.0,
                "bytes_read": self.bytes_read, "wasted_bytes": self.wasted_bytes, "stall_s": self.stall_s}


class Resident:
    """The counters interface the engine calls on an expert cache, for experts that are all
    resident: nothing is read, so there is nothing to count and no events."""

    token = 0  # decode step, set by the engine

    def stats(self):
        return {}

    def reset_stats(self):
        pass

    def close(self):
        pass


class ResidentExperts(Resident):
    """Every routed expert in host memory, read once from the store."""

    def __init__(self, store, cfg, kernel=cpu.expert_ffn, ops=cpu):
        self.kernel = kernel
        self.ops = ops
        self.layout = store.layout
        keys = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
        self.slab = Slab(store.layout, len(keys))
        self.slot = {k: i for i, k in enumerate(keys)}
        for k, i in self.slot.items():
            store.read(*k, self.slab.block(i))

    def forward(self, layer, u, idx, w):
        u, w = self.ops.to_host(u), self.ops.to_host(w)
        rows = _token_rows(idx)
        ffn = self.slab.ffn
        L = self.layout.of(layer)
        outputs = {e: (r, _expert_out(self.kernel, ffn(self.slot[(layer, e)], L), u, r)) for e, r in rows.items()}
        return self.ops.to_device(_combine(u, idx, w, outputs))


class _HostLayer:
    """One MoE layer's experts on the CPU: each computed as soon as it is added (while later reads
    stream in), summed by _combine at the end."""

    def __init__(self, tier, u, idx, w, rows, layout):
        self.tier, self.u, self.idx, self.w, self.rows, self.layout = tier, u, idx, w, rows, layout
        self.outputs = {}  # expert -> (rows, y f32[len(rows), D])

    def add(self, e, slot, just_read=False):
        """Expert e from `slot`; just_read: its read has just finished (the GPU tier may then compute
        it on the CPU instead of waiting for its copy)."""
        t = self.tier
        self.outputs[e] = (self.rows[e], _expert_out(t.kernel, t.slab.ffn(slot, self.layout), self.u, self.rows[e]))

    def flush(self):
        """End of a group of experts (their slots may be reused after this): nothing is pending."""

    def result(self):
        return self.tier.ops.to_device(_combine(self.u, self.idx, self.w, self.outputs))


class HostSlots:
    """The CPU's fast tier: `n` slots of one host slab; a read lands straight in its slot."""

    def __init__(self, store, n, kernel=cpu.expert_ffn, ops=cpu):
        self.store = store
        self.slab = Slab(store.layout, n)
        self.kernel = kernel
        self.ops = ops

    def fill(self, key, slot):
        """Reader thread: expert `key` into `slot` -> bytes read."""
        return self.store.read(*key, self.slab.block(slot))

    def layer(self, u, idx, w, rows, layout):
        """A layer's experts, in `layout` (its layer's: slab.layout.of)."""
        return _HostLayer(self, self.ops.to_host(u), idx, self.ops.to_host(w), rows, layout)

    def close(self):
        pass


class OffloadedExperts:
    """A budget of expert slots in front of the slow tier (the reactive baseline: reads on demand).
    `tier`: where the slots live (default: HostSlots of plan.slots + plan.staging computing with
    `kernel`)."""

    def __init__(self, store, cfg, plan, readers=1, timeout_s=30.0, tier=None, kernel=cpu.expert_ffn):
        self.cfg = cfg
        self.plan = plan
        self.cache = SlruCache(plan.slots, plan.staging)
        self.tier = tier or HostSlots(store, plan.slots + plan.staging, kernel)
        self.slab = self.tier.slab
        self.reader = ReadScheduler(self.tier.fill, readers, timeout_s)
        self.broken = None
        self.staged = {}  # key -> Request of a hint read into a staging slot
        self.releasing = {}  # key -> Request of a hint the gating did not choose; slot freed once read
        self.predicted = {}  # layer -> experts ranked for this token (refined, where refine_hint ran)
        self.early = {}  # layer -> the predictor's own ranking (before refinement)
        self.on_event = None  # callable(LayerEvent) for each decode layer, e.g. a trace sink
        # How often the r-th most likely expert of a hint (the predictor's own: "early", or refined:
        # "refined") was then chosen, for hint_width(): each stage reads as far as it is precise.
        self.rank_right = {stage: np.zeros(cfg.top_k, np.int64) for stage in ("early", "refined")}
        self.rank_seen = {"early": 0, "refined": 0}
        self.token = 0  # decode step, set by the engine
        self.reset_stats()

    @property
    def layout(self):
        return self.slab.layout

    def hint(self, layer, ranked, distance=1):
        """Starts reads of the most likely experts of `layer` (see hint_width) that are not cached,
        most likely first, into free staging slots. Evicts nothing: the cache changes only when
        the gating fires. A hint for `distance` 2 MoE layers ahead reads only while the disk is
        idle (nothing queued or in flight once the next layer's hints are in): a read, once
        started, cannot be overtaken, and one for N+2 would hold up N+1's demand reads."""
        if distance > 1 and self.reader.in_flight:
            return
        self._sweep()
        self.predicted[layer] = self.early[layer] = ranked
        self._read_ahead(layer, ranked, "early")

    def refine_hint(self, layer, ranked):
        """Replaces the hint of `layer` by a better-informed ranking (its own router on its input,
        before its attention): queued reads it drops are cancelled (a read already started is
        kept), the experts it adds are read at once."""
        self._sweep()
        self.predicted[layer] = ranked
        keep = {(layer, int(e)) for e in ranked[: self.hint_width("refined")]}
        for key in [k for k in self.staged if k[0] == layer and k not in keep]:
            req = self.staged.pop(key)
            if self.reader.cancel(req):
                self.cache.release(req.slot)
            else:
                self.releasing[key] = req
        self._read_ahead(layer, ranked, "refined")

    def _read_ahead(self, layer, ranked, stage):
        for rank, e in enumerate(ranked[: self.hint_width(stage)]):
            key = (layer, int(e))
            if key in self.cache or key in self.staged:
                continue
            if key in self.releasing:  # read earlier for nothing, predicted again: keep it
                self.staged[key] = self.releasing.pop(key)
                continue
            slot = self.cache.stage()
            if slot is None:
                break
            self.staged[key] = self.reader.submit(key, slot, HINT, rank)

    def hint_width(self, stage="early"):
        """How many of the predicted experts to read: the leading ranks (at most top-k) whose
        predictions have come true at least RANK_PRECISION of the time so far. When the disk is
        the bottleneck, a wrong hint costs a whole read of disk time that a needed expert waits
        behind, while a right one only moves a read earlier. Measured at 8K context and 25-50%
        cache: the learned predictor's ranks came true 99/96/88/69% of the time, and hinting
        the first three beat hinting all four; reading beyond the top k lost even for the oracle.
        Each stage (the predictor's hint, its refinement) is judged by its own record: a refined
        hint comes true more often, and must not widen the earlier, less precise one."""
        k = self.cfg.top_k
        if self.rank_seen[stage] < 32:  # too few predictions to judge: trust them
            return k
        precise = self.rank_right[stage] >= RANK_PRECISION * self.rank_seen[stage]
        return max(1, k if precise.all() else int(np.argmin(precise)))

    def _sweep(self):
        """Returns the staging slots of unchosen hints whose reads have finished. One still in
        flight keeps its slot (the read is writing there) and its key (a later request for the
        expert takes it over instead of reading it a second time). Where the cache can hold every
        expert, a finished one is admitted instead: it evicts nothing (a free slot always
        exists), and releasing it would read the expert again when the gating picks it later
        (from a cold cache at 100%, predictors ran 0.87-0.92x reactive for that)."""
        for key, req in list(self.releasing.items()):
            if req.ready.is_set():
                del self.releasing[key]
                if self.plan.slots == self.plan.experts and req.error is None:
                    self.cache.admit(key, req.slot)
                else:
                    self.cache.release(req.slot)

    def reset_stats(self):
        self.layer_stats = {layer: LayerStats() for layer in self.cfg.moe_layers}
        self.uses = {layer: np.zeros(self.cfg.num_experts, np.int64) for layer in self.cfg.moe_layers}
        self.reader.bytes_read = 0
        self.reader.timing = dict.fromkeys(self.reader.timing, 0)

    def forward(self, layer, u, idx, w):
        if self.broken is not None:
            raise StorageError(f"an earlier expert read timed out ({self.broken}); reload the engine")
        rows = _token_rows(idx)
        np.add.at(self.uses[layer], idx.reshape(-1), 1)
        st = self.layer_stats[layer]
        tracing = self.on_event is not None and idx.shape[0] == 1
        if tracing:  # counters before this layer, for the event's deltas; not paid without a trace
            before = LayerStats()
            before.add(st)
        ranked, early = self.predicted.pop(layer, None), self.early.pop(layer, None)
        if ranked is not None and idx.shape[0] == 1:
            k = self.cfg.top_k
            for stage, r in (("early", early), ("refined", ranked if ranked is not early else None)):
                if r is not None:
                    self.rank_seen[stage] += 1
                    self.rank_right[stage] += [int(e) in rows for e in r[:k]]
            st.predictions += 1
            st.recall_k += len(set(ranked[:k].tolist()) & set(rows)) / k
            st.recall_2k += len(set(ranked[: 2 * k].tolist()) & set(rows)) / k
            st.recall_early += len(set((ranked if early is None else early)[:k].tolist()) & set(rows)) / k
        # Cached experts first. A prefill can route to more experts than the cache has slots:
        # then they go through in groups of at most `slots`.
        keys = sorted(((layer, e) for e in rows), key=lambda k: self.cache.lookup(k) is None)
        layout = self.slab.layout.of(layer)
        out = self.tier.layer(u, idx, w, rows, layout)
        try:
            for i in range(0, len(keys), self.plan.slots):
                self._group(keys[i : i + self.plan.slots], out, st)
        finally:
            for key in [k for k in self.staged if k[0] == layer]:  # hints the gating did not choose
                req = self.staged.pop(key)
                if self.reader.cancel(req):  # still queued: never read, its slot is free now
                    self.cache.release(req.slot)
                else:
                    self.releasing[key] = req
                    st.wasted_bytes += layout.nbytes
            self._sweep()
        if tracing:
            k = self.cfg.top_k
            self.on_event(LayerEvent(
                self.token, layer, sorted(rows), [] if ranked is None else [int(e) for e in ranked[:k]],
                st.hits - before.hits, st.prefetched - before.prefetched, st.misses - before.misses,
                st.stall_s - before.stall_s, st.bytes_read - before.bytes_read, st.wasted_bytes - before.wasted_bytes))
        return out.result()

    def _group(self, keys, out, st):
        """Adds the experts `keys` to the layer's sum `out`, reading the missing ones meanwhile."""
        self.cache.pin(keys)
        try:
            present, reads = {}, {}
            for key in keys:
                slot = self.cache.touch(key)
                if slot is not None:
                    present[key[1]] = slot
                    st.hits += 1
                elif key in self.staged or key in self.releasing:  # a hint read it, or is reading it:
                    req = self.staged.pop(key, None) or self.releasing.pop(key)  # admit by slot swap
                    self.cache.admit(key, req.slot)
                    self.reader.promote(req)
                    reads[key[1]] = req
                    st.prefetched += 1
                else:
                    slot, _ = self.cache.insert(key)
                    reads[key[1]] = self.reader.submit(key, slot, DEMAND)
                    st.misses += 1
            # Compute what is here while the misses stream in.
            for e, s in present.items():
                out.add(e, s)
            failed = None
            for e, req in reads.items():
                try:
                    st.stall_s += self.reader.wait(req)
                except StorageError as err:
                    self._forget(req, err)
                    failed = failed or err
                    continue
                st.bytes_read += req.nbytes
                if failed is None:
                    out.add(e, req.slot, just_read=True)
            if failed is None:
                out.flush()
        finally:
            self.cache.unpin(keys)
        if failed is not None:
            raise failed

    def _forget(self, req, err):
        """A failed read leaves its slot without a valid expert: drop the key from the cache. A read
        that timed out may still write into its slot later, so that slot can never be trusted
        again: the cache refuses further work instead of risking wrong output."""
        if req.ready.is_set():
            self.cache.discard(req.key)
        else:
            self.broken = err

    def stats(self):
        per_layer = [dict(layer=layer, **s.as_dict()) for layer, s in self.layer_stats.items()]
        total = LayerStats()
        for s in self.layer_stats.values():
            total.add(s)
        # Hint reads finish in the background: the reader's own count covers them all.
        t = self.reader.timing
        return dict(total.as_dict(), bytes_read=self.reader.bytes_read, max_reads_in_flight=self.reader.max_in_flight,
                    read_retries=self.reader.retries, reads=t["reads"], read_queue_s=t["queue_s"],
                    read_fill_s=t["fill_s"], read_wakes=t["wakes"], read_wake_s=t["wake_s"], per_layer=per_layer)

    def close(self):
        self.reader.close()
        self.tier.close()
