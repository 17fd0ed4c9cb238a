"""Routed experts: where their weights live and the weighted sum of their outputs.

`ResidentExperts` reads every expert into one slab at load. `OffloadedExperts` keeps a budget of
slots managed by the SLRU policy (`cache.py`), reads misses from the slow tier (`store.py`)
through the read scheduler (`prefetch.py`), and computes the experts already present while the
missing ones stream in. Both sum expert outputs in the same fixed order (ascending expert id), so
the result does not depend on which experts were cached or when reads finished.
"""

import time

import numpy as np

from .backend import cpu
from .cache import SlruCache
from .errors import StorageError
from .prefetch import DEMAND, ReadScheduler
from .slots import Slab


def _expert_out(ffn, u, rows):
    """One expert applied to the token rows that chose it: f32[len(rows), D]."""
    y = np.empty((len(rows), u.shape[1]), np.float32)
    cpu.expert_ffn(np.ascontiguousarray(u[rows]), ffn.gate, ffn.up, ffn.down, ffn.dtype, y)
    return y


def _combine(u, idx, w, outputs):
    """out f32[T, D] = sum over chosen experts, in ascending expert id, of weight * output.
    outputs: {expert: (rows, y f32[len(rows), D])}."""
    out = np.zeros_like(u)
    for e in sorted(outputs):
        rows, y = outputs[e]
        slot = np.nonzero(idx[rows] == e)[1]
        out[rows] += w[rows, slot][:, None] * y
    return out


def _token_rows(idx):
    """{expert: token rows that chose it} for idx int64[T, k]."""
    return {int(e): np.nonzero((idx == e).any(1))[0] for e in np.unique(idx)}


class LayerStats:
    def __init__(self):
        self.hits = self.misses = self.bytes_read = 0
        self.stall_s = 0.0

    def as_dict(self):
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "cache_hit_rate": self.hits / total if total else 0.0,
                "bytes_read": self.bytes_read, "stall_s": self.stall_s}


class ResidentExperts:
    """Every routed expert in host memory, read once from the store."""

    def __init__(self, store, cfg):
        keys = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
        self.slab = Slab(store.layout, len(keys))
        self.slot = {k: i for i, k in enumerate(keys)}
        for k, i in self.slot.items():
            store.read(*k, self.slab.block(i))

    def forward(self, layer, u, idx, w):
        rows = _token_rows(idx)
        return _combine(u, idx, w, {e: (r, _expert_out(self.slab.ffn(self.slot[(layer, e)]), u, r)) for e, r in rows.items()})

    def stats(self):
        return {}

    def reset_stats(self):
        pass

    def close(self):
        pass


class OffloadedExperts:
    """A budget of expert slots in front of the slow tier (the reactive baseline: reads on demand)."""

    def __init__(self, store, cfg, plan, readers=2, timeout_s=30.0):
        self.cfg = cfg
        self.plan = plan
        self.cache = SlruCache(plan.slots, plan.staging)
        self.slab = Slab(store.layout, plan.slots + plan.staging)
        self.reader = ReadScheduler(store, self.slab, readers, timeout_s)
        self.broken = None
        self.reset_stats()

    def reset_stats(self):
        self.layer_stats = {layer: LayerStats() for layer in self.cfg.moe_layers}

    def forward(self, layer, u, idx, w):
        if self.broken is not None:
            raise StorageError(f"an earlier expert read timed out ({self.broken}); reload the engine")
        rows = _token_rows(idx)
        # Cached experts first. A prefill can route to more experts than the cache has slots:
        # then they go through in groups of at most `slots`.
        keys = sorted(((layer, e) for e in rows), key=lambda k: self.cache.lookup(k) is None)
        outputs = {}
        for i in range(0, len(keys), self.plan.slots):
            self._group(keys[i : i + self.plan.slots], u, rows, outputs, self.layer_stats[layer])
        return _combine(u, idx, w, outputs)

    def _group(self, keys, u, rows, outputs, st):
        """Computes the experts `keys` into `outputs`, reading the missing ones meanwhile."""
        self.cache.pin(keys)
        try:
            present, reads = {}, {}
            for key in keys:
                slot = self.cache.touch(key)
                if slot is not None:
                    present[key[1]] = slot
                else:
                    slot, _ = self.cache.insert(key)
                    reads[key[1]] = self.reader.submit(key, slot, DEMAND)
            st.hits += len(present)
            st.misses += len(reads)
            # Compute what is here while the misses stream in.
            for e, s in present.items():
                outputs[e] = (rows[e], _expert_out(self.slab.ffn(s), u, rows[e]))
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
                    outputs[e] = (rows[e], _expert_out(self.slab.ffn(req.slot), u, rows[e]))
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
            total.hits += s.hits
            total.misses += s.misses
            total.bytes_read += s.bytes_read
            total.stall_s += s.stall_s
        return dict(total.as_dict(), max_reads_in_flight=self.reader.max_in_flight, read_retries=self.reader.retries,
                    per_layer=per_layer)

    def close(self):
        self.reader.close()
